"""Build: compile the planned units that the cache lacks, each exactly once, urgent first, longest first.

Concurrency is bounded by cores and by free memory (each unit's expected peak, from its last recorded
compile or the family's estimate). Units are independent, so the build's critical path is its longest unit.
Across processes, a per-unit lock in the store makes every unit compile once: the others wait, then load.

Every build writes a JSON record and a ninja-compatible ``.ninja_log`` under the store's ``builds/``.
"""
from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import digests
from .errors import CompilerKilled, JitkilnError
from .family import CompileSpec
from .plan import Plan, Unit
from .store import Entry, Store
from .toolchain import Toolchain, file_digest
from . import pack as packing


# --- header labels: content digests by include-relative name, so keys are portable across machines ---------
class HeaderLabels:
    """Maps header paths to portable labels (``inc0/cute/tensor.hpp``, ``tc/include/cuda.h``) and back."""

    def __init__(self, spec: CompileSpec, toolchain: Toolchain | None):
        roots = [(f"inc{i}", os.path.realpath(d)) for i, d in enumerate(spec.include_dirs)]
        if toolchain is not None and getattr(toolchain, "path", None):
            tc_root = os.path.dirname(os.path.dirname(os.path.realpath(toolchain.path)))
            roots.append(("tc", tc_root))
        self.roots = sorted(roots, key=lambda r: -len(r[1]))
        self._memo: dict[str, str | None] = {}  # one look at each header per lookup batch

    def label(self, path: str) -> str:
        rp = os.path.realpath(path)
        for tag, root in self.roots:
            if rp.startswith(root + os.sep):
                return f"{tag}/{os.path.relpath(rp, root)}"
        return rp

    def path(self, label: str) -> str:
        tag, _, rest = label.partition("/")
        for t, root in self.roots:
            if t == tag:
                return os.path.join(root, rest)
        return label

    def digest(self, label: str) -> str | None:
        if label not in self._memo:
            self._memo[label] = digests.digest(self.path(label))
        return self._memo[label]


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
    mode: str = ""  # nvcc: "pipelined" (host front end beside device, a spare core) or "sequential"
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
            "module": "full" if p.full else "reduced", "toolchain": p.toolchain_fp, "flags": list(p.spec.flags),
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
            "pipeline": {"pipelined": [u.name for u in self.compiled if u.mode == "pipelined"],
                         "rule": PIPELINE_RULE},
            "packing": self.packing,
        }


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


PIPELINE_RULE = ("an nvcc unit compiles pipelined (host front end beside the device chain: same commands, same "
                 "bytes, shorter critical path, one more core) when, at its start, units running + units "
                 "waiting < min(jobs, cores); else sequentially (the second core is better spent on another unit). "
                 "JITKILN_NVCC_PIPELINE=0|1 forces it.")


def pipeline_choice(running: int, waiting: int, cores: int | None = None) -> bool:
    """Whether the unit starting now should compile pipelined (see :data:`PIPELINE_RULE`); ``running``
    counts the units in flight, this one included."""
    forced = os.environ.get("JITKILN_NVCC_PIPELINE")
    if forced in ("0", "1"):
        return forced == "1"
    return running + waiting < (cores or default_jobs())


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


