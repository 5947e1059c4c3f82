"""Plan: variant + problem shapes -> exactly the instances dispatch will pick, with a reason for every other one.

The plan runs the family's own dispatch heuristic (``Family.select``) over every planned shape, so the
instance set is what the runtime will ask for, by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .compilers import Compiler, get_compiler
from .errors import JitkilnError, UsageError
from .family import CompileSpec, Family, Instance, Problem
from .keys import module_key as make_module_key
from .keys import unit_key


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
    compiler: Compiler | None  # resolved once, here; None when absent (then ``compiler_error`` says why)
    compiler_fp: str
    full: bool
    module_key: str
    compiler_error: JitkilnError | None = None

    def require_compiler(self) -> Compiler:
        """The plan's compiler, or the error saying why there is none (what to install)."""
        if self.compiler is None:
            raise self.compiler_error or JitkilnError(f"no compiler {self.spec.toolchain!r} for this plan")
        self.family.check_buildable(self.spec)
        return self.compiler

    def unit(self, instance: Instance, why: str = "", urgent: bool = False) -> Unit:
        """A unit for ``instance`` (planned or not) keyed like the plan's."""
        src = self.family.render(instance)
        return Unit(instance, src, unit_key(self.family.name, instance.digest, src, self.compiler_fp, self.spec),
                    urgent=urgent, why=why)

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
            "toolchain": self.compiler_fp,
            "flags": list(self.spec.flags),
            "shapes": self.family.describe_problems(self.problems) if self.problems else "(none: full module)",
            "problems": len(self.problems),
            "instances": [{"name": u.instance.name, "key": u.ukey, "digest": u.instance.digest,
                           "slots": u.slots, "shapes": u.shapes, "urgent": u.urgent,
                           **({"why": u.why} if u.why else {}),
                           "params": u.instance.params()} for u in self.units],
            "unused": [{"name": i.name, "reason": r, "digest": i.digest} for i, r in self.unused],
        }


def find_compiler(spec: CompileSpec, required: bool) -> tuple[Compiler | None, str, JitkilnError | None]:
    """(compiler, fingerprint, why absent): a missing compiler is an error only when ``required``."""
    try:
        c = get_compiler(spec.toolchain)
        return c, c.fingerprint, None
    except JitkilnError as e:
        if required:
            raise
        return None, f"{spec.toolchain}-unavailable", e


def make_plan(family: Family, variant: str | None, problems: Sequence[Problem], *, arch: str | None = None,
              full: bool = False, require_compiler: bool = False, urgent: int = 1) -> Plan:
    """Plan a module. ``full`` (or no problems, for families that plan the full module then) takes every
    candidate. The first ``urgent`` problems' instances are marked urgent: the builder does them first."""
    variant = family.check_variant(variant)
    spec = family.compile_spec(variant, arch)
    tc, fp, why_absent = find_compiler(spec, require_compiler)
    cands = list(family.candidates(variant))
    by_digest = {c.digest: c for c in cands}
    if len(by_digest) != len(cands):
        raise JitkilnError(f"family {family.name} variant {variant}: two candidates share a digest")
    problems = [family.check_problem(p) for p in problems]  # checked where they enter, on every path
    if not problems and family.full_when_no_problems:
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
    provenance = family.provenance(variant, problems) if problems else {}
    if not problems and not full:
        raise UsageError(f"no shapes to plan for family {family.name!r}",
                         hint="give --shape K=V,... or --model ... --tokens ..., or --full for every candidate")
    order = cands if full else [by_digest[d] for d in sorted(chosen, key=lambda d: chosen[d]["first"])]
    units = []
    for inst in order:
        c = chosen.get(inst.digest, {"slots": [], "shapes": 0, "urgent": False})
        src = family.render(inst)
        why = provenance.get(inst.name, "") or ("full module" if full and not c["shapes"] else "")
        units.append(Unit(inst, src, unit_key(family.name, inst.digest, src, fp, spec), c["slots"], c["shapes"],
                          c["urgent"], why))
    planned = {u.instance.digest for u in units}
    summary = family.describe_problems(problems)
    unused = [(c, f"{family.rule(variant, c)}; {summary}") for c in cands if c.digest not in planned]
    module_key = make_module_key(family.name, variant, full, [u.instance.digest for u in units], fp, spec)
    return Plan(family, variant, spec, problems, units, unused, tc, fp, full, module_key, why_absent)


def format_table(plan: Plan) -> str:
    """A readable plan: used instances with their slots, then unused candidates with the reason."""
    lines = [f"family {plan.family.name}  variant {plan.variant}  arch {plan.spec.arch}  "
             f"module {'full' if plan.full else 'reduced'}  key {plan.module_key[:16]}",
             f"compiler {plan.compiler_fp}",
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
