"""Build moe2stage instances through the jitkiln engine (planner, builder, cache, runtime) and load them.

Builds the full module of a variant (every candidate, so the checks and the per-tile sweep can force any
instance) with all cores, checks each unit's compiler log for ptxas warning C7510 (a device assert left in the
kernel serializes the wgmma pipeline) and for spills, and returns the runtime module.

    python scripts/moe_build.py --variant bf16 [--jobs 16]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from jitkiln.build import Builder  # noqa: E402
from jitkiln.family import get_family  # noqa: E402
from jitkiln.plan import make_plan  # noqa: E402
from jitkiln.runtime import Module  # noqa: E402
from jitkiln.store import Store  # noqa: E402


class ForcedModule:
    """Dispatch to fixed instances of a loaded module (for per-tile benchmarking and per-candidate checks)."""

    def __init__(self, base: Module, stage1, stage2):
        self.base, self.s1, self.s2 = base, stage1, stage2

    def dispatch(self, problem):
        return {"stage1": self.base.launcher(self.s1), "stage2": self.base.launcher(self.s2)}


def build(variant="bf16", out_dir=None, jobs=None, verbose=True):
    """Build (or find in the cache) every candidate of ``variant``; return (module, {name: (seconds, note)}).
    ``out_dir`` is ignored: instances live in the jitkiln cache ($JITKILN_CACHE_DIR)."""
    fam = get_family("moe2stage")
    plan = make_plan(fam, variant, [], full=True, require_compiler=True)
    store = Store()
    rec = Builder(store, jobs=jobs, progress=verbose).build(plan)
    mod = Module(plan, store, policy="error")
    mod.load_available()
    times = {}
    for u in rec.units:
        notes = []
        try:
            log = open(store.log_path(u.ukey)).read() if u.status == "compiled" else ""
        except OSError:
            log = ""
        if "C7510" in log:
            notes.append("C7510!")
        if re.search(r"warning.*spill", log, re.I):
            notes.append("spills!")
        times[u.name] = (u.seconds, " ".join(notes) or u.status)
        if verbose:
            print(f"built {u.name:55s} {u.seconds:6.1f}s {times[u.name][1]}", flush=True)
    if verbose:
        print(f"build record: {rec.path}  wall {rec.wall_s:.1f} s, critical path {rec.critical_path_s:.1f} s")
    return mod, times


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="bf16")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", help="(ignored: instances live in the jitkiln cache, $JITKILN_CACHE_DIR)")
    a = ap.parse_args()
    t0 = time.time()
    _, times = build(a.variant, jobs=a.jobs)
    print(json.dumps({"wall_s": time.time() - t0, "per_instance": times}, indent=1))
