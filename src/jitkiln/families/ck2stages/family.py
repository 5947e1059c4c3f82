"""The ck2stages family: AITER's CK two-stage MoE modules, planned per shape instead of compiled whole."""
from __future__ import annotations

import ctypes
import os
from typing import Any, Mapping, Sequence

from ...errors import UsageError
from ...family import CAbi, CompileSpec, Family, Instance, Option, Problem, ShapeKey, register
from . import fmoe
from .aiter_tree import AiterTree, find_tree
from .module import AiterModule, CK2Instance, get_module
from .render import check_buildable, compile_spec, render_unit
from .variants import ARCHS, VARIANTS

# int launch(stream, tokens, sorted_size, N, K, topk, a, w1, w2, sorted_token_ids, sorted_expert_ids,
#            sorted_weights, num_valid_ids, out, w_scale, a_scale): AITER's ck_moe_stage{1,2}_gemm arguments
CK2_ABI = CAbi(argtypes=(ctypes.c_void_p,) + (ctypes.c_int,) * 5 + (ctypes.c_void_p,) * 10,
               doc="int f(hipStream_t, tokens, sorted_size, N, K, topk, a, w1, w2, sorted_token_ids, "
                   "sorted_expert_ids, sorted_weights, num_valid_ids, out, w_scale, a_scale); 0 on success")

EXTRA_KEYS = ("token", "model_dim", "expert", "topk", "kernel_name1", "kernel_name2")


def default_arch() -> str:
    a = os.environ.get("JITKILN_ARCH") or (os.environ.get("GPU_ARCHS", "").split(";")[-1].strip() or "gfx950")
    return a


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UsageError(f"unknown arch {arch!r} for ck2stages; choose one of: {', '.join(ARCHS)}")
    return arch


