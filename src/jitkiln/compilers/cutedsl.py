"""CuTe DSL (``nvidia-cutlass-dsl``): a family's Python kernel compiled ahead of time into a C-ABI shared object.

A DSL unit's text (what the family renders; the whole text is the cache key) is::

    // jitkiln-cutedsl {"kernel": "pkg.module", "kernel_sha256": "...", "entry": "compile_for", "params": {...},
    //                  "prefix": "jkg_<digest12>"}                      (one line of JSON)
    //@@file glue.cu       CUDA C++ without CUTLASS (routing, gather, ...): nvcc -c, while the DSL compiles
    ...
    //@@file bridge.c      C calling the exported kernel through the header the DSL writes (<prefix>.h)
    ...

A unit whose ``kernel`` is null holds CUDA files only (a variant's plain CUDA units, e.g. moe2stage's weight-stream
units in ``bf16-dsl``): nvcc compiles and links them; no worker is asked.

:meth:`CuteDsl.compile` sends ``(kernel file, digest, params, arch)`` to a resident worker
(:mod:`.cutedsl_worker`: the DSL imported once per worker, not per unit), which runs ``entry(params)``
(``cute.compile`` on fake tensors: no GPU) and ``export_to_c`` (a header and an ELF object holding the host
launch code and the embedded cubin). Meanwhile nvcc compiles the ``.cu`` files; then the ``.c`` files are
compiled with the host compiler and everything is linked by nvcc (static cudart) with the DSL's
``libcuda_dialect_runtime_static.a`` into the artifact.

Keys: the fingerprint covers the DSL's version, the content of its compiled libraries (the MLIR bindings, the
runtime libraries) and of its wheels' RECORD files (every Python file's digest), the Python version, and nvcc's
binaries; the unit text carries the kernel module's content digest (checked again before compiling) and the
parameters; the arch is in the compile spec. The kernel module is reported as a dependency.

Workers: one per concurrent job, reused across jobs and builds in this process, restarted when one dies (the
job is retried once on a fresh worker); they exit with their parent (their input pipe closes). ``job.hold_fd``
goes to the nvcc/cc/link processes; the DSL compile itself runs in the worker inside the call.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import CompileError, ToolchainNotFound
from .base import (CompileJob, CompileResult, Compiler, parse_depfile, raise_for_exit, run_measured)

PIP = "pip install nvidia-cutlass-dsl==4.8.1"
SUPPORTED = ("4.8.",)  # DSL versions whose API jitkiln's kernels are written for
DISTS = ("nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
         "nvidia-cutlass-dsl-libs-cu12", "nvidia-cutlass-dsl-libs-cu13")
HEADER = "// jitkiln-cutedsl "
FILE_MARK = re.compile(r"^//@@file ([A-Za-z0-9_.-]+)\s*$", re.M)


def parse_unit(text: str) -> tuple[dict, dict[str, str]]:
    """A DSL unit's text -> (its spec, {file name: text})."""
    first, _, rest = text.partition("\n")
    if not first.startswith(HEADER):
        raise CompileError("not a CuTe DSL unit: the first line must be `// jitkiln-cutedsl {json}`")
    spec = json.loads(first[len(HEADER):])
    files: dict[str, str] = {}
    parts = FILE_MARK.split(rest)
    for name, body in zip(parts[1::2], parts[2::2]):
        files[name] = body
    return spec, files


