"""Build: compile the planned units that the cache lacks, each exactly once, urgent first, longest first.

One job path: a *job* is one compile of one or more units (a pack of one is a plain unit, see
:mod:`jitkiln.pack`). Concurrency is bounded by cores and by free memory (each job's expected peak, from its
last recorded compile or the family's estimate). Across processes, a per-unit lock in the store makes every
unit compile once: the others wait, then load. Where a job compiles is an :class:`Executor`: here
(:class:`LocalCompile`) or on a Ray cluster (:mod:`jitkiln.fleet.ray`).

Every build writes a JSON record and a ninja-compatible ``.ninja_log`` (:mod:`jitkiln.record`).

Longer than 400 lines: the scheduler, its one job path and the executor interface belong together.
"""
from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import digests
from . import pack as packing
from .compilers import CompileJob, CompileResult, Compiler
from .errors import CompilerKilled, JitkilnError, UsageError
from .family import CompileSpec
from .headers import HeaderLabels
from .plan import Plan, Unit
from .progress import Progress
from .record import BuildRecord, UnitResult, write_record
from .store import Entry, Store


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


@dataclass
class Job:
    """One compile: ``units`` (one, or a pack's members) from ``source``. ``ukey`` keys its lock-free working
    folder (the unit's key, or the pack's)."""

    units: list[Unit]
    source: str
    ukey: str
    name: str
    expected_s: float
    expected_mem: int
    order: int = 0

    @property
    def urgent(self) -> bool:
        return any(u.urgent for u in self.units)

    @classmethod
    def of_unit(cls, u: Unit, expected_s: float, expected_mem: int, order: int = 0) -> "Job":
        return cls([u], u.source, u.ukey, u.instance.name, expected_s, expected_mem, order)

    @classmethod
    def of_pack(cls, p: packing.Pack, order: int = 0) -> "Job":
        return cls(list(p.units), p.source, p.ukey, p.name, p.expected_s, p.expected_mem, order)

    def sort_key(self) -> tuple:
        return (0 if self.urgent else 1, -self.expected_s, self.order)


@dataclass
class Compiled:
    """What an executor returns: the compile's measurements, the artifact, the headers read (label: digest)."""

    result: CompileResult
    data: bytes
    deps: dict[str, str]
    host: str = ""

    def __iter__(self):  # (result, data, deps), as in ``r, data, deps = compile_unit(...)``
        return iter((self.result, self.data, self.deps))


class Executor:
    """Where a job compiles: :class:`LocalCompile` here; :class:`jitkiln.fleet.ray.RayCompile` on a cluster."""

    name = "local"
    packs = True  # whether several units may be packed into one job here

    def compile(self, plan: Plan, job: Job, labels: HeaderLabels, log_path: str, spare_cores: int) -> Compiled:
        raise NotImplementedError


FIXED_MTIME = 946684800  # 2000-01-01: the line table records the source file's mtime
ORPHAN_WAIT_S = 10.0


def unit_dir(ukey: str) -> Path:
    """The fixed folder a unit compiles in. Compilers write their working folder into the artifact (PTX
    ``.file``, module ids), so one folder per unit key makes the bytes the same on every machine with the same
    compiler, headers and temp folder."""
    return Path(tempfile.gettempdir()) / "jitkiln-build" / ukey[:32]


def compile_unit(spec: CompileSpec, compiler: Compiler, labels: HeaderLabels, name: str, source: str, ukey: str,
                 log_path: str | None = None, spare_cores: int = 0) -> Compiled:
    """Compile one unit text reproducibly with the plan's compiler, in its fixed folder.

    The folder is locked by the compiler process itself (the lock lives as long as the compiler): if an
    orphaned compiler of a killed build still holds it, this compile waits for it a little
    (``ORPHAN_WAIT_S``), then takes a private folder rather than wait longer (its bytes then differ; its key and
    its behaviour do not).
    """
    work = unit_dir(ukey)
    work.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(str(work) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    work = work.parent / f"{work.name}.{os.getpid()}.{os.urandom(3).hex()}"
                    break
                time.sleep(0.1)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        src = work / f"{name}.cu"
        src.write_text(source)
        os.utime(src, (FIXED_MTIME, FIXED_MTIME))
        out = work / "artifact.so"
        r = compiler.compile(CompileJob(str(src), str(out), spec, str(work), log_path=log_path,
                                        hold_fd=lock_fd, spare_cores=spare_cores))
        return Compiled(r, out.read_bytes(), labels.digests_of(r.deps, str(src)), os.uname().nodename)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock_fd)


