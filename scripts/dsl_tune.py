"""Tuning sweep of the CuTe DSL tiles: extra bf16-dsl tile variants (occupancy 2: two CTAs per SM with half the
pipeline stages each) beside the family's candidates, in this process only (the library's candidate list is
extended here, not in the library).

    python scripts/dsl_tune.py build [CACHE_DIR]            # compile them (and every bf16-dsl unit) here
    python scripts/dsl_tune.py check -- <scripts/moe_check.py arguments: --variant bf16-dsl --dsl-cache ...>
    python scripts/dsl_tune.py bench -- <bench/moe_perf.py arguments with --dsl-cache and --sweep>
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from jitkiln.families.moe2stage import family as _family  # noqa: E402
from jitkiln.families.moe2stage.dsl_instances import MoEStage1Dsl, MoEStage2Dsl  # noqa: E402

EXTRA = [cls(dtype="bf16", tile_m=64, tile_n=tn, tile_k=tk, schedule="pingpong", occupancy=2)
         for cls in (MoEStage1Dsl, MoEStage2Dsl) for tn, tk in ((128, 64), (64, 128))]


def patch() -> None:
    base = _family.MoE2Stage.candidates

    def candidates(self, variant):
        out = list(base(self, variant))
        return out + EXTRA if variant == "bf16-dsl" else out
    _family.MoE2Stage.candidates = candidates
    print("extra DSL tiles: " + ", ".join(e.name for e in EXTRA), flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "check", "bench"):
        print("dsl_tune: usage: dsl_tune.py build [CACHE_DIR] | check -- <scripts/moe_check.py arguments> | "
              "bench -- <bench/moe_perf.py arguments>", file=sys.stderr)
        return 2
    patch()
    if argv[0] == "build":
        import moe_dsl_build
        return moe_dsl_build.main(argv[1:])
    rest = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    if argv[0] == "check":
        import moe_check
        sys.argv = ["moe_check.py"] + rest
        return moe_check.main() or 0
    import moe_perf
    sys.argv = ["moe_perf.py"] + rest
    moe_perf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
