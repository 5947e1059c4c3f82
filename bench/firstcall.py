"""The first real call of a family's problem, for bench/coldstart.py --gpu (runs in the measured process).

moe2stage: random bf16 weights and inputs of the problem's shape (made before the clock's "first call" is read:
a server has its weights before its first call), then one ``fused_moe`` through the module (tier 0 or 1),
synchronized and checked against ``torch_moe`` on the same inputs.
"""
from __future__ import annotations

import time


def prepare(family: str, problem: dict):
    if family != "moe2stage":
        return None
    import torch
    g = torch.Generator(device="cuda").manual_seed(int(time.time()))
    T, H, I, E, k = (problem[x] for x in ("tokens", "hidden", "inter_dim", "experts", "topk"))
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5).to(torch.bfloat16)
    x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(T, k, device="cuda", generator=g), dim=1)
    torch.cuda.synchronize()
    return (x, w13, w2, w, ids)


def run(family: str, mod, problem: dict, inputs) -> dict:
    if family != "moe2stage":
        return {}
    import torch
    from jitkiln.families.moe2stage.torch_ops import fused_moe, torch_moe
    x, w13, w2, w, ids = inputs
    tier = mod.resolve(problem).tier
    out = fused_moe(x, w13, w2, w, ids, module=mod)
    torch.cuda.synchronize()
    ref = torch_moe(x, w13, w2, w, ids).float()
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not err < 1e-2:
        raise SystemExit(f"first call wrong: rel err {err:.3e} (tier {tier})")
    return {"first_call_tier": tier, "first_call_rel_err": err}
