"""The ``moe2stage`` family: two-stage fused MoE on Hopper from CUTLASS 3.x ptr-array grouped GEMM."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from ...cutlass import cutlass_include_dirs
from ...errors import ToolchainNotFound, UsageError
from ...family import CompileSpec, Family, Instance, Packer, Problem, ShapeKey, register
from . import heuristic, rules
from .dsl_instances import is_dsl, to_dsl
from .dsl_templates import render_cuda_unit, render_dsl_unit
from .gemv import MoEGemv, is_gemv, render_gemv
from .instances import BLOCK, MoEGemm
from .shapes import MoEShape
from .templates import render_unit
from .torch_ops import torch_moe

VARIANTS = {
    # variant -> element dtype of the GEMM operands
    "bf16": "bf16",
    "fp8": "fp8",  # e4m3, per-tensor activation scale, per-expert weight scale
    "fp8b128": "fp8b128",  # e4m3, 128-block scales: activations 1x128 per token, weights 128x128 (DeepSeek-V3)
    "bf16-dsl": "bf16",  # bf16 with the grouped GEMM from the CuTe DSL kernel (dsl_gemm.py, compiler cutedsl)
}
DSL_VARIANTS = {"bf16-dsl"}


def _cutlass_or_none() -> tuple[str, ...]:
    try:
        return tuple(cutlass_include_dirs())
    except ToolchainNotFound:
        return ()


_JK = re.compile(r"\bjk\b")


def _pack(units: Sequence) -> str:
    """moe2stage units keep everything in namespace ``jk``: each member's copy is renamed ``jk<digest12>``;
    the CUTLASS headers are include-guarded, so they are read once."""
    if any(is_dsl(u.instance) for u in units):
        return None  # a CuTe DSL unit is one kernel module compile: never packed
    parts = [f"// jitkiln pack: {', '.join(u.instance.name for u in units)}"]
    for u in units:
        parts.append(f"// ---- member {u.instance.name}\n" + _JK.sub(f"jk{u.instance.digest[:12]}", u.source))
    return "\n".join(parts)


@register
class MoE2Stage(Family):
    name = "moe2stage"
    doc = ("Two-stage fused MoE for Hopper (sm_90a): stage 1 = GPU routing + grouped GEMM x.W13^T + "
           "act(gate)*up*w; stage 2 = grouped GEMM act.W2^T + top-k combine. CUTLASS ptr-array kernels.")
    shape_keys = (
        ShapeKey("tokens", int, "batch tokens (rows of hidden_states)"),
        ShapeKey("hidden", int, "model width (K of stage 1, N of stage 2)"),
        ShapeKey("inter_dim", int, "per-rank expert intermediate size (moe_intermediate_size / tp)"),
        ShapeKey("experts", int, "local experts on this rank"),
        ShapeKey("topk", int, "experts per token"),
        ShapeKey("ep", int, "expert-parallel degree (default 1); local experts are experts / ep of the model"),
    )
    OPTIONAL_KEYS = {"ep": 1}
    # measured (CUTLASS 4.2, nvcc 13.0, 2 cores): 4 tile configs in one unit 65 s vs 4 x 34 s (0.70);
    # 2 instances 83.6 s vs 72.3 + 74.3 s, peak 4.4 GiB vs 3.4 (0.87; bench/results/instance-cost-2cores-ci.json)
    packer = Packer(_pack, shared_fraction=0.8, memory_growth=0.3)

    def variants(self) -> Sequence[str]:
        return list(VARIANTS)

    def candidates(self, variant: str) -> Sequence[Instance]:
        dsl = self.check_variant(variant) in DSL_VARIANTS
        out = heuristic.candidates(VARIANTS[variant], dsl=dsl)
        return [to_dsl(i) for i in out] if dsl else out

    def select(self, variant: str, problem: Problem) -> Mapping[str, Instance]:
        p = self.check_problem(problem)
        dtype = VARIANTS[self.check_variant(variant)]
        if dtype == "fp8b128" and (p["hidden"] % BLOCK or p["inter_dim"] % BLOCK):
            raise UsageError(f"variant fp8b128 needs hidden={p['hidden']} and inter_dim={p['inter_dim']} to be "
                             f"multiples of {BLOCK} (the scale block)")
        chosen = heuristic.select(dtype, p, dsl=variant in DSL_VARIANTS)
        if variant in DSL_VARIANTS:
            return {slot: to_dsl(i) for slot, i in chosen.items()}
        return chosen

    def rule(self, variant: str, instance: Instance) -> str:
        assert isinstance(instance, (MoEGemm, MoEGemv))
        return rules.rule(instance)

    def render(self, instance: Instance) -> str:
        if is_gemv(instance):
            return render_cuda_unit(instance.name, render_gemv(instance)) if is_dsl(instance) else render_gemv(instance)
        assert isinstance(instance, MoEGemm)
        if is_dsl(instance):
            return render_dsl_unit(instance)
        return render_unit(instance)

    def compile_spec(self, variant: str, arch: str | None = None) -> CompileSpec:
        arch = arch or "sm_90a"
        if arch != "sm_90a":
            raise UsageError(f"moe2stage targets sm_90a only (wgmma, TMA); got arch {arch!r}")
        if variant in DSL_VARIANTS:  # the GEMM from the CuTe DSL; the glue is plain CUDA (no CUTLASS headers)
            return CompileSpec(toolchain="cutedsl", arch="sm_90a", flags=("-DNDEBUG",),
                               include_dirs=(os.path.dirname(os.path.abspath(__file__)),))
        return CompileSpec(
            toolchain="nvcc",
            arch="sm_90a",
            # the toolchain adds -std=c++17 -O3 -shared -fPIC and -gencode for sm_90a
            flags=("-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                   "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1", "-Xptxas=-warn-spills"),
            include_dirs=_cutlass_or_none(),  # planning needs no headers (they key entries, not plans)
        )

    def check_buildable(self, spec: CompileSpec) -> None:
        if spec.toolchain == "cutedsl":
            return  # the compiler's find() names the missing package (nvidia-cutlass-dsl) and its version
        if not spec.include_dirs:
            cutlass_include_dirs()  # raises: CUTLASS headers not found, and the pip command

    # --- problems ---------------------------------------------------------------------------------
    def check_problem(self, problem: Problem) -> dict[str, Any]:
        p = dict(problem)
        for k, v in self.OPTIONAL_KEYS.items():
            p.setdefault(k, v)
        out = super().check_problem(p)
        for k in ("tokens", "hidden", "inter_dim", "experts", "topk", "ep"):
            if out[k] < 1:
                raise UsageError(f"shape key {k}={out[k]} must be >= 1")
        if out["hidden"] % 16 or out["inter_dim"] % 16:
            raise UsageError(f"hidden={out['hidden']} and inter_dim={out['inter_dim']} must be multiples of 16")
        if out["topk"] > out["experts"] * out["ep"]:
            raise UsageError(f"topk={out['topk']} exceeds the model's {out['experts'] * out['ep']} experts")
        return out

    def problems(self, variant: str, *, shapes: Sequence[Problem] = (), model: str | None = None,
                 tp: int = 1, ep: int = 1, tokens: Sequence[int] | None = None) -> list[Problem]:
        self.check_variant(variant)
        out: list[Problem] = [self.check_problem(p) for p in shapes]
        if model is not None:
            shape = MoEShape.from_hf_config(model, tp=tp, ep=ep)
            if not tokens:
                raise UsageError("--model needs --tokens (e.g. --tokens 1-8192: the batch sizes a server captures)")
            out += [shape.problem(t) for t in sorted(set(int(t) for t in tokens))]
        elif tokens and not shapes:
            raise UsageError("--tokens needs --model (a shipped example or a config.json path)")
        if not out:
            raise UsageError("moe2stage needs shapes: --model NAME|config.json --tp N --ep N --tokens 1-8192, "
                             "or --shape tokens=..,hidden=..,inter_dim=..,experts=..,topk=..")
        return out

    def describe_problems(self, problems: Sequence[Problem]) -> str:
        text = super().describe_problems(problems)
        if problems:
            small = sorted({p["inter_dim"] for p in problems if p["inter_dim"] <= heuristic.SMALL_INTER_DIM})
            if not small:
                text += (f"; inter_dim > {heuristic.SMALL_INTER_DIM} everywhere, so the small-inter_dim "
                         "stage-2 kernel is not needed")
        return text

    def fallback(self, variant: str, problem: Problem):
        """Tier 0 for the ``tiered`` policy: :func:`.torch_ops.torch_moe` (torch's grouped GEMM, no compile)."""
        return torch_moe

    # --- build hints --------------------------------------------------------------------------------
    def cost_estimate(self, instance: Instance) -> float:
        # measured: one CUTLASS sm90 ptr-array instance, nvcc 13.0, one core: ~34 s (larger tiles a bit more)
        if is_gemv(instance):  # plain CUDA, no CUTLASS headers
            return 4.0
        assert isinstance(instance, MoEGemm)
        if is_dsl(instance):  # measured (bench/results/instance-cost-cutedsl-2cores.json): ~2.5 s DSL + ~3 s glue
            return 6.0
        return 30.0 + 8.0 * (instance.tile_m * instance.tile_n) / (128 * 256)

    def memory_estimate(self, instance: Instance) -> int:
        if is_gemv(instance):
            return int(0.4 * (1 << 30))
        if is_dsl(instance):
            return int(0.6 * (1 << 30))
        return int(3.2 * (1 << 30))
