"""The rule of each moe2stage candidate in words: why ``select`` takes it (the plan's "unused" report and the
runtime's messages quote it), from the thresholds in :mod:`.heuristic`, so the text and the dispatch cannot drift."""
from __future__ import annotations

from .heuristic import (DECODE_ROWS, DECODE_ROWS_OTHER, FEW_TILES, GEMV_ROWS_FEW, GEMV_ROWS_S1, GEMV_ROWS_S1_SHORT,
                        GEMV_ROWS_S1_SWAP, GEMV_ROWS_S2, GEMV_ROWS_S2_SHORT, GEMV_ROWS_S2_SWAP, GROUPED_ELEMS,
                        GROUPED_ROWS, MEDIUM_ROWS, N256_MAX_S1, N256_MAX_S2, N256_ROWS_S1, SHORT_HIDDEN, SM_COUNT,
                        SMALL_INTER_DIM, SMALL_K_ROWS, SMALL_W13, SWAP16_ROWS, SWAP_MIN_K2, SWAP_ROWS, WIDE_MAX_ROWS,
                        decode_rows, role_of, roles)


def rules(dr: int) -> dict[str, str]:
    """The tile roles' rules with the 64-row tiles serving up to ``dr`` rows per expert."""
    return {
        "DECODE_N256": ("stage 1: %d < rows per active expert <= %d with 2 * inter_dim a multiple of 256; "
                        "stage 2: rows per expert <= %d; either: more than %d tiles of 64x256"
                        % (N256_ROWS_S1, N256_MAX_S1, dr if dr < DECODE_ROWS else N256_MAX_S2, SM_COUNT)),
        "DECODE_N64": "rows per expert <= %d and at most %d output tiles of N=128" % (dr, SM_COUNT // 2),
        "DECODE_N128": "rows per expert <= %d and more than %d output tiles of N=128" % (dr, SM_COUNT // 2),
        "MEDIUM": "%d < rows per expert <= %d" % (dr, MEDIUM_ROWS),
        "LARGE": ("rows per expert > %d" % max(dr, MEDIUM_ROWS) if dr < DECODE_ROWS else
                  "rows per expert > %d where the 64x256 tile does not serve (above %d rows, or at most %d tiles of "
                  "it)" % (dr, N256_MAX_S2, SM_COUNT)),
        "WIDE": ("stage 1 with rows per expert > %d (past the 256-wide tile's range) where 2 * inter_dim is not a "
                 "multiple of 256, and for bf16 also up to %d rows" % (max(dr, MEDIUM_ROWS), WIDE_MAX_ROWS)),
        "SMALL_K": "stage 2 with inter_dim <= %d and rows per expert > %d" % (SMALL_INTER_DIM, min(dr, SMALL_K_ROWS)),
        "SWAP16": ("past the weight-stream units' range with rows per active expert <= %d (stage 2: inter_dim >= %d): "
                   "swapped operands, 16-row tiles" % (SWAP16_ROWS, SWAP_MIN_K2)),
        "SWAP32": ("%d < rows per active expert <= %d (stage 2: inter_dim >= %d): swapped operands, 32-row tiles"
                   % (SWAP16_ROWS, SWAP_ROWS, SWAP_MIN_K2)),
    }


RULES_B128 = {
    "DECODE_N128": "rows per expert <= %d, or inter_dim <= %d (the small-inter_dim ping-pong path)"
                   % (DECODE_ROWS_OTHER, SMALL_INTER_DIM),
    "MEDIUM": "%d < rows per expert <= %d" % (DECODE_ROWS_OTHER, MEDIUM_ROWS),
    "LARGE": "rows per expert > %d" % MEDIUM_ROWS,
}


def rule(inst) -> str:
    r = role_of(inst)
    if r == "GEMV_GROUPED":
        return (f"stage 2, GEMV_GROUPED: {inst.dtype} with <= {GROUPED_ROWS} expected rows per active expert (above "
                f"the per-token unit's range) and the active experts' W2 at most {GROUPED_ELEMS >> 20}M elements "
                f"(small stage-2 weights: the tile path's launches cost more than its stream)")
    if r == "GEMV":
        dsl = getattr(inst, "backend", "") == "dsl"
        if inst.stage == 1:
            when = ((f"<= {GEMV_ROWS_S1:g} expected rows per active expert, or <= {GEMV_ROWS_S1_SHORT:g} with hidden "
                     f"<= {SHORT_HIDDEN}") if dsl else
                    (f"<= {GEMV_ROWS_S1_SWAP:g} expected rows per active expert, or <= {GEMV_ROWS_S1_SHORT:g} with an "
                     f"expert's W13 at most {SMALL_W13 >> 20}M elements"))
            when += f", or <= {GEMV_ROWS_FEW:g} with at most {FEW_TILES} tiles of 64x128"
        else:
            when = (f"<= {GEMV_ROWS_S2:g} expected rows per active expert" + (
                    "" if dsl else f" ({GEMV_ROWS_S2_SWAP:g} with inter_dim >= {SWAP_MIN_K2})") +
                    f", or <= {GEMV_ROWS_S2_SHORT:g} with inter_dim <= {SMALL_INTER_DIM} or at most {FEW_TILES} "
                    f"output tiles")
        return (f"stage {inst.stage}, GEMV: {inst.dtype} with {when} (decode: one launch, weights streamed; the tiles "
                f"would be mostly padding)")
    if inst.dtype == "fp8b128":
        text = RULES_B128[r]
        if inst.stage == 2 and r in ("MEDIUM", "LARGE"):
            text += " (and inter_dim > %d)" % SMALL_INTER_DIM
        elif inst.stage == 1 and r == "DECODE_N128":
            text = "rows per expert <= %d" % DECODE_ROWS_OTHER
        return f"stage {inst.stage}, {r}: {text}"
    dsl = getattr(inst, "backend", "") == "dsl"
    text = rules(decode_rows(inst.dtype, dsl))[r]
    if inst.stage == 2 and r in ("MEDIUM", "LARGE"):
        text += " (and inter_dim > %d)" % SMALL_INTER_DIM
    if inst.stage == 1 and r == "LARGE" and "WIDE" in roles(1, inst.dtype, dsl):
        text += " (and 2 * inter_dim a multiple of 256%s)" % (
            f"; bf16: above {WIDE_MAX_ROWS} rows" if inst.dtype == "bf16" else "")
    if r.startswith("DECODE") and "SWAP16" in roles(inst.stage, inst.dtype, dsl):
        text += " (past the swapped-operand tiles: above %d rows per active expert%s)" % (
            SWAP_ROWS, "" if inst.stage == 1 else ", or inter_dim < %d" % SWAP_MIN_K2)
    return f"stage {inst.stage}, {r}: {text}"
