"""Hardware counters of moe2stage's kernels and vLLM's on one bench row (diagnosis, not a benchmark).

Runs each path a few times on the same inputs (eager); meant to run under Nsight Compute on the GPU machine:

    ncu --clock-control none -k regex:'gemv|GemmUniversal|fused_moe_kernel|device_kernel' --section SpeedOfLight \
        --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 scripts/ncu_probe.py --shape qwen3-moe --tokens 8 [--vllm .gpu/vllm] [--variant bf16]

Prints which instances ran. Needs the module's units built (scripts/moe_build.py) in $JITKILN_CACHE_DIR.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-moe")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--vllm", default="")
    ap.add_argument("--calls", type=int, default=2)
    a = ap.parse_args()
    import torch
    from moe_perf import SHAPES, routing
    if a.shape not in SHAPES:
        sys.exit(f"ncu_probe: unknown shape {a.shape!r}: choose from {', '.join(SHAPES)}")
    if a.tokens < 1:
        sys.exit("ncu_probe: --tokens must be positive")
    vl = None
    if a.vllm:
        from vllm_moe import load_or_exit
        vl = load_or_exit(a.vllm, "ncu_probe")
    if not torch.cuda.is_available():
        sys.exit("ncu_probe: no CUDA device here: run it on the GPU machine")
    from moe_build import build
    from jitkiln.families.moe2stage import fused_moe
    mod, _ = build("bf16", verbose=False)
    H, I, E, Eg, k = SHAPES[a.shape]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    w13 = (torch.randn(E, 2 * I, H, device=dev, generator=gen) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev, generator=gen) / I ** 0.5).to(torch.bfloat16)
    x = torch.randn(a.tokens, H, device=dev, generator=gen).to(torch.bfloat16)
    ids, w = routing(a.tokens, E, Eg, k, dev, gen)
    ep = Eg // E
    sel = mod.family.select("bf16", {"tokens": a.tokens, "hidden": H, "inter_dim": I, "experts": E, "topk": k,
                                     "ep": ep})
    print("jitkiln instances:", {s: i.name for s, i in sel.items()}, flush=True)
    for _ in range(a.calls):
        fused_moe(x, w13, w2, w, ids, module=mod, ep=ep)
    torch.cuda.synchronize()
    if vl is not None:
        cfg, src = vl.config(a.tokens, E, I, H, k, torch.cuda.get_device_properties(dev).name)
        print("vllm config:", cfg, src, flush=True)
        asg = vl.assign(ids, cfg["BLOCK_SIZE_M"], Eg, ep)
        out = torch.empty(a.tokens, H, dtype=torch.bfloat16, device=dev)
        for _ in range(a.calls):
            vl.run(x, w13, w2, w, ids, asg, cfg, vl.caches(a.tokens, k, H, I, dev), out, ep)
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
