"""Plan: variant + problem shapes -> exactly the instances dispatch will pick, with a reason for every other one.

The plan runs the family's own dispatch heuristic (``Family.select``) over every planned shape, so the
instance set is what the runtime will ask for, by construction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import JitkilnError, UsageError
from .family import CompileSpec, Family, Instance, Problem, canonical_json, sha256_hex
from .toolchain import Toolchain, get_toolchain


@dataclass
class Unit:
    """One planned instance: what it is, its source, its unit key, and why it is in the plan."""

    instance: Instance
    source: str
    ukey: str
    slots: list[str] = field(default_factory=list)
    shapes: int = 0  # how many planned shapes dispatch to it
    urgent: bool = False
    why: str = ""


@dataclass
class Plan:
    family: Family
    variant: str
    spec: CompileSpec
    problems: list[Problem]
    units: list[Unit]
    unused: list[tuple[Instance, str]]
    toolchain: Toolchain | None
    toolchain_fp: str
    full: bool
    module_key: str

    @property
    def instances(self) -> list[Instance]:
        return [u.instance for u in self.units]

    def unit_for(self, instance: Instance) -> Unit | None:
        for u in self.units:
            if u.instance.digest == instance.digest:
                return u
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "variant": self.variant,
            "arch": self.spec.arch,
            "module": "full" if self.full else "reduced",
            "module_key": self.module_key,
            "toolchain": self.toolchain_fp,
            "flags": list(self.spec.flags),
            "shapes": self.family.describe_problems(self.problems) if self.problems else "(none: full module)",
            "problems": len(self.problems),
            "instances": [{"name": u.instance.name, "key": u.ukey, "digest": u.instance.digest,
                           "slots": u.slots, "shapes": u.shapes, "urgent": u.urgent,
                           **({"why": u.why} if u.why else {}),
                           "params": u.instance.params()} for u in self.units],
            "unused": [{"name": i.name, "reason": r, "digest": i.digest} for i, r in self.unused],
        }


def unit_key(family: Family, instance: Instance, source: str, toolchain_fp: str, spec: CompileSpec) -> str:
    """Everything known before compiling: family, instance, source text, compiler, flags, arch.

    Include directories enter by content (through the entry key's header digests), not by path, so two
    machines with the same headers in different places share entries.
    """
    return sha256_hex("jitkiln-unit-v1", family.name, instance.digest, source, toolchain_fp,
                      canonical_json({"arch": spec.arch, "flags": list(spec.flags), "artifact": spec.artifact,
                                      "toolchain": spec.toolchain}))


def toolchain_for(spec: CompileSpec, required: bool) -> tuple[Toolchain | None, str]:
    try:
        tc = get_toolchain(spec.toolchain)
        return tc, tc.fingerprint
    except JitkilnError:
        if required:
            raise
        return None, f"{spec.toolchain}-unavailable"


def make_plan(family: Family, variant: str | None, problems: Sequence[Problem], *, arch: str | None = None,
              full: bool = False, require_toolchain: bool = False, urgent: int = 1) -> Plan:
    """Plan a module. ``full`` (or no problems, for families that plan the full module then) takes every
    candidate. The first ``urgent`` problems' instances are marked urgent: the builder does them first."""
    variant = family.check_variant(variant)
    spec = family.compile_spec(variant, arch)
    tc, fp = toolchain_for(spec, require_toolchain)
    cands = list(family.candidates(variant))
    by_digest = {c.digest: c for c in cands}
    if len(by_digest) != len(cands):
        raise JitkilnError(f"family {family.name} variant {variant}: two candidates share a digest")
    problems = [dict(p) for p in problems]
    if not problems and getattr(family, "full_when_no_problems", False):
        full = True
    chosen: dict[str, dict[str, Any]] = {}
    for i, p in enumerate(problems):
        sel = family.select(variant, p)
        for slot, inst in sel.items():
            if inst.digest not in by_digest:
                raise JitkilnError(
                    f"family {family.name}: dispatch picked {inst.name} for {p}, which is not a candidate of "
                    f"variant {variant}",
                    hint="the heuristic and the candidate list disagree: fix the family")
            c = chosen.setdefault(inst.digest, {"slots": [], "shapes": 0, "urgent": False, "first": i})
            if slot not in c["slots"]:
                c["slots"].append(slot)
            c["shapes"] += 1
            c["urgent"] = c["urgent"] or i < urgent
    provenance = {}
    if hasattr(family, "provenance") and problems:
        provenance = family.provenance(variant, problems) or {}
    if not problems and not full:
        raise UsageError(f"no shapes to plan for family {family.name!r}",
                         hint="give --shape K=V,... or --model ... --tokens ..., or --full for every candidate")
    order = cands if full else [by_digest[d] for d in sorted(chosen, key=lambda d: chosen[d]["first"])]
    units = []
    for inst in order:
        c = chosen.get(inst.digest, {"slots": [], "shapes": 0, "urgent": False})
        src = family.render(inst)
        why = provenance.get(inst.name, "") or ("full module" if full and not c["shapes"] else "")
        units.append(Unit(inst, src, unit_key(family, inst, src, fp, spec), c["slots"], c["shapes"],
                          c["urgent"], why))
    planned = {u.instance.digest for u in units}
    summary = family.describe_problems(problems)
    unused = [(c, f"{family.rule(variant, c)}; {summary}") for c in cands if c.digest not in planned]
    module_key = sha256_hex("jitkiln-module-v1", family.name, variant, "full" if full else "reduced",
                            canonical_json(sorted(u.instance.digest for u in units)), fp,
                            canonical_json(dataclasses.asdict(spec) | {"include_dirs": []}))
    return Plan(family, variant, spec, problems, units, unused, tc, fp, full, module_key)


def format_table(plan: Plan) -> str:
    """A readable plan: used instances with their slots, then unused candidates with the reason."""
    lines = [f"family {plan.family.name}  variant {plan.variant}  arch {plan.spec.arch}  "
             f"module {'full' if plan.full else 'reduced'}  key {plan.module_key[:16]}",
             f"toolchain {plan.toolchain_fp}",
             f"shapes: {plan.family.describe_problems(plan.problems) if plan.problems else '(none)'}",
             "", f"planned instances ({len(plan.units)}):"]
    w = max([len(u.instance.name) for u in plan.units] + [10])
    for u in plan.units:
        flag = "urgent" if u.urgent else ""
        extra = f"  [{u.why}]" if u.why else ""
        lines.append(f"  {u.instance.name:<{w}}  {','.join(u.slots) or '-':<14} {u.shapes:>5} shapes  "
                     f"{flag:<6} {u.ukey[:12]}{extra}")
    lines.append("")
    lines.append(f"unused candidates ({len(plan.unused)}):")
    for inst, reason in plan.unused:
        lines.append(f"  {inst.name:<{w}}  {reason}")
    return "\n".join(lines)
