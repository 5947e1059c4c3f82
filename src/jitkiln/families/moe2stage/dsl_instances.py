"""moe2stage instances of the variant ``bf16-dsl``: the grouped GEMM is the CuTe DSL kernel, with the same tiles,
slots, heuristic and C ABI as the CUTLASS instances; the name ends in ``_dsl`` and the parameters carry
``backend: "dsl"``, so names, digests, symbols and cache keys never collide with the CUTLASS units. The variant's
weight-stream (GEMV) units are the bf16 ones, marked the same way: the variant's compiler (``cutedsl``) builds
them as plain CUDA (a unit without a DSL kernel)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .gemv import MoEGemv1, MoEGemv2
from .instances import Marked, MoEGemm, MoEStage1, MoEStage2


class _Dsl(Marked):
    backend: ClassVar[str] = "dsl"
    mark: ClassVar[tuple[str, str, str]] = ("_dsl", "backend", "dsl")


class _DslTile(_Dsl):
    occupancy: int  # CTAs per SM of the persistent grid (2: half the pipeline stages each); a dataclass field
    # consumer warpgroups of a 64-row ping-pong tile: 1 (one warpgroup, the producer warp running ahead) or 2 (two
    # warpgroups taking turns, each its own tile, one's epilogue under the other's MMAs); a dataclass field
    consumers: int

    def __post_init__(self):
        super().__post_init__()  # type: ignore[misc]
        m, schedule = self.tile_m, self.schedule  # type: ignore[attr-defined]
        if self.consumers not in (1, 2) or (self.consumers == 2 and (m != 64 or schedule != "pingpong")):
            raise ValueError("consumers: 1, or 2 for a 64-row ping-pong DSL tile")

    @property
    def name(self) -> str:
        return (super().name + ("" if self.occupancy == 1 else f"_o{self.occupancy}")  # type: ignore[misc]
                + ("" if self.consumers == 1 else f"_w{self.consumers}"))


@dataclass(frozen=True)
class MoEStage1Dsl(_DslTile, MoEStage1):
    """Stage 1 with the CuTe DSL grouped GEMM."""

    occupancy: int = 1
    consumers: int = 1


@dataclass(frozen=True)
class MoEStage2Dsl(_DslTile, MoEStage2):
    """Stage 2 with the CuTe DSL grouped GEMM."""

    occupancy: int = 1
    consumers: int = 1


@dataclass(frozen=True)
class MoEGemv1Dsl(_Dsl, MoEGemv1):
    """Stage 1's weight-stream unit in the DSL variant (plain CUDA)."""


@dataclass(frozen=True)
class MoEGemv2Dsl(_Dsl, MoEGemv2):
    """Stage 2's weight-stream units in the DSL variant (plain CUDA)."""


_TO_DSL = {MoEStage1: MoEStage1Dsl, MoEStage2: MoEStage2Dsl, MoEGemv1: MoEGemv1Dsl, MoEGemv2: MoEGemv2Dsl}


def to_dsl(inst: MoEGemm) -> MoEGemm:
    """The DSL variant's instance of a bf16 instance (same fields; a DSL tile's own occupancy and consumers at their
    defaults)."""
    cls = _TO_DSL[type(inst)]
    return cls(**{f.name: getattr(inst, f.name) for f in dataclasses.fields(inst)})


def is_dsl(inst) -> bool:
    return getattr(inst, "backend", "") == "dsl"