class LocalCompile(Executor):
    name = "local"

    def compile(self, plan: Plan, job: Job, labels: HeaderLabels, log_path: str, spare_cores: int) -> Compiled:
        return compile_unit(plan.spec, plan.require_compiler(), labels, job.name, job.source, job.ukey,
                            log_path=log_path, spare_cores=spare_cores)


def unit_meta(plan: Plan, unit: Unit, seconds: float, peak_rss: int, phases: dict,
              cpu_s: float = 0.0) -> dict[str, Any]:
    return {"name": unit.instance.name, "family": plan.family.name, "variant": plan.variant,
            "instance_digest": unit.instance.digest, "params": unit.instance.params(),
            "symbol": unit.instance.symbol, "compile_s": round(seconds, 3), "cpu_s": round(cpu_s, 3),
            "peak_rss": peak_rss, "phases": phases, "toolchain": plan.compiler_fp, "flags": list(plan.spec.flags),
            "arch": plan.spec.arch, "host": os.uname().nodename}


# Observers for tests and the runtime (e.g. tiered start): called with (unit, entry) when a unit is ready.
ReadyCallback = Callable[[Unit, Entry], None]


class Builder:
    def __init__(self, store: Store, jobs: int | None = None, progress: bool = True,
                 on_ready: ReadyCallback | None = None, executor: Executor | None = None,
                 urgent_served: bool = False):
        if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
            raise UsageError(f"jobs must be a positive integer, got {jobs!r}")
        self.store = store
        # a tier 0 serves the plan's calls while it builds: urgent units may be packed (pack.choose)
        self.urgent_served = urgent_served
        self.jobs = jobs or default_jobs()
        self.progress_enabled = progress
        self.on_ready = on_ready
        self.executor = executor or LocalCompile()

    def lookup(self, plan: Plan, unit: Unit, labels: HeaderLabels | None = None) -> Entry | None:
        """The unit's verified entry, if the cache has one for the headers as they are now. Pass one
        ``labels`` for a batch of lookups: each header is then read once for the whole batch."""
        labels = labels or HeaderLabels(plan.spec, plan.compiler)
        return self.store.lookup(unit.ukey, labels.digest)

    def expected(self, plan: Plan, unit: Unit) -> tuple[float, int]:
        rec = self.store.recorded_costs(unit.ukey)
        if rec:
            return rec[0], rec[1] or plan.family.memory_estimate(unit.instance)
        return plan.family.cost_estimate(unit.instance), plan.family.memory_estimate(unit.instance)

    # --- a plan ------------------------------------------------------------------------------------
    def build(self, plan: Plan, units: Iterable[Unit] | None = None, raise_on_error: bool = True) -> BuildRecord:
        todo = list(units) if units is not None else list(plan.units)
        t0, started = time.monotonic(), time.time()
        results: dict[str, UnitResult] = {}
        labels = HeaderLabels(plan.spec, plan.compiler)
        missing: list[tuple[Unit, float, int]] = []
        for u in todo:
            exp_s, exp_mem = self.expected(plan, u)
            res = UnitResult(u.instance.name, u.ukey, urgent=u.urgent, expected_s=round(exp_s, 2),
                             slots=list(u.slots))
            results[u.ukey] = res
            entry = self.lookup(plan, u, labels)
            if entry is not None:
                res.status, res.key = "hit", entry.key
                if self.on_ready:
                    self.on_ready(u, entry)
                continue
            missing.append((u, exp_s, exp_mem))
        digests.flush()
        jobs, pack_info = self._jobs(plan, missing, results)
        if jobs:
            self.store.ensure()  # a miss needs a writable cache: say so once, before compiling
            plan.require_compiler()
        progress = Progress(len(jobs), enabled=self.progress_enabled)
        errors: list[JitkilnError] = []
        killed: list[Unit] = []
        self._run(plan, jobs, results, t0, progress, errors, killed, self.jobs)
        for u in killed:  # the OOM killer took it: retry alone, with the whole machine
            progress.note(f"{u.instance.name} was killed (likely out of memory); retrying it alone")
            exp_s, exp_mem = self.expected(plan, u)
            self._run(plan, [Job.of_unit(u, exp_s, exp_mem)], results, t0, None, errors, [], 1)
        record = BuildRecord(plan, [results[u.ukey] for u in todo], time.monotonic() - t0, self.jobs, started,
                             host=os.uname().nodename, executor=self.executor.name, packing=pack_info,
                             notes={"compiler_policy": getattr(plan.compiler, "policy", "")})
        if jobs:
            write_record(record, self.store.records_dir())
        if errors and raise_on_error:
            raise errors[0]
        return record

    def _jobs(self, plan: Plan, missing: list[tuple[Unit, float, int]],
              results: dict[str, UnitResult]) -> tuple[list[Job], dict[str, Any]]:
        """The jobs for the units to compile: packed when cores are few (:func:`jitkiln.pack.choose`); the
        decision and its reason go into the build record (``packing``)."""
        choice = packing.choose(plan.family.packer, missing, self.jobs, int(available_memory()),
                                enabled=self.executor.packs and os.environ.get("JITKILN_PACK", "1") != "0",
                                urgent_served=self.urgent_served)
        if not self.executor.packs:
            choice.reason = f"executor {self.executor.name}: every unit separately"
        cost = {u.ukey: (c, m) for u, c, m in missing}
        order = {u.ukey: i for i, (u, _, _) in enumerate(missing)}
        jobs = []
        for g in choice.groups:
            first = min(order[u.ukey] for u in g)
            p = packing.make_pack(plan.family.packer, g, [cost[u.ukey] for u in g])
            if p is None:
                jobs += [Job.of_unit(u, *cost[u.ukey], order=order[u.ukey]) for u in g]
                continue
            choice.packs.append(p)
            for u in g:
                results[u.ukey].pack = p.name
            jobs.append(Job.of_pack(p, order=first))
        return jobs, choice.to_json()

    def _run(self, plan, jobs: list[Job], results, t0, progress, errors, killed, njobs: int) -> None:
        cond = threading.Condition()
        state = {"running": 0, "mem": 0}
        heap = [(j.sort_key(), i, j) for i, j in enumerate(jobs)]
        heapq.heapify(heap)
        cores = min(njobs, default_jobs())

        def worker() -> None:
            while True:
                with cond:
                    while True:
                        if not heap:
                            return
                        need = heap[0][2].expected_mem
                        # admit if memory allows, and always admit one job when nothing runs
                        if state["running"] == 0 or state["mem"] + need <= available_memory() * 0.9:
                            _, _, job = heapq.heappop(heap)
                            state["running"] += 1
                            state["mem"] += need
                            spare = cores - (state["running"] + len(heap))
                            break
                        cond.wait(0.5)
                try:
                    self._run_job(plan, job, results, t0, progress, errors, killed, njobs > 1, spare)
                finally:
                    with cond:
                        state["running"] -= 1
                        state["mem"] -= job.expected_mem
                        cond.notify_all()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(njobs, max(len(heap), 1)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _run_job(self, plan, job: Job, results, t0, progress, errors, killed, may_retry: bool, spare: int) -> None:
        """Run a job, reporting into ``results``; a failed pack falls back to its members one by one."""
        try:
            for u, entry in self.run_job(plan, job, results, t0, progress, spare):
                if self.on_ready:
                    self.on_ready(u, entry)
            return
        except CompilerKilled as e:
            for u in job.units:
                res = results[u.ukey]
                if res.status in ("compiled", "hit", "waited"):
                    continue
                res.status, res.error, res.pack = "failed", e.reason, ""
                if may_retry:
                    killed.append(u)
            if not may_retry:
                errors.append(e)
            return
        except JitkilnError as e:
            err: JitkilnError = e
        except BaseException as e:  # noqa: BLE001 - report, never hang the pool
            err = JitkilnError(f"building {job.name} failed: {type(e).__name__}: {e}")
        if len(job.units) == 1:
            res = results[job.units[0].ukey]
            res.status, res.error, res.log = "failed", err.reason, getattr(err, "log", "") or res.log
            errors.append(err)
            if progress:
                progress.finish(job.name, "FAILED", res.seconds)
            return
        if progress:
            progress.note(f"{job.name} failed ({err.reason}); compiling its members separately")
        for u in job.units:
            if results[u.ukey].status in ("compiled", "hit", "waited"):
                continue
            results[u.ukey].status, results[u.ukey].pack = "pending", ""
            exp_s, exp_mem = self.expected(plan, u)
            self._run_job(plan, Job.of_unit(u, exp_s, exp_mem), results, t0, None, errors, killed, may_retry, 0)

    def run_job(self, plan: Plan, job: Job, results: dict[str, UnitResult], t0: float,
                progress: Progress | None = None, spare_cores: int = 0) -> list[tuple[Unit, Entry]]:
        """Compile a job under its members' locks unless someone (another process, another machine) has them;
        publish the artifact under every member's key (members built meanwhile elsewhere are skipped)."""
        labels = HeaderLabels(plan.spec, plan.compiler)
        ready: list[tuple[Unit, Entry]] = []
        for u in job.units:  # a first look, without locks
            e = self.store.lookup(u.ukey, labels.digest)
            if e is not None:
                results[u.ukey].status, results[u.ukey].key, results[u.ukey].pack = "hit", e.key, ""
                ready.append((u, e))
        if len(ready) == len(job.units):
            return ready
        with contextlib.ExitStack() as stack:
            waited: list[str] = []
            todo = []
            for u in sorted((u for u in job.units if results[u.ukey].status != "hit"), key=lambda u: u.ukey):
                stack.enter_context(self.store.lock(u.ukey, u.instance.name, on_wait=waited.append))
            for u in job.units:
                if results[u.ukey].status == "hit":
                    continue
                e = self.store.lookup(u.ukey, labels.digest)  # published between our first look and the lock?
                if e is not None:
                    res = results[u.ukey]
                    res.status, res.key, res.pack = ("waited" if waited else "hit"), e.key, ""
                    ready.append((u, e))
                else:
                    todo.append(u)
            if not todo:
                return ready
            if len(todo) < len(job.units):  # some members were built elsewhere: compile only the rest
                costs = [(results[u.ukey].expected_s, 0) for u in todo]
                p = packing.make_pack(plan.family.packer, todo, costs) if len(todo) > 1 else None
                job = Job.of_pack(p) if p else Job.of_unit(todo[0], *costs[0])
                if p is None and len(todo) > 1:
                    stack.close()
                    for u in todo:
                        results[u.ukey].pack = ""
                        ready += self.run_job(plan, Job.of_unit(u, results[u.ukey].expected_s, 0), results, t0,
                                              progress, spare_cores)
                    return ready
            if progress:
                progress.start(job.name)
            start = time.monotonic() - t0
            log_path = str(self.store.log_path(todo[0].ukey))
            try:
                c = self.executor.compile(plan, job, labels, log_path, spare_cores)
            finally:
                end = time.monotonic() - t0
                for u in todo:
                    results[u.ukey].start, results[u.ukey].end, results[u.ukey].log = start, end, log_path
            r, n = c.result, len(todo)
            members = [u.instance.name for u in todo]
            for u in todo:
                res = results[u.ukey]
                res.mode, res.pack = r.mode, (job.name if n > 1 else "")
                res.seconds, res.cpu_s, res.peak_rss = round(r.seconds, 3), round(r.cpu_s, 3), r.peak_rss
                res.phases = r.phases
                # a pack member's recorded cost is its share of the pack (what the cost model reuses)
                meta = unit_meta(plan, u, r.seconds / n, r.peak_rss, r.phases, r.cpu_s / n)
                if c.host:
                    meta["host"] = c.host
                meta["executor"] = self.executor.name
                if n > 1:
                    meta["packed"] = {"pack": job.name, "members": members, "pack_s": round(r.seconds, 3)}
                entry = self.store.publish(u.ukey, c.deps, c.data, meta)
                res.status, res.key = "compiled", entry.key
                ready.append((u, entry))
            if progress:
                progress.finish(job.name, "compiled", r.seconds)
        return ready