class Progress:
    """A one-line progress bar on a terminal, plain lines otherwise (CI logs, pipes)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.active: dict[str, float] = {}
        self.lock = threading.Lock()

    def _bar(self) -> str:
        n = 24
        fill = int(n * self.done / max(self.total, 1))
        running = ", ".join(sorted(self.active))[:60]
        return f"\r[{'#' * fill}{'.' * (n - fill)}] {self.done}/{self.total} {running}\x1b[K"

    def start(self, name: str) -> None:
        with self.lock:
            self.active[name] = time.monotonic()
            if not self.enabled:
                return
            if self.tty:
                self.stream.write(self._bar())
            else:
                self.stream.write(f"jitkiln: compiling {name}\n")
            self.stream.flush()

    def finish(self, name: str, status: str, seconds: float) -> None:
        with self.lock:
            self.active.pop(name, None)
            self.done += 1
            if not self.enabled:
                return
            if self.tty:
                self.stream.write(self._bar())
                if self.done == self.total:
                    self.stream.write("\n")
            else:
                self.stream.write(f"jitkiln: [{self.done}/{self.total}] {status} {name} ({seconds:.1f} s)\n")
            self.stream.flush()

    def note(self, msg: str) -> None:
        if self.enabled:
            with self.lock:
                self.stream.write(("\n" if self.tty else "") + f"jitkiln: {msg}\n")
                self.stream.flush()


# Observers for tests and the runtime (e.g. tiered start): called with (unit, entry) when a unit is ready.
ReadyCallback = Callable[[Unit, Entry], None]


class Builder:
    def __init__(self, store: Store, jobs: int | None = None, progress: bool = True,
                 on_ready: ReadyCallback | None = None, executor: "Executor | None" = None,
                 urgent_served: bool = False):
        self.store = store
        # a tier 0 serves the plan's calls while it builds: urgent units may be packed (pack.choose)
        self.urgent_served = urgent_served
        self.jobs = max(1, jobs or default_jobs())
        self.progress_enabled = progress
        self.on_ready = on_ready
        self.executor = executor

    # --- one unit ----------------------------------------------------------------------------------
    def lookup(self, plan: Plan, unit: Unit, labels: HeaderLabels | None = None) -> Entry | None:
        """The unit's verified entry, if the cache has one for the headers as they are now. Pass one
        ``labels`` for a batch of lookups: each header is then read once for the whole batch."""
        labels = labels or HeaderLabels(plan.spec, plan.toolchain)
        return self.store.lookup(unit.ukey, labels.digest)

    def expected(self, plan: Plan, unit: Unit) -> tuple[float, int]:
        rec = self.store.recorded_costs(unit.ukey)
        if rec:
            return rec[0], rec[1] or plan.family.memory_estimate(unit.instance)
        return plan.family.cost_estimate(unit.instance), plan.family.memory_estimate(unit.instance)

    def build_unit(self, plan: Plan, unit: Unit, res: UnitResult, t0: float,
                   progress: Progress | None = None) -> Entry:
        """Compile one unit under its lock unless someone (another process, another machine) has it."""
        labels = HeaderLabels(plan.spec, plan.toolchain)
        entry = self.store.lookup(unit.ukey, labels.digest)
        if entry is not None:
            res.status, res.key, res.mode = "hit", entry.key, ""
            return entry
        waited = []
        with self.store.lock(unit.ukey, unit.instance.name, on_wait=waited.append):
            # another process may have published it between our first look and the lock
            entry = self.store.lookup(unit.ukey, labels.digest)
            if entry is not None:
                res.status, res.key, res.mode = ("waited" if waited else "hit"), entry.key, ""
                return entry
            if plan.toolchain is None:
                from .plan import toolchain_for
                plan.toolchain, _ = toolchain_for(plan.spec, required=True)
            if progress:
                progress.start(unit.instance.name)
            res.start = time.monotonic() - t0
            try:
                entry = (self.executor or LocalCompile()).compile(self.store, plan, unit, labels, res)
            finally:
                res.end = time.monotonic() - t0
                if res.mode.startswith("choose:"):  # an executor that does not pipeline (e.g. Ray)
                    res.mode = ""
            res.status, res.key = "compiled", entry.key
            if progress:
                progress.finish(unit.instance.name, "compiled", res.seconds)
            return entry

    # --- a plan ------------------------------------------------------------------------------------
    def build(self, plan: Plan, units: Iterable[Unit] | None = None, raise_on_error: bool = True) -> BuildRecord:
        self.store.ensure()
        todo = list(units) if units is not None else list(plan.units)
        t0, started = time.monotonic(), time.time()
        results: dict[str, UnitResult] = {}
        queue = []
        labels = HeaderLabels(plan.spec, plan.toolchain)
        for i, u in enumerate(todo):
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
            # urgent first, then longest expected compile first
            heapq.heappush(queue, (0 if u.urgent else 1, -exp_s, i, u, exp_mem))
        queue, pack_info = self._pack(plan, queue, results)
        digests.flush()
        progress = Progress(len(queue), enabled=self.progress_enabled)
        errors: list[JitkilnError] = []
        killed: list[tuple[Unit, UnitResult]] = []
        self._run_queue(plan, queue, results, t0, progress, errors, killed)
        for u, res in killed:  # the OOM killer took it: retry alone, with the whole machine
            progress.note(f"{u.instance.name} was killed (likely out of memory); retrying it alone")
            self._run_queue(plan, [(0, 0, 0, u, 0)], results, t0, None, errors, [], jobs=1)
        record = BuildRecord(plan, [results[u.ukey] for u in todo], time.monotonic() - t0, self.jobs, started,
                             host=os.uname().nodename,
                             executor=getattr(self.executor, "name", "local"), packing=pack_info)
        self.write_record(record)
        if errors and raise_on_error:
            raise errors[0]
        return record

    def _pack(self, plan: Plan, queue: list, results: dict[str, UnitResult]) -> tuple[list, dict[str, Any]]:
        """Group the queued units into packs when cores are few (:func:`jitkiln.pack.choose`); the
        decision and its reason go into the build record (``packing``)."""
        local = self.executor is None or getattr(self.executor, "name", "") == "local"
        items = [(it[3], -it[1], it[4]) for it in queue]
        choice = packing.choose(plan.family.name, items, self.jobs, int(available_memory()),
                                enabled=local and os.environ.get("JITKILN_PACK", "1") != "0",
                                urgent_served=self.urgent_served)
        if not local:
            choice.reason = f"executor {getattr(self.executor, 'name', '?')}: every unit separately"
        by_key = {it[3].ukey: it for it in queue}
        out: list = []
        for g in choice.groups:
            p = packing.make_pack(plan.family.name, g, [(-by_key[u.ukey][1], by_key[u.ukey][4]) for u in g])
            if p is None:
                out += [by_key[u.ukey] for u in g]
                continue
            choice.packs.append(p)
            for u in g:
                results[u.ukey].pack = p.name
            first = min(by_key[u.ukey][2] for u in g)
            out.append((0 if any(u.urgent for u in g) else 1, -p.expected_s, first, p, p.expected_mem))
        heapq.heapify(out)
        return out, choice.to_json()

    def build_pack(self, plan: Plan, pk: "packing.Pack", results: dict[str, UnitResult], t0: float,
                   progress: Progress | None, pipelined: bool) -> list[tuple[Unit, Entry]]:
        """Compile a pack once and publish its artifact under every member's key (members someone else
        built meanwhile are skipped; one left alone compiles as a plain unit)."""
        labels = HeaderLabels(plan.spec, plan.toolchain)
        ready: list[tuple[Unit, Entry]] = []
        with contextlib.ExitStack() as stack:
            waited: list[str] = []
            for u in sorted(pk.units, key=lambda u: u.ukey):
                stack.enter_context(self.store.lock(u.ukey, u.instance.name, on_wait=waited.append))
            todo = []
            for u in pk.units:
                entry = self.store.lookup(u.ukey, labels.digest)
                if entry is not None:
                    res = results[u.ukey]
                    res.status, res.key, res.mode, res.pack = ("waited" if waited else "hit"), entry.key, "", ""
                    ready.append((u, entry))
                else:
                    todo.append(u)
            if not todo:
                return ready
            if len(todo) < len(pk.units):
                exp = [(results[u.ukey].expected_s, 0) for u in todo]
                smaller = packing.make_pack(plan.family.name, todo, [(c, 1) for c, _ in exp])
                if smaller is None:
                    stack.close()
                    for u in todo:
                        results[u.ukey].pack = ""
                        ready.append((u, self.build_unit(plan, u, results[u.ukey], t0, progress)))
                    return ready
                pk = smaller
            if plan.toolchain is None:
                from .plan import toolchain_for
                plan.toolchain, _ = toolchain_for(plan.spec, required=True)
            if progress:
                progress.start(pk.name)
            start = time.monotonic() - t0
            log_path = self.store.log_path(pk.units[0].ukey)
            try:
                r, data, deps = compile_unit(plan.spec, plan.toolchain, labels, pk.name, pk.source, pk.ukey,
                                             log_path=str(log_path), pipeline=pipelined)
            finally:
                end = time.monotonic() - t0
            mode = ("" if plan.toolchain.name != "nvcc" else
                    "pipelined" if "(pipelined)" in r.command else "sequential")
            members = [u.instance.name for u in pk.units]
            for u in pk.units:
                res = results[u.ukey]
                res.start, res.end, res.pack, res.mode = start, end, pk.name, mode
                res.seconds, res.cpu_s, res.peak_rss = round(r.seconds, 3), round(r.cpu_s, 3), r.peak_rss
                res.phases, res.log = r.phases, str(log_path)
                # the recorded cost is this member's share of the pack (what the cost model reuses)
                meta = unit_meta(plan, u, r.seconds / len(pk.units), r.peak_rss, r.phases,
                                 r.cpu_s / len(pk.units))
                meta["packed"] = {"pack": pk.name, "members": members, "pack_s": round(r.seconds, 3)}
                entry = self.store.publish(u.ukey, deps, data, meta)
                res.status, res.key = "compiled", entry.key
                ready.append((u, entry))
            if progress:
                progress.finish(pk.name, "compiled", r.seconds)
        return ready

    def _run_queue(self, plan, queue, results, t0, progress, errors, killed, jobs=None) -> None:
        jobs = jobs or self.jobs
        lock = threading.Condition()
        state = {"running": 0, "mem": 0}
        heap = list(queue)
        heapq.heapify(heap)

        def worker() -> None:
            while True:
                with lock:
                    while True:
                        if not heap:
                            return
                        need = heap[0][4]
                        # admit if memory allows, and always admit one job when nothing runs
                        if state["running"] == 0 or state["mem"] + need <= available_memory() * 0.9:
                            item = heapq.heappop(heap)
                            state["running"] += 1
                            state["mem"] += need
                            pipelined = pipeline_choice(state["running"], len(heap), min(jobs, default_jobs()))
                            break
                        lock.wait(0.5)
                _, _, _, u, mem = item
                if isinstance(u, packing.Pack):
                    try:
                        self._run_pack(plan, u, results, t0, progress, errors, killed, jobs, pipelined)
                    finally:
                        with lock:
                            state["running"] -= 1
                            state["mem"] -= mem
                            lock.notify_all()
                    continue
                res = results[u.ukey]
                res.mode = "choose:pipelined" if pipelined else "choose:sequential"
                try:
                    entry = self.build_unit(plan, u, res, t0, progress)
                    if self.on_ready:
                        self.on_ready(u, entry)
                except CompilerKilled as e:
                    res.status, res.error = "failed", e.reason
                    if killed is not None and jobs > 1:
                        killed.append((u, res))
                    else:
                        errors.append(e)
                except JitkilnError as e:
                    res.status, res.error = "failed", e.reason
                    res.log = getattr(e, "log", "")
                    errors.append(e)
                    if progress:
                        progress.finish(u.instance.name, "FAILED", res.seconds)
                except BaseException as e:  # noqa: BLE001 - report, never hang the pool
                    res.status, res.error = "failed", f"{type(e).__name__}: {e}"
                    errors.append(JitkilnError(f"building {u.instance.name} failed: {type(e).__name__}: {e}"))
                finally:
                    with lock:
                        state["running"] -= 1
                        state["mem"] -= mem
                        lock.notify_all()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(jobs, max(len(heap), 1)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _run_pack(self, plan, pk, results, t0, progress, errors, killed, jobs, pipelined) -> None:
        try:
            for u, entry in self.build_pack(plan, pk, results, t0, progress, pipelined):
                if self.on_ready:
                    self.on_ready(u, entry)
            return
        except CompilerKilled as e:
            for u in pk.units:
                res = results[u.ukey]
                if res.status != "pending":
                    continue
                res.status, res.error, res.pack = "failed", e.reason, ""
                if killed is not None and jobs > 1:
                    killed.append((u, res))
                else:
                    errors.append(e)
            return
        except JitkilnError as e:
            if progress:
                progress.note(f"{pk.name} failed ({e.reason}); compiling its members separately")
        except BaseException as e:  # noqa: BLE001
            if progress:
                progress.note(f"{pk.name} failed ({type(e).__name__}: {e}); compiling its members separately")
        for u in pk.units:  # a pack that does not compile: its members, one by one
            res = results[u.ukey]
            if res.status in ("compiled", "hit", "waited"):
                continue
            res.status, res.pack = "pending", ""
            try:
                entry = self.build_unit(plan, u, res, t0, None)
                if self.on_ready:
                    self.on_ready(u, entry)
            except JitkilnError as e:
                res.status, res.error, res.log = "failed", e.reason, getattr(e, "log", "")
                errors.append(e)

    # --- records -----------------------------------------------------------------------------------
    def write_record(self, record: BuildRecord, out_dir: str | os.PathLike | None = None) -> None:
        d = Path(out_dir) if out_dir else self.store.records_dir()
        d.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(record.started))
        base = f"{stamp}-{record.plan.family.name}-{record.plan.module_key[:12]}-{os.urandom(3).hex()}"
        record.ninja_log = d / f"{base}.ninja_log"
        record.ninja_log.write_text(ninja_log(record))
        record.path = d / f"{base}.json"
        record.path.write_text(json.dumps(record.to_json(), indent=1, default=str))
        (d / "last").write_text(str(record.path))


def ninja_log(record: BuildRecord) -> str:
    """ninja log v5: start_ms, end_ms, mtime, output, command hash (one line per compiled unit)."""
    lines = ["# ninja log v5"]
    for u in record.units:
        if u.status != "compiled":
            continue
        lines.append(f"{int(u.start * 1000)}\t{int(u.end * 1000)}\t0\t{u.name}.so\t{u.ukey[:16]}")
    return "\n".join(lines) + "\n"


class Executor:
    """Where a unit compiles: :class:`LocalCompile` here; :mod:`jitkiln.ray_executor` on a Ray cluster."""

    name = "local"

    def compile(self, store: Store, plan: Plan, unit: Unit, labels: HeaderLabels, res: UnitResult) -> Entry:
        raise NotImplementedError


FIXED_MTIME = 946684800  # 2000-01-01: the line table records the source file's mtime
ORPHAN_WAIT_S = 10.0


def unit_dir(ukey: str) -> Path:
    """The fixed directory a unit compiles in. nvcc writes its working directory into the artifact (PTX
    ``.file``, the module id), so one directory per unit key makes the bytes the same on every machine with
    the same toolchain, headers and temp directory."""
    import tempfile
    return Path(tempfile.gettempdir()) / "jitkiln-build" / ukey[:32]


def compile_unit(spec: CompileSpec, tc: Toolchain, labels: HeaderLabels, name: str, source: str, ukey: str,
                 log_path: str | None = None, pipeline: bool = False):
    """Compile one unit, reproducibly; return (CompileResult, artifact bytes, {header label: digest}).

    The unit's directory is locked by the compiler process itself (the lock lives as long as the compiler):
    if an orphaned compiler of a killed build still holds it, this compile waits for it a little
    (``ORPHAN_WAIT_S``), then takes a private directory rather than wait longer (its bytes then differ; its
    key and its behaviour do not).
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
        (work / "keep").mkdir(parents=True)
        src = work / f"{name}.cu"
        src.write_text(source)
        os.utime(src, (FIXED_MTIME, FIXED_MTIME))
        out = work / "artifact.so"
        extra = ({"keep_dir": str(work / "keep"), "hold_fd": lock_fd, "pipeline": pipeline}
                 if tc.name == "nvcc" else {})
        r = tc.compile(str(src), str(out), spec, str(work / "deps.d"), log_path=log_path, **extra)
        deps = {labels.label(p): file_digest(p) for p in r.deps
                if os.path.realpath(p) != os.path.realpath(src)}
        return r, out.read_bytes(), deps
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock_fd)


