"""Compile every candidate of moe2stage's ``bf16-dsl`` variant into a cache folder that travels to the GPU machine
(scripts/moe_dsl_load.py loads it there, where the CuTe DSL is not installed): the DSL GEMM units and the
variant's weight-stream units (plain CUDA). Needs nvidia-cutlass-dsl and nvcc here; no GPU
(``CUTE_DSL_ARCH=sm_90a``). Writes ``<cache>/cutedsl-fingerprint`` (the compiler fingerprint the units are keyed
by) next to the store.

    python scripts/moe_dsl_build.py [CACHE_DIR (default .gpu/cache)] [--jobs N]
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def main(argv: list[str]) -> int:
    jobs = 2
    if "--jobs" in argv:
        i = argv.index("--jobs")
        try:
            jobs = int(argv[i + 1])
            assert jobs >= 1
        except (IndexError, ValueError, AssertionError):
            print("moe_dsl_build: --jobs takes a positive integer", file=sys.stderr)
            return 2
        del argv[i:i + 2]
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("moe_dsl_build: usage: moe_dsl_build.py [CACHE_DIR] [--jobs N]", file=sys.stderr)
        return 2
    cache = os.path.abspath(argv[0] if argv else os.path.join(ROOT, ".gpu", "cache"))
    if os.path.exists(cache) and not os.path.isdir(cache):
        print(f"moe_dsl_build: {cache} is a file, not a folder: name a folder for the cache", file=sys.stderr)
        return 2
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    from jitkiln.build import Builder
    from jitkiln.errors import JitkilnError
    from jitkiln.family import get_family
    from jitkiln.plan import make_plan
    from jitkiln.store import Store
    try:
        plan = make_plan(get_family("moe2stage"), "bf16-dsl", [], full=True, require_compiler=True)
        os.makedirs(cache, exist_ok=True)
        rec = Builder(Store(cache), jobs=jobs, progress=False).build(plan)
    except JitkilnError as e:
        print(f"moe_dsl_build: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(cache, "cutedsl-fingerprint"), "w") as f:
        f.write(plan.compiler_fp + "\n")
    bad = [u for u in rec.units if u.status not in ("compiled", "hit")]
    for u in rec.units:
        print(f"{u.status:9s} {u.name}")
    print(f"{len(rec.units) - len(bad)} of {len(rec.units)} bf16-dsl units in {cache} "
          f"(fingerprint {plan.compiler_fp})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
