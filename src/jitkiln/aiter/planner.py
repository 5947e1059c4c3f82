"""Plans for the AITER front end: AITER's own choice of CK stages per shape, and the reduced blob.

``AiterCK2Stages`` is the ck2stages family with one change that follows AITER's runtime (``get_2stage_cfgs`` in
``aiter/fused_moe.py``): a tuned-CSV row whose kernel name is not a CK two-stage kernel (FlyDSL ``flydsl_*``,
the MXFP4 port ``flydsl_mxmoe_g*``, ck-tile ``cktile_*``, Opus ``opus_*``, or any other non-``ck2stages`` stage-1
name in a tree that routes those to its assembly stage 1) makes that stage run *outside* ck2stages, so it needs no
ck2stages instance. The base family takes such names for missing CK names and falls back to the heuristic with the
row's ``block_m`` (e.g. 16), which fails (``no stage-1 kernel for block_m=16``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import JitkilnError, UsageError
from ..families.ck2stages import fmoe
from ..families.ck2stages.blob import (
    MANIFEST,
    dispatch_header,
    lookup_header,
    parse_shape,
)
from ..families.ck2stages.family import CK2Stages
from ..tokens import parse_tokens

POLICIES = ("full", "error")
ERROR_FILE = "jitkiln_blob_error.txt"  # written by the blob command on failure, read by the build guard


def blob_command(spec_path) -> str:
    """jitkiln's blob writer as AITER's ``blob_gen_cmd`` (AITER runs ``python <cmd with {} = blob dir>``)."""
    return f"-m jitkiln.aiter.blobcmd --spec {spec_path} -w {{}}"
NON_CK_PREFIXES = {1: ("flydsl_", "opus_moe1_", "opus_"), 2: ("flydsl_", "cktile_", "opus_")}


def _tree_routes_named_stage1_to_asm(root: str) -> bool:
    """Recent AITER sends a non-empty, non-``ck2stages`` kernelName1 to its assembly stage 1 (``(kernelName1 and
    "ck2stages" in kernelName1) or (not kernelName1 and ...)``); older AITER (0.1.7) sends it to CK, whose lookup
    misses and falls back to the heuristic dispatch."""
    for cand in (Path(root) / "aiter" / "fused_moe.py", Path(root).parent / "aiter" / "fused_moe.py"):
        if cand.is_file():
            text = cand.read_text(errors="replace")
            return bool(re.search(r"not\s+kernelName1\s*\n?\s*and", text))
    return False


def stage_engine(stage: int, name: str, named_stage1_to_asm: bool) -> str:
    """Which engine AITER runs a stage on for a tuned kernel name: 'ck2stages' or what else (with the name)."""
    if not name:
        return "ck2stages"
    if name.startswith("flydsl_mxmoe_g"):
        return "FlyDSL MXFP4 port"
    for p in NON_CK_PREFIXES[stage]:
        if name.startswith(p):
            return {"flydsl_": "FlyDSL", "cktile_": "ck-tile"}.get(p, "Opus")
    if "ck2stages" in name:
        return "ck2stages"
    if stage == 1 and named_stage1_to_asm:
        return "assembly stage 1"
    return "ck2stages"


class AiterCK2Stages(CK2Stages):
    """ck2stages as AITER's runtime uses it (not registered: the plain family stays the registered one)."""

    def _resolve(self, variant: str, problem) -> fmoe.Resolved:
        res = super()._resolve(variant, problem)
        if "token" not in problem or not res.kernels:
            return res
        asm1 = _tree_routes_named_stage1_to_asm(str(self.tree.root))
        names = dict(res.kernels)
        if any(n.startswith("flydsl_mxmoe_g") for n in names.values()):
            return fmoe.Resolved(res.block_m, (), {}, f"{res.why}; the FlyDSL MXFP4 port runs both stages "
                                                      "(no ck2stages instance)")
        stages, kernels, notes = [], {}, []
        for s in res.stages:
            eng = stage_engine(s, names.get(s, ""), asm1)
            if eng == "ck2stages":
                stages.append(s)
                if names.get(s):
                    kernels[s] = names[s]
            else:
                notes.append(f"stage {s} runs {eng} ({names.get(s)})")
        why = res.why + ("; " + "; ".join(notes) if notes else "")
        return fmoe.Resolved(res.block_m, tuple(stages), kernels, why)


# --- the spec: everything needed to (re)write the reduced blob and name the module ------------------------

@dataclass
class Spec:
    variant: str
    arch: str
    aiter_root: str
    problems: list = field(default_factory=list)
    policy: str = "full"
    module_key: str = ""
    instances: list = field(default_factory=list)
    unused: list = field(default_factory=list)
    generator_args: list = field(default_factory=list)
    generator_fingerprint: str = ""
    aiter_version: str = ""
    plan: dict = field(default_factory=dict)  # the plan arguments as given (model, tp, ep, tokens, shapes)

    @property
    def suffix(self) -> str:
        return f"jk{self.module_key[:12]}"

    def md_name(self, stock: str) -> str:
        return f"{stock}_{self.suffix}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"

    @classmethod
    def load(cls, path) -> Spec:
        try:
            d = json.loads(Path(path).read_text())
            return cls(**d)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"cannot read jitkiln AITER spec {path}: {e}") from None


