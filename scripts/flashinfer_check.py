"""Check a trimmed FlashInfer fused-MoE module (built by `jitkiln flashinfer build`) through FlashInfer itself.

Run on an sm_90 GPU with the module already in FlashInfer's AOT location. For every case it calls FlashInfer's own
``cutlass_fused_moe`` and compares with a float64 torch reference computed from the same bf16 inputs:

* shapes: Kimi-K2 (tp8 and ep8 slices), Qwen3-235B-A22B-like and Qwen3-30B-A3B (full experts), token counts from 1
  up, random softmax-top-k routing and skewed routing (most tokens on a few experts, most experts empty);
* bound: ||out - ref|| / ||ref|| <= --tol, and no NaN left in an output pre-filled with NaN;
* the check can fail: the same output compared with a reference that swaps FlashInfer's gate and up halves must
  miss the bound by far, or the case is reported as unable to tell;
* no JIT: the module must be the AOT file (read from /proc/self/maps) and FlashInfer's JIT directory must hold no
  fused_moe_90 build afterwards;
* a dtype the module was not built for (fp16) must raise a Python error naming the deployment, in a child process
  (a crash there fails the check).

Prints one line per case and a summary; writes --json. Exit 0 only when every case passes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # name: (hidden, moe intermediate per rank, experts held, experts total, top-k)
    "kimi-k2 tp8": (7168, 256, 384, 384, 8),
    "kimi-k2 ep8": (7168, 2048, 48, 384, 8),
    "qwen3-235b": (4096, 1536, 128, 128, 8),
    "qwen3-30b": (2048, 768, 128, 128, 8),
}


def reference(x, ids, w, w1, w2, e_lo, e_n, swap=False):
    """float64 MoE: out[t] = sum_k w[t,k] * W2[e] (silu(gate) * up), FlashInfer's [up; gate] fc1 layout."""
    import torch
    T, H = x.shape
    I2 = w1.shape[1]
    I = I2 // 2
    out = torch.zeros(T, H, dtype=torch.float64, device=x.device)
    xd = x.double()
    for e in torch.unique(ids).tolist():
        le = e - e_lo
        if le < 0 or le >= e_n:
            continue
        t, k = torch.where(ids == e)
        a = xd[t]
        f1 = w1[le].double()
        up, gate = (f1[:I], f1[I:]) if not swap else (f1[I:], f1[:I])
        h = torch.nn.functional.silu(a @ gate.T) * (a @ up.T)
        y = h @ w2[le].double().T
        out.index_add_(0, t, y * w[t, k].double()[:, None])
    return out


def routing(T, E, k, skew, gen, device):
    import torch
    logits = torch.randn(T, E, generator=gen, device="cpu")
    if skew:
        logits[:, : max(k, 4)] += 6.0  # most tokens on a handful of experts, most experts get none
    p = torch.softmax(logits, -1)
    w, ids = torch.topk(p, k, -1)
    w = w / w.sum(-1, keepdim=True)
    return ids.to(torch.int32).to(device), w.float().to(device)


def aot_mapped(name="fused_moe_90") -> list[str]:
    return sorted({ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines()
                   if ln.split() and ln.split()[-1].endswith(f"{name}.so")})


