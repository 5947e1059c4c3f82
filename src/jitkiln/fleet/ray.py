"""``jitkiln build --executor ray``: compile units as Ray tasks on a cluster; publish the results here.

The builder still decides the order (urgent first, then longest first) and runs one thread per slot; each
thread submits its unit as a Ray task and waits for it. The task compiles on a worker, and returns the
artifact's bytes, the headers it read (as portable labels with their digests), timings and the log. The
driver checks that the worker's headers are the driver's (else the entry would be keyed by headers this
machine does not have), then publishes the entry to the store: locally and, signed, to the remote caches.

Workers need jitkiln and the same compiler (the toolchain fingerprint is checked per task). A task whose
worker dies is retried by Ray (``max_retries``); if it still fails, the unit compiles here.

Workers compile with :func:`jitkiln.build.compile_unit`, as a local build does: in a fixed per-unit directory,
so a Ray build's artifacts equal a local build's byte for byte.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..build import Compiled, Executor, Job, LocalCompile, compile_unit
from ..compilers import CompileResult
from ..errors import CompileError, CompilerKilled, JitkilnError, UsageError
from ..family import get_family
from ..headers import HeaderLabels
from ..plan import Plan, find_compiler


def reproducible_compile(family: str, variant: str, arch: str, name: str, source: str, ukey: str,
                         compiler_fp: str) -> dict[str, Any]:
    """Compile one job on this host (a Ray worker) with :func:`jitkiln.build.compile_unit` and return a
    plain dict (compile errors come back as ``{"error": ...}`` so the driver reports them with the log)."""
    host = os.uname().nodename
    spec = get_family(family).compile_spec(variant, arch)
    tc, fp, _ = find_compiler(spec, required=True)
    if fp != compiler_fp:
        return {"error": "toolchain", "host": host,
                "reason": f"worker {host} has compiler {fp}, the driver {compiler_fp}",
                "hint": "install the same compiler on every Ray worker (same version and binaries), or build "
                        "without --executor ray"}
    with tempfile.NamedTemporaryFile(suffix=".log") as logf:
        try:
            c = compile_unit(spec, tc, HeaderLabels(spec, tc), name, source, ukey, log_path=logf.name)
        except CompileError as e:
            return {"error": "killed" if isinstance(e, CompilerKilled) else "compile", "host": host,
                    "reason": f"{e.reason} on {host}", "log": Path(logf.name).read_text(errors="replace")}
        r = c.result
        return {"artifact": c.data, "deps": c.deps, "seconds": r.seconds, "peak_rss": r.peak_rss,
                "phases": r.phases, "log": Path(logf.name).read_text(errors="replace"), "host": host,
                "cpu_s": r.cpu_s, "mode": r.mode}


def check_result(plan: Plan, job: Job, labels: HeaderLabels, r: dict[str, Any], where: str,
                 log_path: str) -> Compiled:
    """A worker's result as this machine's: an error raised with its log, headers checked against ours."""
    if r.get("log"):
        Path(log_path).write_text(r["log"])
    if "error" in r:
        if r["error"] == "toolchain":
            raise JitkilnError(r["reason"], hint=r.get("hint", ""))
        cls = CompilerKilled if r["error"] == "killed" else CompileError
        raise cls(r["reason"], hint=f"the full log is {log_path}", unit=job.name, log=log_path)
    for lbl, d in r["deps"].items():
        mine = labels.digest(lbl)
        if mine != d:
            raise JitkilnError(
                f"{where} compiled {job.name} against header {lbl} with digest {d[:12]}, but this "
                f"machine's is {(mine or 'absent')[:12]}",
                hint="install the same headers (CUTLASS/CK version) on the workers as on the driver")
    res = CompileResult(seconds=r["seconds"], peak_rss=r["peak_rss"], deps=[], phases=r["phases"],
                        log="", cpu_s=r.get("cpu_s", 0.0), mode=r.get("mode", ""))
    return Compiled(res, r["artifact"], r["deps"], r.get("host", ""))


class RayCompile(Executor):
    """Units compile as Ray tasks (one CPU each by default); results are published by the driver."""

    name = "ray"
    packs = False  # one task per unit: the cluster has the cores

    def __init__(self, address: str | None = None, num_cpus: float = 1, max_retries: int = 3,
                 fallback_local: bool = True, init_kwargs: dict | None = None, task_timeout: float | None = None,
                 connect_timeout: float | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS")
        # bounded waits: a task (default 1 h: a heavy instance on a busy worker) and the first connection
        self.task_timeout = task_timeout or float(os.environ.get("JITKILN_RAY_TASK_TIMEOUT", "3600"))
        self.connect_timeout = connect_timeout or float(os.environ.get("JITKILN_RAY_CONNECT_TIMEOUT", "10"))
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
                _probe(self.address, self.connect_timeout)
                _bounded_init(ray, self.address, self.connect_timeout, self.init_kwargs)
            self._task = ray.remote(num_cpus=self.num_cpus, max_retries=self.max_retries,
                                    retry_exceptions=False)(reproducible_compile)
            return self._task

    def compile(self, plan: Plan, job: Job, labels: HeaderLabels, log_path: str, spare_cores: int) -> Compiled:
        import ray
        task = self._remote()
        ref = task.remote(plan.family.name, plan.variant, plan.spec.arch, job.name, job.source, job.ukey,
                          plan.compiler_fp)
        try:
            r = ray.get(ref, timeout=self.task_timeout)
        except (ray.exceptions.RayError, TimeoutError) as e:
            if not self.fallback_local:
                raise JitkilnError(f"the Ray task compiling {job.name} failed: {type(e).__name__}",
                                   hint="see the Ray logs on the worker") from None
            print(f"jitkiln: warning: the Ray task compiling {job.name} failed ({type(e).__name__}); "
                  "compiling it here", file=sys.stderr)
            return LocalCompile().compile(plan, job, labels, log_path, spare_cores)
        return check_result(plan, job, labels, r, f"ray worker {r.get('host', '?')}", log_path)


def _probe(address: str, timeout: float) -> None:
    """Fail fast (``timeout`` seconds) when a ``HOST:PORT`` cluster address does not answer, instead of Ray's own
    minutes of retries."""
    import socket
    m = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    if not m:
        return  # "local", "auto", ... : Ray's own business
    try:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout):
            pass
    except OSError as e:
        raise JitkilnError(f"cannot reach the Ray cluster at {address} within {timeout:.0f} s ({e.strerror or e})",
                           hint="check the address and that `ray start --head` runs there "
                                "(JITKILN_RAY_CONNECT_TIMEOUT sets the wait), or build without --executor ray"
                           ) from None


def _bounded_init(ray, address: str, timeout: float, kwargs: dict) -> None:
    """``ray.init`` that answers within ``timeout`` seconds: something that accepts connections at the address
    but is no Ray cluster (a proxy, another service) would otherwise keep it retrying for minutes."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **kwargs)
            done["ok"] = True
        except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
            done["error"] = e

    # Ray's own connection retries log to stderr (fd 2, from C++): held aside while connecting, so the reason
    # this build gives is the first thing said
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            t = threading.Thread(target=run, daemon=True, name="jitkiln-ray-init")
            t.start()
            t.join(timeout)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    hint = ("check that `ray start --head` runs there and that the address is reachable "
            "(JITKILN_RAY_CONNECT_TIMEOUT sets the wait), or build without --executor ray")
    if t.is_alive():
        raise JitkilnError(f"the Ray cluster at {address} did not answer within {timeout:.0f} s", hint=hint)
    e = done.get("error")
    if e is not None:
        raise JitkilnError(f"cannot connect to the Ray cluster at {address}: {type(e).__name__}: {e}",
                           hint=hint) from None
