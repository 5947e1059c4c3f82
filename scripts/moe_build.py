"""Build moe2stage instances with nvcc directly (parallel) and load them with ctypes.

A stand-in for jitkiln.runtime while the engine is written: renders each instance through the family,
compiles it with the family's CompileSpec, checks the ptxas log for C7510 and spills, and gives a module
object with ``dispatch(problem) -> {slot: ctypes function}`` (argtypes from the instance's CAbi).

    python scripts/moe_build.py --out build/moe --variant bf16 [--jobs 16] [--roles ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from jitkiln.families.moe2stage import MoE2Stage  # noqa: E402


def nvcc_cmd(fam, variant, src, so):
    spec = fam.compile_spec(variant)
    cmd = ["nvcc", *spec.flags, "-Xptxas=-v"]
    for d in spec.include_dirs:
        cmd += ["-I", d]
    return cmd + [src, "-o", so]


def build_one(fam, variant, inst, out_dir):
    base = os.path.join(out_dir, inst.name)
    src, so, log = base + ".cu", base + ".so", base + ".log"
    text = fam.render(inst)
    if os.path.exists(so) and os.path.exists(src) and open(src).read() == text:
        return inst, so, 0.0, "cached"
    with open(src, "w") as f:
        f.write(text)
    t0 = time.time()
    p = subprocess.run(nvcc_cmd(fam, variant, src, so), capture_output=True, text=True)
    dt = time.time() - t0
    with open(log, "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"nvcc failed for {inst.name} ({dt:.1f}s):\n" + (p.stderr[-4000:]))
    notes = []
    allout = p.stdout + p.stderr
    if "C7510" in allout:
        notes.append("C7510!")
    if "spill" in allout and "0 bytes spill stores" not in allout:
        notes.append("spills?")
    return inst, so, dt, " ".join(notes) or "ok"


class DirectModule:
    def __init__(self, fam, variant, libs):
        self.fam, self.variant, self.libs, self._fns = fam, variant, libs, {}

    def fn(self, inst):
        f = self._fns.get(inst.digest)
        if f is None:
            lib = ctypes.CDLL(self.libs[inst.digest])
            nm = getattr(lib, f"jk_name_{inst.digest[:16]}")
            nm.restype = ctypes.c_char_p
            assert nm().decode() == inst.name, (nm(), inst.name)
            f = getattr(lib, inst.symbol)
            abi = self.fam.abi_of(inst)
            f.argtypes = list(abi.argtypes)
            f.restype = abi.restype
            self._fns[inst.digest] = f
        return f

    def dispatch(self, problem):
        return {slot: self.fn(i) for slot, i in self.fam.select(self.variant, problem).items()}


class ForcedModule(DirectModule):
    """Dispatch to fixed instances (for per-tile benchmarking)."""

    def __init__(self, base, stage1, stage2):
        super().__init__(base.fam, base.variant, base.libs)
        self._fns = base._fns
        self.s1, self.s2 = stage1, stage2

    def dispatch(self, problem):
        return {"stage1": self.fn(self.s1), "stage2": self.fn(self.s2)}


def build(variant="bf16", out_dir="build/moe", jobs=None, instances=None, verbose=True):
    fam = MoE2Stage()
    os.makedirs(out_dir, exist_ok=True)
    insts = list(instances or fam.candidates(variant))
    jobs = jobs or os.cpu_count() or 1
    libs, times = {}, {}
    with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
        for inst, so, dt, note in ex.map(lambda i: build_one(fam, variant, i, out_dir), insts):
            libs[inst.digest] = so
            times[inst.name] = (dt, note)
            if verbose:
                print(f"built {inst.name:55s} {dt:6.1f}s {note}", flush=True)
    return DirectModule(fam, variant, libs), times


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="bf16")
    ap.add_argument("--out", default="build/moe")
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args()
    t0 = time.time()
    _, times = build(a.variant, a.out, a.jobs)
    print(json.dumps({"wall_s": time.time() - t0, "per_instance": times}, indent=1))