def module_key(fam: AiterCK2Stages, variant: str, instances) -> str:
    """The reduced module's identity (its md_name suffix): variant, arch, the AITER tree's generator fingerprint
    and the planned instances' digests; distinct from AITER's stock module by construction (a suffix)."""
    h = hashlib.sha256()
    for part in ("jitkiln-aiter-reduced-module-v1", variant, fam.arch, fam.tree.fingerprint,
                 *sorted(i.digest for i in instances)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def plan_problems(fam: AiterCK2Stages, variant: str, plan: dict) -> list[dict]:
    shapes = plan.get("shapes") or []
    shapes = [parse_shape(s) if isinstance(s, str) else dict(s) for s in shapes]
    tokens = plan.get("tokens")
    if isinstance(tokens, str):
        tokens = parse_tokens(tokens)
    return fam.problems(variant, shapes=shapes, model=plan.get("model"), tp=int(plan.get("tp") or 1),
                        ep=int(plan.get("ep") or 1), tokens=tokens)


def choose(fam: AiterCK2Stages, variant: str, problems: Sequence[dict]):
    """The planned instances and the exact (stage, block_m, inter_dim, inst) picks, as write_blob computes them."""
    mod = fam.module(variant)
    seen: dict[str, Any] = {}
    exact = []
    for p in problems:
        res = fam._resolve(variant, p)
        for slot, inst in fam.select(variant, p).items():
            seen.setdefault(inst.digest, inst)
            if mod.pick(int(slot[-1]), res.block_m, p["inter_dim"]).instance == inst:
                exact.append((int(slot[-1]), res.block_m, p["inter_dim"], inst))
    return sorted(seen.values(), key=lambda i: (i.stage, i.kernel)), exact


def make_spec(fam: AiterCK2Stages, variant: str, plan: dict, policy: str = "full") -> Spec:
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r} for jitkiln.aiter; choose one of: {', '.join(POLICIES)}")
    variant = fam.check_variant(variant)
    problems = [fam.check_problem(p) for p in plan_problems(fam, variant, plan)]
    if not problems:
        raise UsageError("jitkiln.aiter needs the deployment's shapes: a model (model=, tp=, tokens=) or shapes=",
                         hint="e.g. jitkiln.aiter.enable(model='kimi-k2', tp=4, tokens='1-8192')")
    chosen, _ = choose(fam, variant, problems)
    mod = fam.module(variant)
    key = module_key(fam, variant, chosen)
    return Spec(variant=variant, arch=fam.arch, aiter_root=str(fam.tree.root), problems=problems, policy=policy,
                module_key=key, instances=[i.kernel for i in chosen],
                unused=[i.kernel for i in mod.instances if i.kernel not in {c.kernel for c in chosen}],
                generator_args=list(mod.variant.generator_args()), generator_fingerprint=fam.tree.fingerprint,
                aiter_version=fam.tree.version, plan=dict(plan))


def write_reduced_blob(spec: Spec, out_dir) -> dict:
    """Write the reduced module of ``spec`` in AITER's blob layout (what ``write_blob`` writes, with AITER's
    runtime choice of stages); refuses when the AITER tree no longer gives the spec's module key."""
    fam = AiterCK2Stages(aiter_root=spec.aiter_root, arch=spec.arch)
    mod = fam.module(spec.variant)
    chosen, exact = choose(fam, spec.variant, spec.problems)
    key = module_key(fam, spec.variant, chosen)
    if key != spec.module_key:
        raise JitkilnError(f"the AITER tree {spec.aiter_root} now gives module key {key[:12]}, not the planned "
                           f"{spec.module_key[:12]} (AITER changed since jitkiln.aiter.enable)",
                           hint="restart the process so that jitkiln plans against the AITER that runs")
    label = f"{spec.variant}/{spec.arch}/reduced/{key[:12]}"
    out = Path(out_dir)
    (out / "instances").mkdir(parents=True, exist_ok=True)
    names = [i.kernel for i in chosen]
    for p in (out / "instances").glob("*.cu"):
        if p.stem not in names:
            p.unlink()
    for k in names:
        (out / "instances" / f"{k}.cu").write_text(mod.blob.instances[k])
    planned_for = fam.describe_problems(spec.problems).replace('"', "'")
    (out / "gemm_moe_ck2stages_lookup.h").write_text(lookup_header(mod, names))
    for s in (1, 2):
        (out / f"ck2stages_moe_stage{s}_heuristic_dispatch.hpp").write_text(
            dispatch_header(mod, s, set(names), label, planned_for, sorted(set(exact), key=str)))
    manifest = {"family": "ck2stages", "variant": spec.variant, "arch": spec.arch, "module": "reduced",
                "module_key": key, "md_name_suffix": spec.suffix,
                "aiter": {"root": spec.aiter_root, "version": fam.tree.version,
                          "generator_fingerprint": fam.tree.fingerprint, "generator_args": spec.generator_args},
                "instances": names, "unused": [i.kernel for i in mod.instances if i.kernel not in names],
                "problems": spec.problems}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def spec_dir() -> Path:
    from ..store import default_root
    d = default_root() / "aiter" / "specs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_spec(spec: Spec) -> Path:
    text = spec.to_json()
    p = spec_dir() / f"{spec.module_key[:16]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.json"
    if not p.exists():
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    return p
