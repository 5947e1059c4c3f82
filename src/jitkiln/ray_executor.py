"""``jitkiln build --executor ray``: compile units as Ray tasks on a cluster; publish the results here.

The builder still decides the order (urgent first, then longest first) and runs one thread per slot; each
thread submits its unit as a Ray task and waits for it. The task compiles on a worker, and returns the
artifact's bytes, the headers it read (as portable labels with their digests), timings and the log. The
driver checks that the worker's headers are the driver's (else the entry would be keyed by headers this
machine does not have), then publishes the entry to the store: locally and, signed, to the shared tiers.

Workers need jitkiln and the same compiler (the toolchain fingerprint is checked per task). A task whose
worker dies is retried by Ray (``max_retries``); if it still fails, the unit compiles here.

Workers compile with :func:`jitkiln.build.compile_unit`, as a local build does: in a fixed per-unit directory,
so a Ray build's artifacts equal a local build's byte for byte.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from .build import Executor, HeaderLabels, LocalCompile, UnitResult, compile_unit, unit_meta
from .errors import CompileError, CompilerKilled, JitkilnError, UsageError
from .plan import Plan, Unit
from .store import Entry, Store


def reproducible_compile(family: str, variant: str, arch: str, name: str, source: str, ukey: str,
                         toolchain_fp: str) -> dict[str, Any]:
    """Compile one unit on this host (a Ray worker) with :func:`jitkiln.build.compile_unit` and return a
    plain dict (compile errors come back as ``{"error": ...}`` so the driver reports them with the log)."""
    from .family import get_family
    from .plan import toolchain_for

    host = os.uname().nodename
    spec = get_family(family).compile_spec(variant, arch)
    tc, fp = toolchain_for(spec, required=True)
    if fp != toolchain_fp:
        return {"error": "toolchain", "host": host,
                "reason": f"worker {host} has toolchain {fp}, the driver {toolchain_fp}",
                "hint": "install the same compiler on every Ray worker (same version and binaries), or build "
                        "without --executor ray"}
    with tempfile.NamedTemporaryFile(suffix=".log") as logf:
        try:
            r, data, deps = compile_unit(spec, tc, HeaderLabels(spec, tc), name, source, ukey, log_path=logf.name)
        except CompileError as e:
            return {"error": "killed" if isinstance(e, CompilerKilled) else "compile", "host": host,
                    "reason": f"{e.reason} on {host}", "log": Path(logf.name).read_text(errors="replace")}
        return {"artifact": data, "deps": deps, "seconds": r.seconds, "peak_rss": r.peak_rss, "phases": r.phases,
                "log": Path(logf.name).read_text(errors="replace"), "host": host, "cpu_s": r.cpu_s}


def publish_result(store: Store, plan: Plan, unit: Unit, labels: HeaderLabels, res: UnitResult,
                   r: dict[str, Any], where: str) -> Entry:
    """Check a compile result against this machine's headers and publish it (locally, then the tiers)."""
    log_path = store.log_path(unit.ukey)
    if r.get("log"):
        log_path.write_text(r["log"])
    if "error" in r:
        if r["error"] == "toolchain":
            raise JitkilnError(r["reason"], hint=r.get("hint", ""))
        cls = CompilerKilled if r["error"] == "killed" else CompileError
        raise cls(r["reason"], hint=f"the full log is {log_path}", unit=unit.instance.name, log=str(log_path))
    for lbl, d in r["deps"].items():
        mine = labels.digest(lbl)
        if mine != d:
            raise JitkilnError(
                f"{where} compiled {unit.instance.name} against header {lbl} with digest {d[:12]}, but this "
                f"machine's is {(mine or 'absent')[:12]}",
                hint="install the same headers (CUTLASS/CK version) on the workers as on the driver")
    res.seconds, res.peak_rss, res.phases, res.log = round(r["seconds"], 3), r["peak_rss"], r["phases"], str(log_path)
    res.cpu_s = round(r.get("cpu_s", 0.0), 3)
    meta = unit_meta(plan, unit, r["seconds"], r["peak_rss"], r["phases"], r.get("cpu_s", 0.0))
    meta["host"] = r.get("host", meta["host"])
    meta["executor"] = where.split(" ")[0]
    return store.publish(unit.ukey, r["deps"], r["artifact"], meta)


class RayCompile(Executor):
    """Units compile as Ray tasks (one CPU each by default); results are published by the driver."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, max_retries: int = 3,
                 fallback_local: bool = True, init_kwargs: dict | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.fallback_local = fallback_local
        self.init_kwargs = dict(init_kwargs or {})
        self._task = None
        self._lock = threading.Lock()

    def _remote(self):
        with self._lock:
            if self._task is not None:
                return self._task
            try:
                import ray
            except ImportError:
                raise UsageError("--executor ray needs the `ray` package",
                                 hint="pip install 'jitkiln[ray]' on the driver and on every worker") from None
            if not ray.is_initialized():
                if not self.address:
                    raise UsageError("no Ray cluster address",
                                     hint="give --ray-address HOST:6379 (or ray://HOST:10001), or set RAY_ADDRESS; "
                                          "`--ray-address local` starts a one-machine cluster here")
                try:
                    ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False,
                             **self.init_kwargs)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise JitkilnError(f"cannot connect to the Ray cluster at {self.address}: {e}",
                                       hint="check that `ray start --head` runs there and that the address is "
                                            "reachable, or build without --executor ray") from None
            self._task = ray.remote(num_cpus=self.num_cpus, max_retries=self.max_retries,
                                    retry_exceptions=False)(reproducible_compile)
            return self._task

    def compile(self, store: Store, plan: Plan, unit: Unit, labels: HeaderLabels, res: UnitResult) -> Entry:
        import ray
        task = self._remote()
        ref = task.remote(plan.family.name, plan.variant, plan.spec.arch, unit.instance.name, unit.source,
                          unit.ukey, plan.toolchain_fp)
        try:
            r = ray.get(ref)
        except ray.exceptions.RayError as e:
            if not self.fallback_local:
                raise JitkilnError(f"the Ray task compiling {unit.instance.name} failed: {type(e).__name__}",
                                   hint="see the Ray logs on the worker") from None
            print(f"jitkiln: warning: the Ray task compiling {unit.instance.name} failed after "
                  f"{self.max_retries} retries ({type(e).__name__}); compiling it here", file=sys.stderr)
            return LocalCompile().compile(store, plan, unit, labels, res)
        return publish_result(store, plan, unit, labels, res, r, f"ray worker {r.get('host', '?')}")