class LocalCompile(Executor):
    name = "local"

    def compile(self, store: Store, plan: Plan, unit: Unit, labels: HeaderLabels, res: UnitResult) -> Entry:
        assert plan.toolchain is not None
        log_path = store.log_path(unit.ukey)
        r, data, deps = compile_unit(plan.spec, plan.toolchain, labels, unit.instance.name, unit.source,
                                     unit.ukey, log_path=str(log_path), pipeline=res.mode == "choose:pipelined")
        res.mode = ("" if plan.toolchain.name != "nvcc" else
                    "pipelined" if "(pipelined)" in r.command else "sequential")
        res.seconds, res.cpu_s, res.peak_rss = round(r.seconds, 3), round(r.cpu_s, 3), r.peak_rss
        res.phases, res.log = r.phases, str(log_path)
        meta = unit_meta(plan, unit, r.seconds, r.peak_rss, r.phases, r.cpu_s)
        return store.publish(unit.ukey, deps, data, meta)


def unit_meta(plan: Plan, unit: Unit, seconds: float, peak_rss: int, phases: dict,
              cpu_s: float = 0.0) -> dict[str, Any]:
    return {"name": unit.instance.name, "family": plan.family.name, "variant": plan.variant,
            "instance_digest": unit.instance.digest, "params": unit.instance.params(),
            "symbol": unit.instance.symbol, "compile_s": round(seconds, 3), "cpu_s": round(cpu_s, 3), "peak_rss": peak_rss,
            "phases": phases, "toolchain": plan.toolchain_fp, "flags": list(plan.spec.flags),
            "arch": plan.spec.arch, "host": os.uname().nodename}