@register
class CK2Stages(Family):
    name = "ck2stages"
    doc = ("AITER's CK two-stage MoE GEMMs (composable_kernel), instances and dispatch read from the AITER "
           "tree: --aiter-root / JITKILN_AITER_ROOT, else the installed amd-aiter")
    shape_keys = (ShapeKey("inter_dim", int, "MoE intermediate size per rank (stage-2 K)"),
                  ShapeKey("block_m", int, "tokens per tile (AITER's block_size_M)"))
    abi = CK2_ABI
    full_when_no_problems = True
    options = (Option("--aiter-root", "ck2stages: the AITER tree to plan from (default: $JITKILN_AITER_ROOT, "
                                      "else the installed amd-aiter)"),)

    def __init__(self, aiter_root: str | None = None, arch: str | None = None):
        self._root = aiter_root
        self._tree: AiterTree | None = None
        self.arch = check_arch(arch or default_arch())

    # --- configuration ----------------------------------------------------------------------------------------
    def configure(self, *, aiter_root: str | None = None, arch: str | None = None) -> "CK2Stages":
        if aiter_root is not None and aiter_root != self._root:
            self._root, self._tree = aiter_root, None
        if arch is not None:
            self.arch = check_arch(arch)
        return self

    @property
    def tree(self) -> AiterTree:
        if self._tree is None:
            self._tree = find_tree(self._root)
        return self._tree

    def module(self, variant: str, arch: str | None = None) -> AiterModule:
        return get_module(self.tree, self.check_variant(variant), check_arch(arch or self.arch))

    # --- the declaration ----------------------------------------------------------------------------------------
    def variants(self) -> Sequence[str]:
        return list(VARIANTS)

    def candidates(self, variant: str) -> Sequence[Instance]:
        return list(self.module(variant).instances)

    def _resolve(self, variant: str, problem: Problem) -> fmoe.Resolved:
        v = VARIANTS[self.check_variant(variant)]
        tuned = fmoe.load_tuned(self.tree) if "token" in problem else {}
        return fmoe.resolve(dict(problem), v, self.arch, tuned)

    def select(self, variant: str, problem: Problem) -> Mapping[str, Instance]:
        mod = self.module(variant)
        res = self._resolve(variant, problem)
        out: dict[str, Instance] = {}
        for stage in res.stages:
            name = res.kernels.get(stage)
            if name and name in mod.by_name:  # AITER's moe_dispatch: a named kernel first ...
                out[f"stage{stage}"] = mod.by_name[name]
                continue
            pick = mod.pick(stage, res.block_m, problem["inter_dim"])  # ... else the heuristic dispatch
            if pick.instance is None:
                raise UsageError(f"ck2stages {variant} on {self.arch}: no stage-{stage} kernel for "
                                 f"block_m={res.block_m}, inter_dim={problem['inter_dim']}: {pick.error}",
                                 hint=f"AITER's dispatch supports block_m in {mod.block_ms(stage)} for this module")
            out[f"stage{stage}"] = pick.instance
        return out

    def provenance(self, variant: str, problems: Sequence[Problem]) -> dict[str, str]:
        """Per planned instance, the rule(s) that brought it in: a tuned-CSV row or the heuristic."""
        why: dict[str, list[str]] = {}
        for p in problems:
            res = self._resolve(variant, p)
            for slot, inst in self.select(variant, p).items():
                stage = int(slot[-1])
                if res.kernels.get(stage) == inst.name:
                    r = f"{res.why}: names it"
                else:
                    r = (f"{res.why}; heuristic dispatch stage {stage}, block_m={res.block_m}, "
                         f"inter_dim={p['inter_dim']}")
                lst = why.setdefault(inst.name, [])
                if r not in lst:
                    lst.append(r)
        return {k: (v[0] if len(v) == 1 else f"{v[0]} (+{len(v) - 1} more shapes)") for k, v in why.items()}

    def rule(self, variant: str, instance: Instance) -> str:
        return self.module(variant).rule(instance)  # type: ignore[arg-type]

    def render(self, instance: Instance) -> str:
        assert isinstance(instance, CK2Instance)
        return render_unit(self.module(instance.variant, instance.arch), instance)

    def compile_spec(self, variant: str, arch: str | None = None) -> CompileSpec:
        if arch is not None:
            self.arch = check_arch(arch)  # the planner names the arch here; candidates follow it
        return compile_spec(self.module(variant), self.arch)

    def check_buildable(self, spec: CompileSpec) -> None:
        check_buildable(spec)

    # --- problems ---------------------------------------------------------------------------------------------
    def problems(self, variant: str, *, shapes: Sequence[Problem] = (), model: str | None = None,
                 tp: int = 1, ep: int = 1, tokens: Sequence[int] | None = None) -> list[Problem]:
        out: list[Problem] = [self.check_problem(p) for p in shapes]
        if model is not None:
            if tokens is None:
                raise UsageError("--model needs --tokens (e.g. --tokens 1-8192)")
            dims = fmoe.model_shapes(model, tp, ep)
            out += [{"token": t, **dims} for t in fmoe.token_buckets(tokens)]
        elif tokens is not None:
            raise UsageError("--tokens needs --model CONFIG (the MoE dimensions come from it)")
        return out

    def check_problem(self, problem: Problem) -> dict[str, Any]:
        known = {k.name for k in self.shape_keys} | set(EXTRA_KEYS)
        out: dict[str, Any] = {}
        for k, v in problem.items():
            if k not in known:
                raise UsageError(f"unknown shape key {k!r} for ck2stages; known keys: {', '.join(sorted(known))}")
            if k.startswith("kernel_name"):
                out[k] = str(v)
                continue
            try:
                out[k] = int(v)
            except (TypeError, ValueError):
                raise UsageError(f"shape key {k}={v!r} is not an integer") from None
            if out[k] <= 0:
                raise UsageError(f"shape key {k}={v!r} must be positive")
        need = ("inter_dim", "token", "model_dim", "expert", "topk") if "token" in out else ("inter_dim", "block_m")
        missing = [k for k in need if k not in out]
        if missing:
            raise UsageError(f"ck2stages shape lacks {', '.join(missing)}",
                             hint="give --shape inter_dim=1024,block_m=128 (or token,model_dim,inter_dim,expert,"
                                  "topk for AITER's own block_m choice)")
        return out

    def describe_problems(self, problems: Sequence[Problem]) -> str:
        if not problems:
            return "no shapes were planned"
        parts = []
        for key in ("inter_dim", "block_m", "token", "expert", "topk"):
            vals = sorted({p[key] for p in problems if key in p})
            if not vals:
                continue
            if len(vals) == 1:
                parts.append(f"{key} = {vals[0]} for every shape")
            elif len(vals) <= 6:
                parts.append(f"{key} in {{{', '.join(map(str, vals))}}}")
            else:
                parts.append(f"{key} in {vals[0]}..{vals[-1]} ({len(vals)} values)")
        return "; ".join(parts)
