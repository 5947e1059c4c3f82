"""The moe2stage candidate set and dispatch heuristic (pure Python, used by the planner and the runtime).

Quantities the heuristic reads from a problem (tokens, hidden, inter_dim, experts, topk, ep):

* ``rows_per_expert`` m = tokens * topk / (experts * ep): the expected rows each *local* expert's GEMM gets
  (with expert parallelism a rank holds ``experts`` of the ``experts * ep`` global experts, and a token's
  top-k picks land on it with probability 1/ep each);
* ``active_experts``: the expected local experts with at least one row (the GEMM groups that do work);
* N and K of each stage: stage 1 is [m, hidden] x [hidden, 2*inter_dim]; stage 2 is [m, inter_dim] x
  [inter_dim, hidden].

Tiles (M x N x K; schedule; cluster) and why each exists:

``DECODE_N64``  64x64x128 ping-pong -- the weight-stream regime (below) when the grid of 128-wide output tiles
    would not even fill half the SMs (<= SM_COUNT / 2 tiles): every weight byte is read once and m rows use it,
    so the only goal is enough CTAs in flight to pull HBM bandwidth; N=64 doubles the CTA count over N=128.
    K=128 keeps 32 KB per stage in flight per CTA. M=64 is the smallest wgmma M.
``DECODE_N128`` 64x128x128 ping-pong -- the same regime once the 128-wide grid has more than SM_COUNT / 2 tiles:
    fewer, larger TMA loads, less A re-read. For bf16 (CUTLASS) it serves up to ``DECODE_ROWS`` = 128 rows per
    expert: measured on the H200 (bench/results/moe-sweep-mid-h200.json: six shapes, 4-2048 tokens, every tile
    of each stage timed with the other stage fixed) it is faster than 64x64 in every cell with m >= 4 (by
    3-15 %), than the 128x128 cooperative tile in every cell up to m = 128 but one (small-moe at m = 64: 0.2 %
    slower), and than 128x256 up to m = 128 except Mixtral at m = 128 (3 % slower); so bf16 does not use
    ``MEDIUM``. fp8 likewise (bench/results/moe-tile-wide-h200.json: its 64-row tiles beat its 128x128
    cooperative one at 64-85 rows per expert on Qwen3-30B and Kimi-K2 tp8). The CuTe DSL tiles keep
    ``DECODE_ROWS_OTHER`` = 32 (the DSL's 64x128 tile measured 7-18 % slower than its 128x128 at m = 64).
``DECODE_N256`` 64x256x64 ping-pong (bf16; fp8: 64x256x128, the same bytes per stage) -- half as many tiles as
    64x128 for the same weights: fewer tile switches (each a TMA descriptor update in the ptr-array kernel) and a
    wider B stream per CTA. Measured on the H200 (``scripts/tile_tune.py``; bench/results/moe-tile-tune-h200.json, 6
    shapes x 8-16384 tokens): stage 1 is 8-13 % faster than 64x128 and 128x256 from ~43 to ~340 rows per expert
    (Qwen3-235B at 2048 tokens 1.68 against 1.92 ms; Kimi-K2 ep8 at 16384 tokens 3.02 against 3.48 with 128x256),
    even or slower below ~40 rows and above ~1000 (128x256 wins there), and 4 % slower where 2 * inter_dim = 384
    pads a 256-wide tile; stage 2 (N = hidden) is up to 5 % faster than 64x128 wherever its grid has more tiles than
    SMs (Kimi-K2 tp8 at 128-512 tokens), and slower on few-expert grids (Mixtral at 16-64 tokens). Stage 2 keeps
    SMALL_K (inter_dim <= 256, above 48 rows: Kimi-K2 tp8 at 4096-16384 tokens 1.72 / 4.81 ms against 1.86 / 4.93)
    and keeps the 64x256 tile up to ``N256_MAX_S2`` = 512 rows (bench/results/moe-tile-wide-h200.json: Qwen3-30B at
    256 rows 0.742 against 0.807 ms for LARGE, Mixtral at 256 rows 0.213 against 0.229; Kimi-K2 ep8 at 341 rows
    even; Qwen3-235B at 256 rows 3 % slower), then LARGE. fp8's 64x256x128 tile (same rules; same file): stage 1
    3-9 % faster than fp8's LARGE / MEDIUM from 64 to 1024 rows on Qwen3-30B, Mixtral and Kimi-K2 tp8, stage 2 8-11 %
    faster than 64x128 at 5-21 rows on Kimi-K2 tp8 and small-moe. The CuTe DSL variant takes it for stage 2 in its
    decode range.
``WIDE``        128x192x64 cooperative (fp8: 128x192x128) -- stage 1 past the 64-row tiles' range, in LARGE's
    place where 2 * inter_dim is not a multiple of 256 and, for bf16, up to ``WIDE_MAX_ROWS`` = 1024 rows per
    expert. Measured (bench/results/moe-tile-wide-h200.json, every tile of each stage timed with the other stage
    fixed): bf16 7-9 % faster than 128x256 (cluster 2x1) on small-moe (2 * inter_dim = 384 = 2 x 192, where 256
    pads) at 256-1024 rows and on Qwen3-30B at 1024 rows, 3 % on Mixtral at 1024 rows and 3 % faster than 64x256
    on Kimi-K2 tp8 at 341 rows; slower on Mixtral at 4096 rows (4 % in the sweep; 12 % at 16384 tokens and 3 % at
    8192 in bench/results/moe-perf-vllm-wide-first-h200.json, the first bench run with it, hence the 1024-row
    cap). fp8: 5-6 % faster on small-moe, 1-4 % slower where 256 divides 2 * inter_dim (LARGE stays there). Five
    smem stages (40 KB each) against LARGE's four, no cluster.
``MEDIUM``      128x128x64 cooperative -- the DSL tiles, 32 < m <= 128 rows per expert: one M tile covers
    an expert's rows, two consumer warpgroups split it (64 rows each) so the tensor cores see 128-row work, and
    each weight tile is still read only once or twice.
``LARGE``       128x256x64 cooperative, cluster 2x1 -- m > 128 (prefill, big batches; bf16 and fp8 stage 2: above
    512 where the 64x256 tile serves; stage 1 where 2 * inter_dim is a multiple of 256 above 512 rows, for bf16
    above 1024): compute bound; the
    largest tile CUTLASS's cooperative sm90 kernel keeps in registers gives the best wgmma efficiency, and
    the 2x1 cluster multicasts each weight (B) tile to the two CTAs of neighbouring M tiles, halving weight
    traffic from L2.
``SMALL_K`` (stage 2 only) 128x128x64 ping-pong -- inter_dim <= 256 with m above the decode range (bf16:
    above ``SMALL_K_ROWS`` = 48; measured: at m = 64 and 128 on small-moe (inter_dim 192) it beats the 64x128
    and 128x128 tiles by 4-10 % (the 64x256 one is 5 % faster than it there, 7 % slower on Kimi-K2 tp8 at 4096
    tokens: it stays), at m = 21 and 43 on Kimi-K2 tp8 the 64x128 tile is better) (e.g. Kimi-K2 at tp 8:
    2048 / 8 = 256): stage 2's K is inter_dim, so each output tile has at most 4 k-blocks of math and then
    a 32 KB epilogue store; ping-pong lets one warpgroup's epilogue overlap the other warpgroup's mainloop,
    which cooperative (both warpgroups in the epilogue together) cannot. This mirrors the upstream CK
    module's "small inter_dim" stage-2 kernels (gemm2_64x*), and -- like there -- it is *only* needed for
    inter_dim <= 256: a deployment with inter_dim > 256 (Kimi-K2 at tp <= 4 or ep 8, DeepSeek-V3, Qwen3)
    never selects it, so its plan does not build it.

``SWAP16`` / ``SWAP32`` (bf16 and per-tensor fp8; not the CuTe DSL variant) 128x16x128 / 128x32x128 cooperative with
    swapped operands (fp8: K 256): the weights are the GEMM's A and an expert's rows its B (:class:`.instances._Swap`),
    so a tile spans 128 output columns and 16 or 32 rows instead of wgmma's 64-row minimum, and each smem stage is
    mostly weights. Stage 1 takes them past the weight-stream units while the expected rows per active expert are
    <= ``SWAP16_ROWS`` = 8 (16 wide) or <= ``SWAP_ROWS`` = 32 (32 wide); stage 2 the same where its K (inter_dim) is
    >= ``SWAP_MIN_K2`` = 1024. Measured on the H200 (``TILE_TUNE_SET=swap bash scripts/gpu_tile_tune.sh``,
    bench/results/moe-tile-swap-h200.json: six shapes at 16 / 64 / 256 tokens, every tile of each stage timed with
    the other fixed; 955 bf16 + 418 fp8 checks, 0 failed): stage 1 0.3-3 % faster than the 64-row tiles from 1.6 to 16
    rows per active expert on every shape (Kimi-K2 ep8 at 256 tokens 2.1 %, Mixtral at 64 tokens 3.3 %), 4-6 % faster
    than the weight-stream unit on Kimi-K2 at 16 tokens (1.17 rows); stage 2 1-2.3 % faster on Qwen3-235B and Kimi-K2
    ep8 (inter_dim 1536 / 2048), 2-7 % slower on Kimi-K2 tp8 and small-moe (inter_dim 256 / 192: a K loop of two
    k-tiles), even on Qwen3-30B (768); 16 vs 32 rows within 1 % where both fit. With them the weight-stream units'
    ranges moved (bench/results/moe-sweep-swap-h200.json, 8 / 16 / 1024 tokens, taken with a programmatic-dependent-
    launch build since removed, whose 64-row ping-pong times at 64+ rows per expert are 9-29 % slow; the comparisons
    used here are at 1-2 rows): stage 1 up to
    ``GEMV_ROWS_S1_SWAP`` = 1.05 rows (Kimi-K2 ep8 at 16 tokens, 1.17 rows: 0.281 against 0.305 ms; Qwen3-30B at 8 /
    16 tokens 3-6 %), and up to 1.6 only where an expert's W13 is small (<= ``SMALL_W13``, 1M elements: small-moe's
    0.8M, where the unit stays 13 % faster at 16 tokens); stage 2 up to ``GEMV_ROWS_S2_SWAP`` = 1.2 where the swapped
    tiles serve (Qwen3-235B at 8 tokens, 1.27 rows: 0.501 against 0.516 ms; Kimi-K2 ep8 at 1.08 / 1.17 rows stays a
    weight stream, 3 % faster there).
``GEMV`` (bf16 and per-tensor fp8, both stages; :mod:`.gemv`) -- the weight-stream units, one launch per stage with routing and
    combine inside, for decode: an active expert sees about one row, so every tile above is mostly padding and
    the CUTLASS path pays five launches around a weight stream (eight when measured). Measured on the H200
    against the tiles, stage by stage, on six shapes at 1-128 tokens (bench/results/moe-sweep-gemv-h200.json),
    with m = expected rows per *active* expert:
    (the ranges below are the CuTe DSL variant's, whose tiles have no swapped operands; bf16 and fp8 take the narrower
    ones given under SWAP16 / SWAP32 above)
    stage 1 while m <= ``GEMV_ROWS_S1`` (1.2; Kimi-K2 at 16 tokens, m = 1.17: the unit 1-3 % faster), or m <=
    ``GEMV_ROWS_S1_SHORT`` (1.6) while the tile's K loop is short (hidden <= ``SHORT_HIDDEN`` = 2048: 16 k-tiles of
    128; Qwen3-30B at m = 1.27 / 1.58: 5 / 1-4 % faster, where Qwen3-235B with hidden 4096 is 0-4 % slower), or
    m <= ``GEMV_ROWS_FEW`` (4.5) while the 64x128 tile grid would be small (active experts x 2I/128 <=
    ``FEW_TILES``: few large experts, e.g. Mixtral, or a small hidden size);
    stage 2 while m <= ``GEMV_ROWS_S2`` (1.5; its weights are re-read per token, the extra reads mostly from L2),
    or m <= ``GEMV_ROWS_S2_SHORT`` (2.0) while the tile GEMM is short (inter_dim <= 256: at most two 128-deep
    k-tiles) or its grid small (active experts x H/128 <= ``FEW_TILES``); from m ~ 2.2 (small-moe at 32 tokens,
    Mixtral at 8) the grouped unit below is 4-6 % faster (bench/results/moe-sweep-mid-h200.json,
    moe-tile-tune-h200.json).
    The GEMV stage 1 writes the same sorted rows, offsets and positions as the CUTLASS one, so either stage 1
    pairs with either stage 2. fp8 (e4m3 weights, per-expert scales) uses the same units with e4m3 MMAs (stage 1
    quantizes x with the static a_scale as the CUTLASS gather does) and the same thresholds. The CuTe DSL variant
    (``bf16-dsl``) takes the same units (built as plain CUDA by its compiler). Not for fp8b128 (its GEMMs keep
    the tiles).
``GEMV_GROUPED`` (stage 2, bf16 and fp8) -- the weight stream grouped by expert: each CTA streams 16 rows of
    W2[e] per warp against the expert's routed rows, 16 a pass, writes float32 rows, and a second launch sums a
    token's rows. It exists for small stage-2 weights at a few rows per expert, where the tile path's setup
    and GEMM launches cost more than its stream (small-moe and Mixtral at 16-128 tokens: 5-18 % faster than the
    64x128 tile; bench/results/moe-sweep-mid-h200.json): m in (the per-token unit's range, ``GROUPED_ROWS``]
    and the active experts' W2 at most ``GROUPED_ELEMS`` elements. Larger W2 (Qwen3-235B, Kimi-K2 ep8)
    streams faster through the tiles; the 32-row pass and stage-1 16/32-row passes measured slower than the
    tiles everywhere and are not candidates.

fp8 (e4m3, per-tensor activation scale, per-expert weight scale) uses the same tile shapes with K tiles
of 128 elements (128 bytes: the same swizzle atom bf16 gets from K=64) and the FP8 fast-accumulation
schedules.

fp8b128 (e4m3, DeepSeek-V3-style 128-block scales: activations 1x128 per token, weights 128x128) uses
CUTLASS's blockwise-scaling ptr-array mainloop (``KernelPtrArrayTmaWarpSpecialized*FP8Blockwise``), which
constrains the tile set, so it has three tiles per stage, not five:

* K tile = 128 (one scale block per k-tile: the mainloop rescales the partial accumulator once per tile);
* N tile a multiple of 128 (one weight scale per 128 output columns): no 64-wide N, so ``DECODE_N64`` does
  not exist here, and decode always takes ``DECODE_N128`` (64x128x128 ping-pong);
* at most 64x128 accumulators per consumer warpgroup: the mainloop keeps an unscaled partial accumulator
  next to the scaled one (2 x 64 floats per thread), so a 128x256 cooperative tile (128 + 128) or a 128x128
  ping-pong tile (also 128 + 128) would spill. ``LARGE`` is therefore 128x128x128 cooperative with a 2x1
  cluster (the same tile as ``MEDIUM``, but the two CTAs of neighbouring M tiles share each weight tile by
  TMA multicast, which is what pays at m > 128), and the small-inter_dim stage 2 (m > 32, inter_dim <= 256)
  takes the 64x128x128 ping-pong tile, the largest one in which one warpgroup's epilogue can overlap the
  other's mainloop (the reason ``SMALL_K`` exists; with bf16/fp8 it is 128x128, impossible here).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from .gemv import MoEGemv1, MoEGemv2, is_gemv
from .instances import MoEStage1, MoEStage1Swap, MoEStage2, MoEStage2Swap

SMALL_INTER_DIM = 256
"""Stage 2 uses the SMALL_K tile when inter_dim <= this (upstream CK's threshold too)."""

DECODE_ROWS = 128
"""bf16 and fp8 (CUTLASS): the 64-row ping-pong tiles up to this many rows per expert (then WIDE / LARGE; MEDIUM is
not used)."""
DECODE_ROWS_OTHER = 32
"""The CuTe DSL tiles and fp8b128: measured with 32 (the DSL's 64x128 tile at 64 rows is 7-18 % slower than its
128x128 one)."""
SMALL_K_ROWS = 48
"""bf16 (CUTLASS) stage 2 with inter_dim <= SMALL_INTER_DIM takes SMALL_K above this many rows per expert."""
MEDIUM_ROWS = 128
SM_COUNT = 132  # H100 SXM; only used to judge "enough tiles", not a correctness input
GEMV_ROWS_S1 = 1.2
"""Stage 1 is the GEMV unit while the expected rows per active expert are <= this (the CuTe DSL variant; bf16 and
fp8, whose tiles include the swapped-operand ones: GEMV_ROWS_S1_SWAP) ..."""
GEMV_ROWS_S1_SWAP = 1.05
GEMV_ROWS_S1_SHORT = 1.6
"""... or <= this while the tile's K loop is short (hidden <= SHORT_HIDDEN; with swapped-operand tiles: while an
expert's W13 is small, 2 * inter_dim * hidden <= SMALL_W13 elements) ..."""
SHORT_HIDDEN = 2048
SMALL_W13 = 1 << 20
GEMV_ROWS_FEW = 4.5
"""... or <= this while the stage's tile grid is small (<= FEW_TILES tiles)."""
GEMV_ROWS_S2 = 1.5
"""Stage 2 is the GEMV unit while the expected rows per active expert are <= this (bf16, fp8; GEMV_ROWS_S2_SWAP where
stage 2 takes the swapped-operand tiles, inter_dim >= SWAP_MIN_K2) ..."""
GEMV_ROWS_S2_SWAP = 1.2
GEMV_ROWS_S2_SHORT = 2.0
"""... or <= this while the tile GEMM is short (inter_dim <= SMALL_INTER_DIM) or its grid small."""
FEW_TILES = 3 * SM_COUNT
GROUPED_ROWS = 10
"""Stage 2 is the grouped GEMV unit while the expected rows per active expert are <= this ..."""
GROUPED_ELEMS = 128 << 20
"""... and the active experts' W2 holds at most this many elements (small stage-2 weights)."""
GEMV_DTYPES = ("bf16", "fp8")
GEMV = {(dt, st): cls(dtype=dt, warps=w, unroll=4) for dt in GEMV_DTYPES
        for st, cls, w in ((1, MoEGemv1, 8), (2, MoEGemv2, 4))}
GEMV_GROUPED = {dt: MoEGemv2(dtype=dt, warps=8, unroll=2, n=2) for dt in GEMV_DTYPES}


def _k(dtype: str, bf16_k: int) -> int:
    return bf16_k * 2 if dtype == "fp8" else bf16_k


def tiles(dtype: str) -> dict[str, dict[str, Any]]:
    """Tile parameters by role, for ``dtype``."""
    if dtype == "fp8b128":  # blockwise-scaling mainloop: K tile 128, N tile 128, <= 64x128 per warpgroup
        return {
            "DECODE_N128": dict(tile_m=64, tile_n=128, tile_k=128, schedule="pingpong"),
            "MEDIUM": dict(tile_m=128, tile_n=128, tile_k=128, schedule="cooperative"),
            "LARGE": dict(tile_m=128, tile_n=128, tile_k=128, schedule="cooperative", cluster_m=2, cluster_n=1),
        }
    out = {
        "DECODE_N64": dict(tile_m=64, tile_n=64, tile_k=128, schedule="pingpong"),
        "DECODE_N128": dict(tile_m=64, tile_n=128, tile_k=128, schedule="pingpong"),
        "MEDIUM": dict(tile_m=128, tile_n=128, tile_k=_k(dtype, 64), schedule="cooperative"),
        "LARGE": dict(tile_m=128, tile_n=256, tile_k=_k(dtype, 64), schedule="cooperative",
                      cluster_m=2, cluster_n=1),
        "SMALL_K": dict(tile_m=128, tile_n=128, tile_k=_k(dtype, 64), schedule="pingpong"),
    }
    out["DECODE_N256"] = dict(tile_m=64, tile_n=256, tile_k=_k(dtype, 64), schedule="pingpong")
    out["WIDE"] = dict(tile_m=128, tile_n=192, tile_k=_k(dtype, 64), schedule="cooperative")
    # swapped operands (weights as A): tile_m covers 128 output columns, tile_n the rows
    out["SWAP16"] = dict(tile_m=128, tile_n=16, tile_k=_k(dtype, 128), schedule="cooperative")
    out["SWAP32"] = dict(tile_m=128, tile_n=32, tile_k=_k(dtype, 128), schedule="cooperative")
    return out


SWAP_ROLES = ("SWAP16", "SWAP32")
SWAP16_ROWS = 8
"""Swapped-operand tiles: 16 rows wide up to this many expected rows per active expert ..."""
SWAP_ROWS = 32
"""... 32 wide up to this many (then the 64-row tiles)."""
SWAP_MIN_K2 = 1024
"""Stage 2 takes them only where its K (inter_dim) is at least this (short K loops measured slower with them)."""


def make(stage: int, dtype: str, r: str):
    """The instance of tile role ``r`` (not GEMV) for ``stage`` of ``dtype``."""
    cls = ((MoEStage1Swap, MoEStage2Swap) if r in SWAP_ROLES else (MoEStage1, MoEStage2))[stage - 1]
    return cls(dtype=dtype, **tiles(dtype)[r])


STAGE1_ROLES = ("SWAP16", "SWAP32", "DECODE_N64", "DECODE_N128", "DECODE_N256", "MEDIUM", "WIDE", "LARGE")
STAGE2_ROLES = ("SWAP16", "SWAP32", "DECODE_N64", "DECODE_N128", "DECODE_N256", "MEDIUM", "LARGE", "SMALL_K")
N256_ROWS_S1 = 40
"""bf16 stage 1 takes the 64x256 tile above this many rows per expert ..."""
N256_MAX_S1 = 512
"""... up to this many (then WIDE / LARGE), and only where 2 * inter_dim is a multiple of 256 (no padded columns)."""
WIDE_MAX_ROWS = 1024
"""bf16 stage 1 takes WIDE over LARGE up to this many rows per expert where 256 divides 2 * inter_dim."""
N256_MAX_S2 = 512
"""bf16 and fp8 stage 2 (inter_dim > SMALL_INTER_DIM) keep the 64x256 tile past the decode range up to this many
rows per expert (then LARGE)."""


def use_n256(stage: int, p: Mapping[str, Any], dsl: bool = False) -> bool:
    """Whether a 64-row tile (bf16, fp8) is 256 wide (see the module docstring for the measurements)."""
    m = rows_per_active_expert(p)
    n = 2 * p["inter_dim"] if stage == 1 else p["hidden"]
    # either stage: only where the 256-wide grid has more tiles than SMs (else the 128-wide tile keeps more CTAs
    # busy: Mixtral's stage 1 at 64 rows, 112 tiles of 64x256, 0.146 against 0.140 ms for 64x128)
    grid = active_experts(p) * math.ceil(m / 64) * math.ceil(n / 256) > SM_COUNT
    if stage == 1:
        return not dsl and N256_ROWS_S1 < m <= N256_MAX_S1 and n % 256 == 0 and grid
    return grid


def roles(stage: int, dtype: str, dsl: bool = False) -> list[str]:
    """The tile roles ``select`` can return for ``stage`` of ``dtype`` (with the DSL tiles' thresholds)."""
    t = tiles(dtype)
    out = [r for r in (STAGE1_ROLES if stage == 1 else STAGE2_ROLES) if r in t]
    if decode_rows(dtype, dsl) >= MEDIUM_ROWS:  # bf16, fp8 (CUTLASS): the 64-row tiles serve up to MEDIUM_ROWS
        out.remove("MEDIUM")
    if dsl and stage == 1 and "DECODE_N256" in out:
        out.remove("DECODE_N256")
    if "WIDE" in out and dsl:  # no DSL tile of 128x192
        out.remove("WIDE")
    if dsl:  # no DSL tiles with swapped operands
        out = [r for r in out if r not in SWAP_ROLES]
    return out


def wide(p: Mapping[str, Any], dtype: str) -> bool:
    """Whether stage 1 past the 64-row tiles takes WIDE (128x192) rather than LARGE (128x256, cluster 2x1): where
    2 * inter_dim is not a multiple of 256, and for bf16 also up to WIDE_MAX_ROWS rows per expert (see the module
    docstring)."""
    pads = (2 * p["inter_dim"]) % 256 != 0
    return pads or (dtype == "bf16" and rows_per_expert(p) <= WIDE_MAX_ROWS)


def decode_rows(dtype: str, dsl: bool = False) -> int:
    """Rows per expert up to which the 64-row ping-pong tiles serve (see DECODE_ROWS, DECODE_ROWS_OTHER)."""
    return DECODE_ROWS if dtype in GEMV_DTYPES and not dsl else DECODE_ROWS_OTHER


def candidates(dtype: str, gemv: bool = True, dsl: bool = False) -> list:
    """Every instance ``select`` can return for ``dtype`` (``gemv``: with the weight-stream units, bf16 and fp8;
    ``dsl``: the thresholds of the CuTe DSL tiles)."""
    out: list = [make(1, dtype, r) for r in roles(1, dtype, dsl)]
    out += [make(2, dtype, r) for r in roles(2, dtype, dsl)]
    if gemv and dtype in GEMV_DTYPES:
        out += [GEMV[(dtype, 1)], GEMV[(dtype, 2)], GEMV_GROUPED[dtype]]
    return out


def rows_per_expert(p: Mapping[str, Any]) -> float:
    return p["tokens"] * p["topk"] / (p["experts"] * p.get("ep", 1))


def active_experts(p: Mapping[str, Any]) -> float:
    """Expected local experts that receive at least one row (uniform routing)."""
    e_global = p["experts"] * p.get("ep", 1)
    picks = p["tokens"] * p["topk"]
    return p["experts"] * (1.0 - (1.0 - 1.0 / e_global) ** picks)


def rows_per_active_expert(p: Mapping[str, Any]) -> float:
    """Expected rows of an expert that has any (local routed rows / expected active local experts)."""
    return rows_per_expert(p) * p["experts"] / max(active_experts(p), 1e-9)


def use_gemv(stage: int, p: Mapping[str, Any], swap: bool = True) -> bool:
    """Whether ``stage`` takes the weight-stream unit (bf16, fp8; see the module docstring for the measurements);
    ``swap``: the tiles beside it include the swapped-operand ones (not the CuTe DSL variant's)."""
    m = rows_per_active_expert(p)
    n = 2 * p["inter_dim"] if stage == 1 else p["hidden"]
    few = active_experts(p) * math.ceil(n / 128) <= FEW_TILES
    if stage == 1:
        short = 2 * p["inter_dim"] * p["hidden"] <= SMALL_W13 if swap else p["hidden"] <= SHORT_HIDDEN
        return (m <= (GEMV_ROWS_S1_SWAP if swap else GEMV_ROWS_S1) or (short and m <= GEMV_ROWS_S1_SHORT)
                or (few and m <= GEMV_ROWS_FEW))
    s2 = GEMV_ROWS_S2_SWAP if swap and p["inter_dim"] >= SWAP_MIN_K2 else GEMV_ROWS_S2
    return m <= s2 or ((few or p["inter_dim"] <= SMALL_INTER_DIM) and m <= GEMV_ROWS_S2_SHORT)


def use_grouped(p: Mapping[str, Any]) -> bool:
    """Whether stage 2 takes the grouped weight-stream unit (see the module docstring)."""
    return (rows_per_active_expert(p) <= GROUPED_ROWS
            and active_experts(p) * p["hidden"] * p["inter_dim"] <= GROUPED_ELEMS)


def use_swap(stage: int, p: Mapping[str, Any]) -> bool:
    """Whether a stage past the weight-stream units takes a swapped-operand tile (see the module docstring)."""
    return rows_per_active_expert(p) <= SWAP_ROWS and (stage == 1 or p["inter_dim"] >= SWAP_MIN_K2)


def role(stage: int, p: Mapping[str, Any], dtype: str = "bf16", gemv: bool = True, dsl: bool = False) -> str:
    m = rows_per_expert(p)
    if gemv and dtype in GEMV_DTYPES and use_gemv(stage, p, swap=not dsl):
        return "GEMV"
    if gemv and dtype in GEMV_DTYPES and stage == 2 and use_grouped(p):
        return "GEMV_GROUPED"
    if dtype == "fp8b128":  # three tiles (see the module docstring)
        if m <= DECODE_ROWS_OTHER or (stage == 2 and p["inter_dim"] <= SMALL_INTER_DIM):
            return "DECODE_N128"
        return "MEDIUM" if m <= MEDIUM_ROWS else "LARGE"
    if "SWAP16" in roles(stage, dtype, dsl) and use_swap(stage, p):
        return "SWAP16" if rows_per_active_expert(p) <= SWAP16_ROWS else "SWAP32"
    dr = decode_rows(dtype, dsl)
    n256 = "DECODE_N256" in roles(stage, dtype, dsl)
    if n256 and stage == 1 and use_n256(1, p, dsl):  # past the decode range too (up to N256_MAX_S1)
        return "DECODE_N256"
    if stage == 2 and p["inter_dim"] <= SMALL_INTER_DIM and m > min(dr, SMALL_K_ROWS):
        return "SMALL_K"
    if m <= dr:
        if n256 and use_n256(stage, p, dsl):
            return "DECODE_N256"
        n = 2 * p["inter_dim"] if stage == 1 else p["hidden"]
        tiles128 = active_experts(p) * math.ceil(n / 128)
        return "DECODE_N128" if tiles128 > SM_COUNT // 2 else "DECODE_N64"
    if n256 and not dsl and stage == 2 and m <= N256_MAX_S2 and use_n256(2, p):
        return "DECODE_N256"
    if m <= MEDIUM_ROWS:
        return "MEDIUM"
    return "WIDE" if stage == 1 and "WIDE" in roles(1, dtype, dsl) and wide(p, dtype) else "LARGE"


def select(dtype: str, p: Mapping[str, Any], gemv: bool = True, dsl: bool = False) -> dict:
    out = {}
    for stage in (1, 2):
        r = role(stage, p, dtype, gemv, dsl)
        out[f"stage{stage}"] = (GEMV[(dtype, stage)] if r == "GEMV" else GEMV_GROUPED[dtype] if r == "GEMV_GROUPED"
                                else make(stage, dtype, r))
    return out


def role_of(inst) -> str:
    if is_gemv(inst):
        return "GEMV_GROUPED" if inst.stage == 2 and inst.n > 0 else "GEMV"
    extra = ({"occupancy": inst.occupancy, "consumers": inst.consumers} if hasattr(inst, "occupancy")
             else {})  # the DSL tiles' own fields
    for r, params in tiles(inst.dtype).items():
        if (r in SWAP_ROLES) != bool(getattr(inst, "swap", False)):
            continue
        probe = type(inst)(dtype=inst.dtype, **params, **extra)
        if probe == inst:
            return r
    raise KeyError(inst.name)