def kernel_file(module: str) -> str:
    """The file of a kernel module, found without importing it (nor the DSL)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise CompileError(f"kernel module {module!r} not found")
    return spec.origin


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Worker:
    """One resident DSL process (JSON lines over pipes)."""

    def __init__(self, arch: str):
        env = dict(os.environ, CUTE_DSL_ARCH=arch, PYTHONUNBUFFERED="1")
        self.stderr_path = os.path.join(_runtime_dir(), f"cutedsl-worker-{os.getpid()}-{id(self):x}.log")
        self.errf = open(self.stderr_path, "ab")
        t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "jitkiln.compilers.cutedsl_worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.errf, text=True, bufsize=1,
                                  start_new_session=True, env=env)
        hello = self.p.stdout.readline()
        if not hello:
            self.close()
            raise ToolchainNotFound("the CuTe DSL compile worker did not start",
                                    hint=f"see {self.stderr_path}; check that `python -c 'import cutlass.cute'` "
                                         f"works, or reinstall with `{PIP}`")
        self.hello = json.loads(hello)
        self.start_s = time.monotonic() - t0
        self.jobs = 0

    def request(self, req: dict, timeout: float | None) -> dict:
        timer = threading.Timer(timeout, self.kill) if timeout else None
        if timer:
            timer.start()
        try:
            self.p.stdin.write(json.dumps(req) + "\n")
            self.p.stdin.flush()
            line = self.p.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        finally:
            if timer:
                timer.cancel()
        if not line:
            raise _WorkerDied(self.p.poll())
        self.jobs += 1
        return json.loads(line)

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self.errf.close()


class _WorkerDied(Exception):
    pass


def _runtime_dir() -> str:
    base = os.environ.get("JITKILN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jitkiln")
    d = os.path.join(base, "cutedsl")
    os.makedirs(d, exist_ok=True)
    return d


class WorkerPool:
    """Idle workers per arch; a job takes one (or starts one) and gives it back."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idle: dict[str, list[_Worker]] = {}
        self.started = 0

    def take(self, arch: str) -> tuple[_Worker, bool]:
        with self.lock:
            ws = self.idle.setdefault(arch, [])
            while ws:
                w = ws.pop()
                if w.alive():
                    return w, False
                w.close()
        w = _Worker(arch)
        with self.lock:
            self.started += 1
        return w, True

    def give(self, arch: str, w: _Worker) -> None:
        if not w.alive():
            w.close()
            return
        with self.lock:
            self.idle.setdefault(arch, []).append(w)

    def warm(self, arch: str, n: int = 1) -> None:
        """Start ``n`` workers now (imports paid before the first job arrives)."""
        ws = [self.take(arch)[0] for _ in range(n)]
        for w in ws:
            self.give(arch, w)

    def shutdown(self) -> None:
        with self.lock:
            ws = [w for v in self.idle.values() for w in v]
            self.idle.clear()
        for w in ws:
            w.close()


POOL = WorkerPool()


