"""moe2stage instances whose grouped GEMM is the CuTe DSL kernel (variant ``bf16-dsl``): the same tiles, slots,
heuristic and C ABI as the CUTLASS instances; the name ends in ``_dsl`` and the parameters carry
``backend: "dsl"``, so names, digests, symbols and cache keys never collide with the CUTLASS units."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .instances import MoEGemm, MoEStage1, MoEStage2


class _Dsl:
    backend: ClassVar[str] = "dsl"

    @property
    def name(self) -> str:
        return super().name + "_dsl"  # type: ignore[misc]

    def params(self):
        d = super().params()  # type: ignore[misc]
        d["backend"] = "dsl"
        return d


@dataclass(frozen=True)
class MoEStage1Dsl(_Dsl, MoEStage1):
    """Stage 1 with the CuTe DSL grouped GEMM."""


@dataclass(frozen=True)
class MoEStage2Dsl(_Dsl, MoEStage2):
    """Stage 2 with the CuTe DSL grouped GEMM."""


def to_dsl(inst: MoEGemm) -> MoEGemm:
    """The DSL instance of a CUTLASS instance's tile (same fields)."""
    cls = MoEStage1Dsl if inst.stage == 1 else MoEStage2Dsl
    return cls(**{f.name: getattr(inst, f.name) for f in dataclasses.fields(inst)})


def is_dsl(inst) -> bool:
    return getattr(inst, "backend", "") == "dsl"
