"""One AITER ck2stages module (variant x arch x AITER tree): its instances and its dispatch, read from AITER."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import ClassVar

from ...errors import JitkilnError, UsageError
from ...family import Instance
from . import cdispatch
from .aiter_tree import AiterTree, generate
from .variants import VARIANTS, Variant


@dataclass(frozen=True)
class CK2Instance(Instance):
    """One AITER CK two-stage MoE instance. ``kernel`` is AITER's own name (also the tuned-CSV key); it is not
    unique across variants or archs, so ``header`` (which CK implementation), ``variant`` and ``arch`` are fields
    too and enter the digest."""

    family: ClassVar[str] = "ck2stages"
    kernel: str
    stage: int
    targs: tuple  # normalised template arguments of ck_moe_stage{stage}_gemm<...>
    header: str
    variant: str
    arch: str

    @property
    def name(self) -> str:
        return self.kernel

    @property
    def tile(self) -> str:
        m = re.search(r"_gemm\d_(\d+x\d+x\d+x\d+)_", self.kernel)
        return m.group(1) if m else ""


@dataclass
class Pick:
    """Result of the dispatch for one (stage, block_m, inter_dim): an instance, or AITER's error message."""

    instance: CK2Instance | None = None
    error: str = ""
    targs: tuple = ()


class AiterModule:
    """One of AITER's generated ck2stages modules: its instances and its dispatch, read from AITER."""

    def __init__(self, tree: AiterTree, variant: Variant, arch: str):
        self.tree, self.variant, self.arch = tree, variant, arch
        blob = generate(tree, variant.generator_args(), arch)
        self.blob = blob
        self.lookup = cdispatch.parse_lookup(blob.lookup)
        if set(self.lookup) != set(blob.instances):
            raise JitkilnError(f"AITER's lookup table and instance files disagree for {variant.name} on {arch}",
                               hint=f"check the AITER tree at {tree.root}",
                               details=f"only in lookup: {sorted(set(self.lookup) - set(blob.instances))}; "
                                       f"only as files: {sorted(set(blob.instances) - set(self.lookup))}")
        enum_h = tree.root / "csrc" / "include" / "aiter_enum.h"
        enums = cdispatch.parse_enum(enum_h.read_text(), "QuantType") if enum_h.is_file() else {}
        if "QuantType::per_Tensor" not in enums:
            raise JitkilnError(f"cannot read QuantType from {enum_h}", hint=f"check the AITER tree at {tree.root}")
        self.enums = enums
        self.dispatch = {s: cdispatch.parse_dispatch(blob.dispatch[s], s) for s in (1, 2)}
        const_env = cdispatch.Env({}, enums)
        self.instances: list[CK2Instance] = []
        self.by_targs: dict[tuple, CK2Instance] = {}
        for kernel, (stage, args) in self.lookup.items():
            text = blob.instances[kernel]
            m = re.search(r'#include\s+"([^"]+)"', text)
            inst = CK2Instance(kernel=kernel, stage=stage, targs=cdispatch.normalize_targs(args, const_env),
                               header=m.group(1) if m else "", variant=variant.name, arch=arch)
            self.instances.append(inst)
            self.by_targs[(stage, inst.targs)] = inst
        self.instances.sort(key=lambda i: (i.stage, i.kernel))
        self.by_name = {i.kernel: i for i in self.instances}

    # --- dispatch -------------------------------------------------------------------------------------------
    def env(self, stage: int, block_m: int, inter_dim: int) -> cdispatch.Env:
        vals = self.variant.dispatch_values(stage)
        vals.update(block_m=int(block_m), inter_dim=int(inter_dim))
        return cdispatch.Env(vals, self.enums)

    def pick(self, stage: int, block_m: int, inter_dim: int) -> Pick:
        """AITER's heuristic dispatch for one call, evaluated in Python."""
        fn = self.dispatch[stage]
        missing = [n for n in fn.param_names if n not in self.env(stage, block_m, inter_dim).values]
        if missing:
            raise cdispatch._err(f"dispatch parameter(s) {missing} of stage {stage} are unknown to jitkiln")
        try:
            st, targs = cdispatch.run(fn, self.env(stage, block_m, inter_dim))
        except cdispatch.DispatchFailed as e:
            return Pick(error=str(e))
        inst = self.by_targs.get((st, targs))
        if inst is None:
            return Pick(error=f"AITER's dispatch picks ck_moe_stage{st}_gemm<{', '.join(targs)}>, which its "
                              f"generator did not write (AITER's module would not link it)", targs=targs)
        return Pick(instance=inst, targs=targs)

    def block_ms(self, stage: int) -> list[int]:
        return [b for b in cdispatch.thresholds(self.dispatch[stage], "block_m") if b > 0]

    def regular(self, stage: int) -> bool:
        """True when the dispatch only compares inter_dim with constants (its regions are intervals)."""
        return not cdispatch.used_arithmetically(self.dispatch[stage], "inter_dim")

    def inter_dim_regions(self, stage: int) -> list[tuple[int, int | None]]:
        """Intervals of inter_dim over which the dispatch cannot change its answer (``None``: unbounded)."""
        cuts = cdispatch.thresholds(self.dispatch[stage], "inter_dim")
        pts = sorted({1} | {p for t in cuts for p in (t - 1, t, t + 1) if p >= 1})
        return [(p, (pts[i + 1] - 1) if i + 1 < len(pts) else None) for i, p in enumerate(pts)]

    @functools.cached_property
    def table(self) -> list[tuple[int, int, tuple[int, int | None], Pick]]:
        """The whole heuristic as rows (stage, block_m, inter_dim interval, pick), adjacent intervals merged."""
        rows = []
        for stage in (1, 2):
            for bm in self.block_ms(stage):
                merged: list[list] = []
                for lo, hi in self.inter_dim_regions(stage):
                    p = self.pick(stage, bm, lo)
                    key = p.instance.kernel if p.instance else "!" + p.error
                    if merged and merged[-1][2] == key:
                        merged[-1][1] = hi
                    else:
                        merged.append([lo, hi, key, p])
                rows += [(stage, bm, (lo, hi), p) for lo, hi, _, p in merged]
        return rows

    def rule(self, inst: CK2Instance) -> str:
        """When the heuristic dispatch picks ``inst``, in words."""
        where = [f"block_m={bm}{_interval(iv)}" for st, bm, iv, p in self.table
                 if p.instance is not None and p.instance.digest == inst.digest]
        if not where:
            return (f"stage {inst.stage}: the heuristic dispatch never picks it; only a tuned-CSV row naming it "
                    f"reaches it")
        note = "" if self.regular(inst.stage) else " (this dispatch also tests inter_dim arithmetically)"
        return f"stage {inst.stage} dispatch picks it for " + " or ".join(where) + note


def _interval(iv: tuple[int, int | None]) -> str:
    lo, hi = iv
    if lo <= 1 and hi is None:
        return ""
    if lo <= 1:
        return f", inter_dim <= {hi}"
    if hi is None:
        return f", inter_dim > {lo - 1}"
    return f", {lo} <= inter_dim <= {hi}"


@functools.lru_cache(maxsize=64)
def get_module(tree: AiterTree, variant: str, arch: str) -> AiterModule:
    if variant not in VARIANTS:
        raise UsageError(f"unknown ck2stages variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return AiterModule(tree, VARIANTS[variant], arch)
