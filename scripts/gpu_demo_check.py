"""Run every demo-family instance on the GPU and check it against a float64 reference.

Run on a machine with a CUDA GPU and torch:  PYTHONPATH=src python scripts/gpu_demo_check.py [--jobs 16]
Fresh random inputs every run; the output is poisoned (NaN) before each launch, so an unwritten element fails.
"""
import argparse
import json
import sys
import time

import torch

from jitkiln.build import Builder
from jitkiln.errors import LaunchError
from jitkiln.family import get_family
from jitkiln.plan import make_plan
from jitkiln.runtime import Module
from jitkiln.store import Store

SHAPES = [(1, 1, 1), (1, 513, 77), (8, 512, 256), (16, 100, 3), (17, 64, 64), (100, 100, 8), (127, 129, 31),
          (256, 256, 256), (511, 1024, 64), (1024, 1024, 512), (2048, 1536, 1024)]
TOL = {"f32": 1e-5, "f64": 1e-12}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    fam = get_family("demo")
    store = Store()
    rows, failures = [], 0
    for variant in fam.variants():
        plan = make_plan(fam, variant, [], full=True)
        t0 = time.perf_counter()
        rec = Builder(store, jobs=args.jobs, progress=False).build(plan)
        print(f"{variant}: built {len(rec.compiled)} compiled, {len(rec.hits)} hits in {time.perf_counter() - t0:.1f} s")
        mod = Module(plan, store, policy="error")
        mod.load_available()
        dt = torch.float32 if variant == "f32" else torch.float64
        stream = torch.cuda.current_stream().cuda_stream
        for inst in plan.instances:
            fn = mod.launcher(inst)
            for (m, n, k) in SHAPES:
                a = torch.randn(m, k, device="cuda", dtype=dt)
                b = torch.randn(k, n, device="cuda", dtype=dt)
                c = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
                rc = fn(a.data_ptr(), b.data_ptr(), c.data_ptr(), m, n, k, stream)
                if rc != 0:
                    raise LaunchError(f"{inst.name} returned CUDA error {rc} for {m}x{n}x{k}")
                torch.cuda.synchronize()
                ref = a.double() @ b.double()
                err = ((c.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                ok = err < TOL[variant] and not torch.isnan(c).any().item()
                failures += not ok
                rows.append({"instance": inst.name, "m": m, "n": n, "k": k, "rel_err": err, "ok": ok})
        # dispatch through the heuristic, as the runtime does
        for (m, n, k) in SHAPES:
            chosen = fam.select(variant, {"m": m, "n": n, "k": k})["gemm"].name
            rows.append({"dispatch": chosen, "m": m, "n": n, "k": k, "variant": variant})
    checked = [r for r in rows if "instance" in r]
    worst = max(checked, key=lambda r: r["rel_err"])
    print(f"{torch.cuda.get_device_name()}: {len(checked)} instance x shape checks, {failures} failed; "
          f"worst rel err {worst['rel_err']:.2e} ({worst['instance']} {worst['m']}x{worst['n']}x{worst['k']})")
    for r in checked:
        if not r["ok"]:
            print("FAIL", r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