CHILD = r"""
import torch, sys
from flashinfer.fused_moe import cutlass_fused_moe
x = torch.randn(4, 256, dtype=torch.float16, device="cuda")
w1 = torch.randn(4, 256, 256, dtype=torch.float16, device="cuda")
w2 = torch.randn(4, 256, 128, dtype=torch.float16, device="cuda")
ids = torch.zeros(4, 2, dtype=torch.int32, device="cuda"); ids[:, 1] = 1
sc = torch.full((4, 2), 0.5, device="cuda")
try:
    cutlass_fused_moe(x, ids, sc, w1, w2, torch.float16, quant_scales=None)
    torch.cuda.synchronize()
    print("NO_ERROR")
except Exception as e:
    print("RAISED", type(e).__name__, str(e)[:400].replace(chr(10), " "))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,7,64,512,2048")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    t0 = time.monotonic()
    from flashinfer.fused_moe import cutlass_fused_moe
    from jitkiln.flashinfer import source
    aot = source.aot_path("fused_moe_90")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1234)
    rows, failed = [], 0
    first = None
    for sname in args.shapes.split(","):
        H, I, En, Et, k = SHAPES[sname]
        ep = Et // En
        rank = ep // 2 if ep > 1 else 0
        w1 = (torch.randn(En, 2 * I, H, generator=gen) / H ** 0.5).to(torch.bfloat16).to(dev)
        w2 = (torch.randn(En, H, I, generator=gen) / I ** 0.5).to(torch.bfloat16).to(dev)
        for T in [int(t) for t in args.tokens.split(",")]:
            for skew in (False, True):
                x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
                ids, w = routing(T, Et, k, skew, gen, dev)
                out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=dev)
                res = cutlass_fused_moe(x, ids, w, w1, w2, torch.bfloat16, quant_scales=None, output=out,
                                        ep_size=ep, ep_rank=rank)
                res = res[0] if isinstance(res, (list, tuple)) else res
                torch.cuda.synchronize()
                if first is None:
                    first = round(time.monotonic() - t0, 2)
                ref = reference(x, ids, w, w1, w2, rank * En, En)
                refs = reference(x, ids, w, w1, w2, rank * En, En, swap=True)
                nrm = ref.norm().item()
                nan = int(torch.isnan(res).sum().item())
                if nrm == 0.0:  # every routed expert lives on another rank: the output must be exactly zero
                    err = float(res.double().abs().max().item()) if nan == 0 else float("nan")
                    err_s, ok = float("inf"), (nan == 0 and err == 0.0)
                else:
                    err = ((res.double() - ref).norm() / nrm).item()
                    err_s = ((res.double() - refs).norm() / refs.norm()).item()
                    ok = nan == 0 and err <= args.tol and err_s > 10 * args.tol
                failed += not ok
                r = {"shape": sname, "tokens": T, "skew": skew, "ep": f"{rank}/{ep}", "rel_err": err,
                     "rel_err_swapped_ref": err_s, "nan": nan, "ok": ok}
                rows.append(r)
                print(f"{'ok  ' if ok else 'FAIL'} {sname:12s} T={T:5d} {'skewed' if skew else 'random'} "
                      f"ep {rank}/{ep}: rel err {err:.2e} (swapped-halves reference {err_s:.2e}), nan {nan}",
                      flush=True)
        del w1, w2
        torch.cuda.empty_cache()
    mapped = aot_mapped()
    fi_jit = list((Path(os.environ.get("FLASHINFER_WORKSPACE_BASE", os.path.expanduser("~"))) / ".cache"
                   / "flashinfer").rglob("fused_moe_90/*.so"))
    aot_ok = mapped == [str(aot)] and not fi_jit
    failed += not aot_ok
    print(f"{'ok  ' if aot_ok else 'FAIL'} module mapped from {mapped}; FlashInfer JIT builds: {fi_jit}")
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    line = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
    refuse_ok = p.returncode == 0 and line.startswith("RAISED") and "not built for this deployment" in line
    failed += not refuse_ok
    print(f"{'ok  ' if refuse_ok else 'FAIL'} fp16 call on the bf16 module: rc {p.returncode}: {line}"
          + ("" if refuse_ok else f" | stderr: {p.stderr[-600:]}"))
    worst = max((r["rel_err"] for r in rows if r["rel_err"] == r["rel_err"]), default=None)
    summ = {"cases": len(rows), "failed": failed, "worst_rel_err": worst, "tol": args.tol,
            "first_call_s": first, "aot": str(aot), "mapped": mapped, "refusal": line,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"flashinfer_check: {len(rows)} cases + 2 checks, {failed} failed, worst rel err {worst:.2e} "
          f"(bound {args.tol})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summ, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
