"""Packing: several instances in one compile unit when cores are few and total work matters.

A CUTLASS instance's compile is mostly work every instance of a family repeats: parsing the headers,
instantiating the shared templates, the host side. Measured here (nvcc 13.0, CUTLASS 4.2, moe2stage): four
tile configurations in one unit took 65 s against 4 x 34 s separately, two instances 84 s against 72 + 74 s,
so a unit's ``shared_fraction`` of ~0.7-0.87 is paid once per pack. Packing trades critical path for total work:

* cores >= units to compile: every unit separately (the build takes as long as its longest unit);
* cores < units: the partition of the (non-urgent) units into packs that minimises the estimated makespan
  (packs scheduled longest first on the cores), within memory. Urgent units are not packed (they are
  needed first) unless a tier 0 serves the calls while the plan builds (``urgent_served``: the runtime's
  ``tiered`` policy with a family fallback): then what matters is when *every* instance is loaded, and the
  urgent units join the packs (a pack holding one goes first).

A pack is one ``.cu`` holding every member (the family's packer keeps their names apart), compiled once; the
artifact is published under each member's unit key, so lookups, loads and the runtime do not change. Each
kernel's machine code is the same as in the member's own unit (``scripts/sass_diff.py --subset``).

Families opt in through their :attr:`~jitkiln.family.Family.packer` (a :class:`~jitkiln.family.Packer`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

from .family import Packer
from .plan import Unit


@dataclass
class Pack:
    """Units compiled as one. ``ukey``: the pack's own key (its lock and working directory)."""

    units: list[Unit]
    source: str
    expected_s: float = 0.0
    expected_mem: int = 0
    ukey: str = ""
    name: str = ""

    def __post_init__(self):
        h = hashlib.sha256("\n".join(u.ukey for u in self.units).encode() + self.source.encode())
        self.ukey = self.ukey or "pack-" + h.hexdigest()[:40]
        self.name = self.name or f"pack{len(self.units)}_{h.hexdigest()[:8]}"


@dataclass
class Packing:
    groups: list[list[Unit]]
    reason: str
    estimate_separate_s: float = 0.0
    estimate_packed_s: float = 0.0
    packs: list[Pack] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"packs": [[u.instance.name for u in p.units] for p in self.packs],
                "separate": sum(1 for g in self.groups if len(g) == 1),
                "reason": self.reason, "estimate_separate_s": round(self.estimate_separate_s, 1),
                "estimate_packed_s": round(self.estimate_packed_s, 1)}


MIN_GAIN = 0.9  # pack only for an estimated build at least 10% shorter (the model is rough; packs lose cache granularity)


def pack_cost(costs: Sequence[float], shared: float) -> float:
    """Estimated compile seconds of one unit holding units of these separate costs."""
    return shared * max(costs) + (1.0 - shared) * sum(costs) if costs else 0.0


def makespan(costs: Sequence[float], workers: int, first: Sequence[float] = ()) -> float:
    """List scheduling of independent jobs on ``workers`` as the Builder runs them: the ``first`` jobs
    (urgent units), longest first, then ``costs``, longest first, each on the worker free earliest."""
    loads = [0.0] * max(1, workers)
    for c in sorted(first, reverse=True) + sorted(costs, reverse=True):
        i = loads.index(min(loads))
        loads[i] += c
    return max(loads)


def _bins(items: list[tuple[float, int, Unit]], p: int) -> list[list[tuple[float, int, Unit]]]:
    """Partition into ``p`` bins of balanced cost (longest first into the lightest bin)."""
    bins: list[list] = [[] for _ in range(p)]
    loads = [0.0] * p
    for it in sorted(items, key=lambda t: -t[0]):
        i = loads.index(min(loads))
        bins[i].append(it)
        loads[i] += it[0]
    return [b for b in bins if b]


def choose(packer: Packer | None, units: Sequence[tuple[Unit, float, int]], cores: int, mem_avail: int,
           enabled: bool = True, urgent_served: bool = False) -> Packing:
    """How to group the units to compile, ``(unit, expected s, expected peak bytes)``, on ``cores``.
    ``urgent_served``: a tier 0 serves calls meanwhile, so urgent units may be packed too."""
    n = len(units)
    separate = [[u] for u, _, _ in units]
    sep_est = makespan([c for u, c, _ in units if not u.urgent], cores, [c for u, c, _ in units if u.urgent])
    if not enabled:
        return Packing(separate, "packing disabled (JITKILN_PACK=0)", sep_est, sep_est)
    if packer is None:
        return Packing(separate, "the family has no packer: every unit separately", sep_est, sep_est)
    if n <= cores:
        return Packing(separate, f"{n} units to compile <= {cores} cores: every unit separately (the build "
                                 f"takes as long as its longest unit, ~{sep_est:.0f} s)", sep_est, sep_est)
    urgent = [(c, m, u) for u, c, m in units if u.urgent and not urgent_served]
    rest = [(c, m, u) for u, c, m in units if not u.urgent or urgent_served]
    best_p, best_est = len(rest), sep_est
    for p in range(1, len(rest)):
        bins = _bins([(c, m, u) for c, m, u in rest], p)
        costs = [pack_cost([c for c, _, _ in b], packer.shared_fraction) for b in bins]
        mems = sorted((max(m for _, m, _ in b) * (1 + packer.memory_growth * (len(b) - 1)) for b in bins),
                      reverse=True)
        if sum(mems[:min(cores, len(mems))]) > 0.9 * mem_avail:
            continue
        # urgent units go first (separately), then the packs
        est = makespan(costs, cores, [c for c, _, _ in urgent])
        if est < min(best_est, MIN_GAIN * sep_est) - 1e-9:
            best_p, best_est = p, est
    if best_p >= len(rest):
        return Packing(separate, f"{n} units on {cores} cores: packing would not shorten the build "
                                 f"(estimated ~{sep_est:.0f} s separately)", sep_est, sep_est)
    bins = _bins([(c, m, u) for c, m, u in rest], best_p)
    groups = [[u] for _, _, u in urgent] + [[u for _, _, u in b] for b in bins]
    sizes = "+".join(str(len(b)) for b in bins)
    which = ("units (urgent ones too: a tier 0 serves the calls meanwhile)" if urgent_served
             else "non-urgent units")
    reason = (f"{n} units on {cores} cores: {len(rest)} {which} packed as {sizes} "
              f"(a pack pays the shared ~{packer.shared_fraction:.0%} of a unit once): estimated "
              f"~{best_est:.0f} s against ~{sep_est:.0f} s separately")
    if not urgent_served:
        reason += f"; {len(urgent)} urgent units separately"
    return Packing(groups, reason, sep_est, best_est)


def make_pack(packer: Packer | None, group: Sequence[Unit], expected: Sequence[tuple[float, int]]) -> Pack | None:
    if packer is None or len(group) < 2:
        return None
    src = packer.render(group)
    if src is None:
        return None
    costs = [c for c, _ in expected]
    mem = int(max(m for _, m in expected) * (1 + packer.memory_growth * (len(group) - 1)))
    return Pack(list(group), src, expected_s=pack_cost(costs, packer.shared_fraction), expected_mem=mem)


__all__ = ["Pack", "Packer", "Packing", "choose", "make_pack", "makespan", "pack_cost"]
