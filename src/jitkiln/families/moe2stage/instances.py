"""The two instance kinds of moe2stage: a stage-1 unit and a stage-2 unit (each one grouped GEMM config).

Each kind has its own launcher ABI (``abi`` class attribute); see :mod:`.templates` for the argument meaning.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

from ...family import CAbi, Instance

_p = ctypes.c_void_p
_i = ctypes.c_int

STAGE1_ABI = CAbi(
    argtypes=(_p, _p, _p, _p,  # x, topk_ids, topk_w, w13
              _p, _p, _p,  # act_out, expert_offsets, sorted_pos
              _i, _i, _i, _i, _i, _i,  # T, topk, E, H, I, activation
              _p, _p, _p,  # a_scale, w13_scale, a2_scale
              _p, ctypes.POINTER(ctypes.c_size_t), _p),  # workspace, workspace_bytes, stream
    restype=ctypes.c_int,
    doc="int f(x, topk_ids, topk_w, w13, act_out, expert_offsets, sorted_pos, T, topk, E, H, I, activation, "
        "a_scale, w13_scale, a2_scale, workspace, size_t* workspace_bytes, stream); workspace=NULL: size query",
)

STAGE2_ABI = CAbi(
    argtypes=(_p, _p, _p, _p, _p,  # act, w2, out, expert_offsets, sorted_pos
              _i, _i, _i, _i, _i,  # T, topk, E, H, I
              _p, _p,  # a2_scale, w2_scale
              _p, ctypes.POINTER(ctypes.c_size_t), _p),  # workspace, workspace_bytes, stream
    restype=ctypes.c_int,
    doc="int f(act, w2, out, expert_offsets, sorted_pos, T, topk, E, H, I, a2_scale, w2_scale, workspace, "
        "size_t* workspace_bytes, stream); workspace=NULL: size query",
)

SCHEDULES = ("pingpong", "cooperative")
DTYPES = ("bf16", "fp8", "fp8b128")
BLOCK = 128  # fp8b128: scale block (activations 1x128 per token, weights 128x128)


@dataclass(frozen=True)
class MoEGemm(Instance):
    """One grouped-GEMM configuration of one stage (CUTLASS sm90 ptr-array, TMA warp-specialized)."""

    family: ClassVar[str] = "moe2stage"
    stage: ClassVar[int] = 0
    swap: ClassVar[bool] = False  # operands swapped (weights as the GEMM's A): the _Swap classes below

    dtype: str  # element type of A and B: bf16 | fp8 (e4m3, per-tensor scales) | fp8b128 (e4m3, 128-block scales)
    tile_m: int
    tile_n: int
    tile_k: int
    schedule: str  # pingpong | cooperative
    cluster_m: int = 1
    cluster_n: int = 1

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {DTYPES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} not in {SCHEDULES}")
        if self.schedule == "cooperative" and self.tile_m < 128:
            raise ValueError("the cooperative schedule splits M over two warpgroups: tile_m >= 128")
        if self.dtype == "fp8b128":
            # CUTLASS's blockwise mainloop: K tile = the scale block along K, N tile a multiple of the weight
            # scale block along N (one scale per 128 output columns), at most 64x128 accumulators per warpgroup
            # (it keeps an unscaled partial accumulator beside the scaled one: 2 x 64 registers per thread)
            if self.tile_k != BLOCK or self.tile_n % BLOCK:
                raise ValueError(f"fp8b128 needs tile_k == {BLOCK} and tile_n a multiple of {BLOCK}")
            per_wg_m = self.tile_m // 2 if self.schedule == "cooperative" else self.tile_m
            if per_wg_m * self.tile_n > 64 * 128:
                raise ValueError("fp8b128: at most 64x128 accumulators per consumer warpgroup (registers)")

    @property
    def name(self) -> str:
        return (f"moe2stage_s{self.stage}_{self.dtype}_{self.tile_m}x{self.tile_n}x{self.tile_k}_"
                f"{self.schedule}_c{self.cluster_m}x{self.cluster_n}")

    def params(self):
        d = super().params()
        d["stage"] = self.stage
        return d

    @property
    def tile(self) -> str:
        return f"{self.tile_m}x{self.tile_n}x{self.tile_k} {self.schedule} cluster {self.cluster_m}x{self.cluster_n}"


@dataclass(frozen=True)
class MoEStage1(MoEGemm):
    """Routing (count, scan, gather) + grouped GEMM x·W13ᵀ + act(gate)·up·w; slot ``stage1``."""

    stage: ClassVar[int] = 1
    abi: ClassVar[CAbi] = STAGE1_ABI


@dataclass(frozen=True)
class MoEStage2(MoEGemm):
    """Grouped GEMM act·W2ᵀ + top-k combine into the output; slot ``stage2``."""

    stage: ClassVar[int] = 2
    abi: ClassVar[CAbi] = STAGE2_ABI


class Marked:
    """A mixin marking a kind of instance of one of the classes here: ``mark`` = (name suffix, parameter, value), so
    names, digests, symbols and cache keys never collide with the plain kind's."""

    mark: ClassVar[tuple[str, str, str]]

    @property
    def name(self) -> str:
        return super().name + self.mark[0]  # type: ignore[misc]

    def params(self):
        d = super().params()  # type: ignore[misc]
        d[self.mark[1]] = self.mark[2]
        return d


class _Swap(Marked):
    """Swapped operands (bf16, fp8): the weights are the GEMM's A and an expert's routed rows its B, so the problem
    per expert is (N, M_e, K) and ``tile_n`` is the rows tile, which can be as small as wgmma's N allows (8-256 in
    steps of 8) instead of wgmma's M of 64: at a few rows per expert the tile is not mostly padding, its smem stage
    is mostly weights (more of them in flight), and its output is written column-major ([rows, N] in memory, as
    the plain tiles write it). The name ends in ``_swap`` and the parameters carry ``operands: "swap"``."""

    swap: ClassVar[bool] = True
    mark: ClassVar[tuple[str, str, str]] = ("_swap", "operands", "swap")

    def __post_init__(self):
        super().__post_init__()  # type: ignore[misc]
        if self.dtype not in ("bf16", "fp8"):  # type: ignore[attr-defined]
            raise ValueError("swapped-operand tiles are bf16 or fp8 (fp8b128's blockwise scales are not symmetric)")
        n = self.tile_n  # type: ignore[attr-defined]
        if n % 8 or not 8 <= n <= 256:
            raise ValueError(f"swapped-operand tiles: tile_n (the rows tile) must be 8-256 in steps of 8, got {n}")


@dataclass(frozen=True)
class MoEStage1Swap(_Swap, MoEStage1):
    """Stage 1 with swapped operands (see :class:`_Swap`)."""


@dataclass(frozen=True)
class MoEStage2Swap(_Swap, MoEStage2):
    """Stage 2 with swapped operands (see :class:`_Swap`)."""
