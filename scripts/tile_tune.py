"""Tuning sweep of moe2stage tiles: extra tile variants of the C++ (CUTLASS) and CuTe DSL grouped GEMMs beside the
family's candidates, in this process only (the family's candidate lists are extended here, not in the library).

    python scripts/tile_tune.py build-dsl [CACHE_DIR]       # compile the extra DSL tiles (and every bf16-dsl unit)
    python scripts/tile_tune.py build-cpp [--jobs N]        # compile the extra C++ tiles (and every bf16 unit)
    python scripts/tile_tune.py check -- <scripts/moe_check.py arguments>
    python scripts/tile_tune.py bench -- <bench/moe_perf.py arguments with --sweep (and --dsl-cache)>
    python scripts/tile_tune.py sets                          # the tile sets (TILE_TUNE_SET=<name> picks one)

Measured with it: DSL occupancy 2 (two CTAs per SM; bench/results/moe-dsl-tune-h200.json), 64x256x64 and
64x128x64 ping-pong tiles (bench/results/moe-tile-tune-h200.json).
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
from jitkiln.families.moe2stage.instances import MoEStage1, MoEStage1Swap, MoEStage2, MoEStage2Swap  # noqa: E402

SHAPES = ((64, 256, 64), (64, 128, 64))  # (tile_m, tile_n, tile_k), ping-pong, one CTA per SM


def _cpp(dtype, stage, m, n, k, schedule, cm=1):
    return (MoEStage1 if stage == 1 else MoEStage2)(dtype=dtype, tile_m=m, tile_n=n, tile_k=k, schedule=schedule,
                                                    cluster_m=cm)


# Tile sets (TILE_TUNE_SET=<name>; default n256):
#   n256: 64x256x64 and 64x128x64 ping-pong, C++ and DSL (bench/results/moe-tile-tune-h200.json).
#   wide: tiles whose N divides 2 * inter_dim where 256 does not (small-moe: 2 * 192 = 384 = 2 x 192), the 128x128
#         cooperative stage 1 that bf16 dropped, and fp8 64x256x128 ping-pong (bf16's DECODE_N256 for fp8) and
#         128x192x128 cooperative.
#   dsl-pp: the CuTe DSL's 64x128x128 and 64x256x64 ping-pong tiles with two consumer warpgroups taking turns.
#   swap: swapped-operand tiles (weights as A; tile_n = the rows tile: 16, 32 or 64), bf16 and fp8, both stages.
SETS = {
    "n256": {
        "bf16": [cls(dtype="bf16", tile_m=m, tile_n=n, tile_k=k, schedule="pingpong")
                 for cls in (MoEStage1, MoEStage2) for m, n, k in SHAPES],
        "bf16-dsl": [cls(dtype="bf16", tile_m=m, tile_n=n, tile_k=k, schedule="pingpong")
                     for cls in (MoEStage1Dsl, MoEStage2Dsl) for m, n, k in SHAPES],
    },
    "wide": {
        "bf16": [_cpp("bf16", 1, 128, 192, 64, "cooperative"), _cpp("bf16", 1, 128, 192, 64, "cooperative", 2),
                 _cpp("bf16", 1, 128, 128, 64, "cooperative"), _cpp("bf16", 1, 64, 192, 64, "pingpong")],
        "fp8": [_cpp("fp8", 1, 64, 256, 128, "pingpong"), _cpp("fp8", 2, 64, 256, 128, "pingpong"),
                _cpp("fp8", 1, 128, 192, 128, "cooperative")],
    },
}
SETS["dsl-pp"] = {  # the DSL's 64-row ping-pong tiles with two consumer warpgroups (its default: one)
    "bf16-dsl": [cls(dtype="bf16", tile_m=64, tile_n=n, tile_k=k, schedule="pingpong", consumers=2)
                 for cls in (MoEStage1Dsl, MoEStage2Dsl) for n, k in ((128, 128), (256, 64))],
}
SWAP_SHAPES = {"bf16": ((64, 16, 128, "pingpong"), (64, 32, 128, "pingpong"), (64, 64, 128, "pingpong"),
                        (128, 16, 128, "cooperative"), (128, 32, 128, "cooperative")),
               "fp8": ((64, 16, 256, "pingpong"), (64, 32, 256, "pingpong"), (128, 32, 256, "cooperative"))}
SETS["swap"] = {dt: [cls(dtype=dt, tile_m=m, tile_n=n, tile_k=k, schedule=sc) for cls in (MoEStage1Swap, MoEStage2Swap)
                     for m, n, k, sc in shapes] for dt, shapes in SWAP_SHAPES.items()}
SET = os.environ.get("TILE_TUNE_SET", "n256")
EXTRA = SETS.get(SET, {})


def patch() -> None:
    base = _family.MoE2Stage.candidates

    def candidates(self, variant):
        return list(base(self, variant)) + EXTRA.get(variant, [])
    _family.MoE2Stage.candidates = candidates


def main(argv: list[str]) -> int:
    if SET not in SETS:
        print(f"tile_tune: TILE_TUNE_SET={SET!r} is not a tile set; use one of {', '.join(SETS)}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in ("build-dsl", "build-cpp", "check", "bench", "sets"):
        print("tile_tune: usage: tile_tune.py build-dsl [CACHE_DIR] | build-cpp [--jobs N] | check -- <moe_check.py "
              "arguments> | bench -- <moe_perf.py arguments> | sets", file=sys.stderr)
        return 2
    if argv[0] == "sets":  # the tile sets, the chosen one marked (TILE_TUNE_SET was checked above)
        print(" ".join(f"[{s}]" if s == SET else s for s in SETS))
        return 0
    jobs = None
    if argv[0] == "build-cpp" and "--jobs" in argv:
        i = argv.index("--jobs")
        v = argv[i + 1] if i + 1 < len(argv) else ""
        if not v.isdigit() or int(v) < 1:
            print("tile_tune: --jobs takes a positive integer", file=sys.stderr)
            return 2
        jobs = int(v)
    patch()
    if argv[0] == "build-dsl":
        import moe_dsl_build
        return moe_dsl_build.main(argv[1:])
    if argv[0] == "build-cpp":
        import moe_build
        bad = False
        for v in [v for v in ("bf16", "fp8") if v == "bf16" or v in EXTRA]:
            times = moe_build.build(v, jobs=jobs, verbose=True)[1]
            bad = bad or any("spills" in note or "C7510" in note for _, note in times.values())
        return 1 if bad else 0
    rest = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    if argv[0] == "check":
        import moe_check
        sys.argv = ["moe_check.py"] + rest
        return moe_check.main() or 0
    import moe_perf
    print("extra tiles: " + ", ".join(e.name for v in EXTRA.values() for e in v), flush=True)
    sys.argv = ["moe_perf.py"] + rest
    moe_perf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