class CuteDsl(Compiler):
    name = "cutedsl"
    policy = "CuTe DSL kernel in a resident worker, nvcc for the .cu glue at the same time, then one link"

    def __init__(self, pkg_dir: str, version: str, nvcc):
        self.pkg_dir = pkg_dir
        self.path = pkg_dir
        self._version = version
        self.nvcc = nvcc
        self.cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or "cc"

    @classmethod
    def find(cls) -> "CuteDsl":
        try:
            version = importlib.metadata.version("nvidia-cutlass-dsl")
        except importlib.metadata.PackageNotFoundError:
            raise ToolchainNotFound("the CuTe DSL (nvidia-cutlass-dsl) is not installed",
                                    hint=f"install it with `{PIP}`") from None
        if not version.startswith(SUPPORTED):
            raise ToolchainNotFound(
                f"nvidia-cutlass-dsl {version} is installed; jitkiln's CuTe DSL kernels are written for the API of "
                f"{', '.join(v + 'x' for v in SUPPORTED)}",
                hint=f"install the supported version with `{PIP}` (no other version is used silently)")
        spec = importlib.util.find_spec("nvidia_cutlass_dsl")
        if spec is None or not spec.submodule_search_locations:
            raise ToolchainNotFound("nvidia-cutlass-dsl's package folder was not found", hint=f"reinstall: `{PIP}`")
        pkg = list(spec.submodule_search_locations)[0]
        from .nvcc import Nvcc
        return cls(pkg, version, Nvcc.find())

    @property
    def version(self) -> str:
        return f"{self._version}-py{sys.version_info[0]}.{sys.version_info[1]}"

    @property
    def root(self) -> str:
        return self.nvcc.root  # the glue's CUDA headers are named relative to the toolkit

    def runtime_lib(self) -> str:
        libs = sorted(glob.glob(os.path.join(self.pkg_dir, "cu*", "lib", "libcuda_dialect_runtime_static.a")))
        if not libs:
            raise ToolchainNotFound("nvidia-cutlass-dsl has no libcuda_dialect_runtime_static.a",
                                    hint=f"reinstall with `{PIP}`")
        return libs[0]

    def binaries(self) -> list[str]:
        """The DSL's compiled libraries, its wheels' RECORD files (digests of every file they installed), and
        the nvcc toolchain that compiles the glue."""
        out = sorted(glob.glob(os.path.join(self.pkg_dir, "**", "*.so"), recursive=True)
                     + glob.glob(os.path.join(self.pkg_dir, "**", "*.a"), recursive=True))
        out = [p for p in out if "/stubs/" not in p]
        for d in DISTS:
            try:
                dist = importlib.metadata.distribution(d)
            except importlib.metadata.PackageNotFoundError:
                continue
            rec = dist.locate_file(f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info/RECORD")
            if os.path.isfile(rec):
                out.append(str(rec))
        return out + self.nvcc.binaries() + [self.cc]

    def describe(self):
        d = super().describe()
        d["nvcc"] = self.nvcc.path
        return d

    # --- one unit ---------------------------------------------------------------------------------------
    def compile(self, job: CompileJob) -> CompileResult:
        t0 = time.monotonic()
        text = Path(job.source_path).read_text()
        spec, files = parse_unit(text)
        unit = os.path.basename(job.source_path)
        kpath = kernel_file(spec["kernel"]) if spec.get("kernel") else None  # None: CUDA files only
        if kpath and file_sha256(kpath) != spec["kernel_sha256"]:
            raise CompileError(f"CuTe DSL kernel module {kpath} changed since {unit} was planned",
                               hint="plan again (the unit's key names the module's content)", unit=unit)
        work = job.workdir
        for name, body in files.items():
            Path(work, name).write_text(body)
        log: list[str] = [f"cutedsl {self.version}: {spec.get('kernel') or 'no DSL kernel (CUDA files only)'} "
                          f"{json.dumps(spec.get('params', {}), sort_keys=True)}"]
        phases: dict[str, float] = {}
        cpu = 0.0
        peak = 0
        deps: list[str] = [job.source_path] + ([kpath] if kpath else [])
        cu = [n for n in files if n.endswith(".cu")]
        cfiles = [n for n in files if n.endswith((".c", ".cpp"))]

        def nvcc_obj(name: str):
            o = os.path.join(work, name + ".o")
            d = os.path.join(work, name + ".d")
            keep = os.path.join(work, "keep-" + name)
            os.makedirs(keep, exist_ok=True)
            cmd = [self.nvcc.path, *self.nvcc.gencode(job.spec.arch), "-std=c++17", "-O3", "-c",
                   "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-MD", "-MF", d,
                   # -keep: intermediates named after the source, not tmpxft_<pid> (which would enter the artifact)
                   "-keep", "-keep-dir", keep, *job.spec.flags, os.path.join(work, name), "-o", o]
            r = run_measured(cmd, cwd=work, timeout=job.timeout, hold_fd=job.hold_fd)
            return cmd, r, o, d

        with ThreadPoolExecutor(max(1, len(cu))) as ex:
            t_glue = time.monotonic()
            futs = [ex.submit(nvcc_obj, n) for n in cu]
            dsl = self._dsl(job, spec, kpath, log) if kpath else {}
            if kpath:
                phases["dsl_compile"] = dsl.get("compile_s", 0.0)
                phases["dsl_export"] = dsl.get("export_s", 0.0)
            if dsl.get("worker_start_s"):
                phases["dsl_worker_start"] = dsl["worker_start_s"]
            cpu += dsl.get("cpu_s", 0.0)
            peak = max(peak, dsl.get("peak_rss", 0))
            objs = []
            for f in futs:
                cmd, (rc, out, wall, pk, c), o, d = f.result()
                log.append(f"$ {shlex.join(cmd)}\n{out}")
                self._write_log(job, log)
                raise_for_exit(rc, unit, out, job.log_path, compiler="nvcc (cutedsl glue)")
                phases["glue_nvcc"] = round(time.monotonic() - t_glue, 4)
                cpu += c
                peak = max(peak, pk)
                objs.append(o)
                if os.path.exists(d):  # the headers the glue read (its own file in the working folder is the unit)
                    wd = os.path.realpath(work) + os.sep
                    deps += [p for p in parse_depfile(Path(d).read_text())
                             if os.path.isabs(p) and not os.path.realpath(p).startswith(wd)]
        t1 = time.monotonic()
        for n in cfiles:
            o = os.path.join(work, n + ".o")
            cuda_inc = os.path.join(self.nvcc.root, "include")
            cmd = [self.cc, "-c", "-O2", "-fPIC", "-fvisibility=hidden", "-I", work, "-I", cuda_inc,
                   os.path.join(work, n), "-o", o]
            rc, out, wall, pk, c = run_measured(cmd, cwd=work, timeout=job.timeout, hold_fd=job.hold_fd)
            log.append(f"$ {shlex.join(cmd)}\n{out}")
            self._write_log(job, log)
            raise_for_exit(rc, unit, out, job.log_path, compiler="cc (cutedsl bridge)")
            cpu += c
            objs.append(o)
        dsl_objs = [os.path.join(work, "dsl", spec["prefix"] + ".o"), self.runtime_lib()] if kpath else []
        cmd = [self.nvcc.path, "-shared", "-o", job.out_path, *objs, *dsl_objs]
        rc, out, wall, pk, c = run_measured(cmd, cwd=work, timeout=job.timeout, hold_fd=job.hold_fd)
        log.append(f"$ {shlex.join(cmd)}\n{out}")
        self._write_log(job, log)
        raise_for_exit(rc, unit, out, job.log_path, compiler="nvcc (cutedsl link)")
        cpu += c
        phases["bridge_link"] = round(time.monotonic() - t1, 4)
        seen: set[str] = set()
        deps = [p for p in deps if not (p in seen or seen.add(p))]
        return CompileResult(seconds=time.monotonic() - t0, peak_rss=peak, deps=deps, phases=phases,
                             log="\n".join(log), command=[sys.executable, "-m", "jitkiln.compilers.cutedsl_worker"],
                             cpu_s=cpu, mode=("nvcc-only" if not kpath else
                                                 "worker-warm" if not dsl.get("worker_start_s") else "worker-fresh"))

    def _write_log(self, job: CompileJob, log: list[str]) -> None:
        if job.log_path:
            Path(job.log_path).write_text("\n".join(log) + "\n")

    def _dsl(self, job: CompileJob, spec: dict, kpath: str, log: list[str]) -> dict:
        """The DSL compile and export in a resident worker; a worker that dies is replaced once."""
        unit = os.path.basename(job.source_path)
        req = {"kernel_path": kpath, "kernel_sha256": spec["kernel_sha256"], "entry": spec.get("entry", "compile_for"),
               "params": spec["params"], "outdir": os.path.join(job.workdir, "dsl"), "prefix": spec["prefix"]}
        for attempt in (1, 2):
            w, fresh = POOL.take(job.spec.arch)
            try:
                rep = w.request(req, job.timeout)
            except _WorkerDied as e:
                w.close()
                log.append(f"cutedsl worker {w.p.pid} died (exit {e.args[0]}) on attempt {attempt}; "
                           f"its stderr: {w.stderr_path}")
                self._write_log(job, log)
                if attempt == 2:
                    from ..errors import CompilerKilled
                    raise CompilerKilled(f"the CuTe DSL worker died twice compiling {unit}",
                                         hint="likely out of memory: retry with fewer parallel jobs",
                                         details=f"log: {job.log_path}; worker stderr: {w.stderr_path}",
                                         unit=unit, log=job.log_path or "") from None
                continue
            POOL.give(job.spec.arch, w)
            if fresh:
                rep["worker_start_s"] = round(w.start_s, 4)
            break
        if not rep.get("ok"):
            log.append(rep.get("traceback", ""))
            self._write_log(job, log)
            params = json.dumps(spec["params"], sort_keys=True)
            if rep.get("kind") == "api":
                reason = (f"nvidia-cutlass-dsl {self._version}: its API differs from what {spec['kernel']} uses "
                          f"({rep['error'].splitlines()[0]})")
                hint = f"install the supported version with `{PIP}`; the full log is {job.log_path}"
            else:
                reason = f"CuTe DSL compile of {unit} ({spec['kernel']}, {params}) failed"
                hint = f"the full log is {job.log_path}"
            raise CompileError(reason, hint=hint, details=rep.get("error", "")[:2000], unit=unit,
                               log=job.log_path or "")
        log.append(f"dsl compile {rep['compile_s']} s, export {rep['export_s']} s (worker "
                   f"{'fresh' if 'worker_start_s' in rep else 'warm'}): {rep['files']}")
        return rep
