"""Build records: what each unit did (hit, compiled, waited, failed; when; how long; peak memory; phases),
written as JSON and as a ninja-compatible ``.ninja_log`` under the cache's ``builds/``."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError, StoreFull
from .plan import Plan


@dataclass
class UnitResult:
    name: str
    ukey: str
    key: str = ""
    status: str = "pending"  # hit | compiled | waited | failed
    start: float = 0.0  # seconds since the build started
    end: float = 0.0
    seconds: float = 0.0  # compile seconds (0 for hits)
    cpu_s: float = 0.0  # compiler CPU seconds (user + system)
    peak_rss: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    urgent: bool = False
    expected_s: float = 0.0
    error: str = ""
    log: str = ""
    slots: list[str] = field(default_factory=list)
    mode: str = ""  # how the compiler ran it (nvcc: "pipelined" or "sequential")
    pack: str = ""  # the pack this unit compiled in (one unit holding several instances), if any


@dataclass
class BuildRecord:
    plan: Plan
    units: list[UnitResult]
    wall_s: float
    jobs: int
    started: float
    host: str = ""
    executor: str = "local"
    path: Path | None = None
    ninja_log: Path | None = None
    packing: dict[str, Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. the compiler's own policy text

    @property
    def compiled(self) -> list[UnitResult]:
        return [u for u in self.units if u.status == "compiled"]

    @property
    def hits(self) -> list[UnitResult]:
        return [u for u in self.units if u.status in ("hit", "waited")]

    @property
    def critical_path_s(self) -> float:
        # Units are independent: with enough cores the build takes as long as its longest unit.
        return max([u.seconds for u in self.units] + [0.0])

    def _jobs(self) -> list[UnitResult]:
        """Compiled units, one per compiler job (the members of a pack share one job)."""
        seen, out = set(), []
        for u in self.compiled:
            if u.pack and u.pack in seen:
                continue
            seen.add(u.pack)
            out.append(u)
        return out

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {
            "family": p.family.name, "variant": p.variant, "arch": p.spec.arch, "module_key": p.module_key,
            "module": "full" if p.full else "reduced", "toolchain": p.compiler_fp, "flags": list(p.spec.flags),
            "host": self.host, "executor": self.executor, "jobs": self.jobs, "started": self.started,
            "wall_s": round(self.wall_s, 3), "critical_path_s": round(self.critical_path_s, 3),
            "compiled": [u.name for u in self.compiled],
            "cache_hits": [u.name for u in self.hits],
            "failed": [u.name for u in self.units if u.status == "failed"],
            "compile_s_sum": round(sum(u.seconds for u in self._jobs()), 3),
            "compiler_cpu_s": round(sum(u.cpu_s for u in self._jobs()), 3),
            "units": [u.__dict__ for u in self.units],
            "unused": [{"name": i.name, "reason": r} for i, r in p.unused],
            "ninja_log": str(self.ninja_log) if self.ninja_log else None,
            "modes": {m: [u.name for u in self.compiled if u.mode == m]
                      for m in sorted({u.mode for u in self.compiled if u.mode})},
            "packing": self.packing,
            **self.notes,
        }


def ninja_log(record: BuildRecord) -> str:
    """ninja log v5: start_ms, end_ms, mtime, output, command hash (one line per compiled unit)."""
    lines = ["# ninja log v5"]
    for u in record.units:
        if u.status != "compiled":
            continue
        lines.append(f"{int(u.start * 1000)}\t{int(u.end * 1000)}\t0\t{u.name}.so\t{u.ukey[:16]}")
    return "\n".join(lines) + "\n"


def write_record(record: BuildRecord, d: Path) -> None:
    """Write the record's JSON and ninja log into ``d`` (atomically each; ``last`` points at the JSON).
    A full disk or an unwritable folder is a one-line StoreError and leaves no temporary file behind."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record.started))
    base = f"{stamp}-{record.plan.family.name}-{record.plan.module_key[:12]}-{os.urandom(3).hex()}"
    files = [(d / f"{base}.ninja_log", ninja_log(record)), (d / f"{base}.json", "")]
    try:
        d.mkdir(parents=True, exist_ok=True)
        record.ninja_log = files[0][0]
        record.path = files[1][0]
        files[1] = (record.path, json.dumps(record.to_json(), indent=1, default=str))
        for path, text in files + [(d / "last", str(record.path))]:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
    except OSError as e:
        cls = StoreFull if e.errno in (errno.ENOSPC, errno.EDQUOT) else StoreError
        raise cls(f"could not write the build record into {d}: {e.strerror or e}",
                  hint="free space or fix the permissions; the compiled entries themselves are in the cache") from None
