"""Compiler adapters: find the compiler, fingerprint it, compile one unit to a loadable artifact.

The adapter reports what the cache key needs and what the report shows:

* ``fingerprint``: compiler identity, version and the digest of its binaries (and the host compiler's),
* the list of every header the unit included (from the compiler's own dependency output),
* wall seconds, peak memory (``wait4`` rusage of the compiler process tree) and per-phase times.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import CompileError, CompilerKilled, ToolchainNotFound
from .family import CompileSpec


@dataclass
class CompileResult:
    seconds: float
    peak_rss: int  # bytes
    deps: list[str]  # every file the unit read (headers), absolute paths
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    log: str = ""
    command: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # user + system CPU seconds of the compiler and the children it waited for


_digest_memo: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised within the process per (path, size, inode, mtime, ctime)."""
    st = os.stat(path)
    k = (os.fspath(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    d = _digest_memo.get(k)
    if d is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d = h.hexdigest()
        _digest_memo[k] = d
    return d


def run_measured(cmd: list[str], cwd: str | None = None, env: dict | None = None,
                 timeout: float | None = None, hold_fd: int | None = None) -> tuple[int, str, float, int, float]:
    """Run ``cmd`` in its own process group; return (exit code, output, wall s, peak RSS bytes, CPU s).

    The exit code is negative for a signal. Peak RSS comes from ``wait4``: the largest resident set of the
    process and the descendants it waited for (nvcc waits for cicc, ptxas, gcc...). ``hold_fd`` (a locked
    file) is handed to the compiler, so the lock lives exactly as long as the compiler does.
    """
    import signal
    import subprocess
    import tempfile
    import threading

    t0 = time.monotonic()
    with tempfile.TemporaryFile() as logf:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             pass_fds=(hold_fd,) if hold_fd is not None else ())

        def kill() -> None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            kill()  # interrupted or torn down: never leave a compiler running
            raise
        finally:
            if timer:
                timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        logf.seek(0)
        out = logf.read().decode(errors="replace")
    return p.returncode, out, time.monotonic() - t0, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime


class Toolchain:
    """Base class of compiler adapters."""

    name: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["Toolchain"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            Toolchain._registry[cls.name] = cls

    @classmethod
    def find(cls) -> "Toolchain":
        raise NotImplementedError

    @staticmethod
    def first_executable(candidates: list[tuple[str, str]]) -> tuple[str | None, list[str]]:
        """The first (origin, path) candidate that is an executable file, and what was tried before it."""
        tried = []
        for origin, p in candidates:
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p, tried
            tried.append(f"{origin}: {p}")
        return None, tried

    path: str
    version: str

    def _binaries(self) -> list[str]:
        """Every binary whose bytes decide the output (the driver, the compilers it runs, the host compiler)."""
        return [self.path]

    @property
    def fingerprint(self) -> str:
        """``NAME-VERSION-DIGEST``: the version plus the sha256 of every binary in :meth:`_binaries`."""
        fp = getattr(self, "_fp", None)
        if fp is None:
            h = hashlib.sha256(f"{self.name} {self.version}".encode())
            for b in self._binaries():
                h.update(os.path.basename(b).encode())
                h.update(_cached_binary_digest(b).encode())
            fp = self._fp = f"{self.name}-{self.version}-{h.hexdigest()[:16]}"
        return fp

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "version": self.version, "fingerprint": self.fingerprint}

    def command(self, src: str, out: str, spec: CompileSpec, deps_path: str, time_path: str) -> list[str]:
        raise NotImplementedError

    def compile(self, src: str, out: str, spec: CompileSpec, deps_path: str, log_path: str | None = None,
                timeout: float | None = None) -> CompileResult:
        raise NotImplementedError


def parse_depfile(text: str) -> list[str]:
    """Make-style dependency file -> the prerequisites (the first one, the source itself, included)."""
    text = text.replace("\\\n", " ")
    _, _, rhs = text.partition(": ")
    if not rhs:
        _, _, rhs = text.partition(":")
    deps: list[str] = []
    tok = ""
    i = 0
    while i < len(rhs):
        c = rhs[i]
        if c == "\\" and i + 1 < len(rhs) and rhs[i + 1] == " ":
            tok += " "
            i += 2
            continue
        if c.isspace():
            if tok:
                deps.append(tok)
                tok = ""
        else:
            tok += c
        i += 1
    if tok:
        deps.append(tok)
    return deps


def _first_error_lines(log: str, n: int = 8) -> str:
    lines = log.splitlines()
    errs = [i for i, l in enumerate(lines) if re.search(r"\berror\b", l, re.I)]
    start = errs[0] if errs else 0
    return "\n".join(lines[start:start + n])


def raise_for_exit(rc: int, src: str, log: str, log_path: str | None, compiler: str = "nvcc") -> None:
    """Turn a compiler's exit status into the error to report: killed by a signal (likely out of memory),
    or failed with the unit, its first error lines and the log path. Returns for a zero status."""
    if rc < 0 or rc in (137, 139):
        import signal
        sig = -rc if rc < 0 else rc - 128
        raise CompilerKilled(
            f"the compiler ({compiler}) was killed by signal {sig} while compiling {src}"
            + (" (likely out of memory)" if sig == signal.SIGKILL else ""),
            hint="retry with fewer parallel jobs (`jitkiln build ... --jobs 1`) or on a machine with more "
                 "memory; nothing was written to the cache",
            details=f"log: {log_path}" if log_path else "", unit=src, log=log_path or "")
    if rc != 0:
        raise CompileError(f"{compiler} failed (exit {rc}) compiling {src}",
                           hint=f"the full log is {log_path}" if log_path else "",
                           details=_first_error_lines(log), unit=src, log=log_path or "")


class Nvcc(Toolchain):
    """NVIDIA nvcc: found through ``JITKILN_NVCC``, ``PATH``, ``CUDA_HOME`` or the ``nvidia-cuda-nvcc`` wheel."""

    name = "nvcc"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fp: str | None = None
        self._version: str | None = None

    @staticmethod
    def candidates() -> list[tuple[str, str]]:
        import glob
        out: list[tuple[str, str]] = []
        env = os.environ.get("JITKILN_NVCC")
        if env:
            out.append(("JITKILN_NVCC", env))
        w = shutil.which("nvcc")
        if w:
            out.append(("PATH", w))
        for var in ("CUDA_HOME", "CUDA_PATH"):
            if os.environ.get(var):
                out.append((var, os.path.join(os.environ[var], "bin", "nvcc")))
        for sp in sys.path:
            for pat in ("nvidia/cuda_nvcc/bin/nvcc", "nvidia/cu*/bin/nvcc"):
                for p in glob.glob(os.path.join(sp, pat)):
                    out.append(("nvidia-cuda-nvcc wheel", p))
        out.append(("default", "/usr/local/cuda/bin/nvcc"))
        return out

    @classmethod
    def find(cls) -> "Nvcc":
        env = os.environ.get("JITKILN_NVCC")
        if env and not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise ToolchainNotFound(f"JITKILN_NVCC={env} is not an executable file",
                                    hint="point JITKILN_NVCC at nvcc, or unset it to search PATH, CUDA_HOME and "
                                         "the nvidia-cuda-nvcc wheel")
        path, tried = cls.first_executable(cls.candidates())
        if path:
            return cls(path)
        raise ToolchainNotFound(
            "no CUDA compiler (nvcc) found",
            hint="install one with `pip install nvidia-cuda-nvcc`, or set CUDA_HOME (or JITKILN_NVCC) to a CUDA "
                 "toolkit; run `jitkiln doctor` to see what was found",
            details="looked in: " + "; ".join(tried) if tried else "")

    @property
    def version(self) -> str:
        if self._version is None:
            self._version = _remembered(f"version:{self.path}", self._query_version)
        return self._version

    def _query_version(self) -> str:
        import subprocess
        try:
            out = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ToolchainNotFound(f"nvcc at {self.path} does not run: {e}",
                                    hint="reinstall the CUDA toolkit or point JITKILN_NVCC at a working nvcc")
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return m.group(2) if m else out.strip().splitlines()[-1]

    @property
    def root(self) -> str:
        """The CUDA toolkit nvcc belongs to (``bin/nvcc``'s parent), through wrapper scripts such as
        ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``, so the fingerprint covers cicc, ptxas... there too."""
        real = os.path.realpath(self.path)
        for _ in range(8):
            if os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(real)), "nvvm", "bin", "cicc")):
                break
            try:
                with open(real, "rb") as f:
                    head = f.read(65536)
            except OSError:
                break
            m = re.search(rb"(/[^\s\"';]+/nvcc)(?=[\s\"';]|$)", head) if head.startswith(b"#!") else None
            if not m or not os.path.isfile(m.group(1).decode()):
                break
            real = os.path.realpath(m.group(1).decode())
        return os.path.dirname(os.path.dirname(real))

    def _binaries(self) -> list[str]:
        """nvcc, cicc, ptxas, cudafe++, fatbinary, nvlink and the host compiler."""
        root = self.root
        bins = [self.path]
        for rel in ("nvvm/bin/cicc", "bin/ptxas", "bin/cudafe++", "bin/fatbinary", "bin/nvlink"):
            p = os.path.join(root, rel)
            if os.path.isfile(p):
                bins.append(p)
        host = shutil.which(os.environ.get("NVCC_CCBIN", "g++") or "g++")
        if host:
            bins.append(host)
        return bins

    @staticmethod
    def gencode(arch: str) -> list[str]:
        m = re.fullmatch(r"sm_(\d+)([a-z]?)", arch)
        if not m:
            from .errors import UsageError
            raise UsageError(f"unknown CUDA arch {arch!r}; give it as sm_XX (e.g. sm_90a, sm_80)")
        num, suf = m.groups()
        return [f"-gencode=arch=compute_{num}{suf},code=sm_{num}{suf}"]

    def command(self, src: str, out: str, spec: CompileSpec, deps_path: str, time_path: str) -> list[str]:
        cmd = [self.path, *self.gencode(spec.arch), "-std=c++17", "-O3",
               "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
               "-MD", "-MF", deps_path, "--time", time_path]
        for d in spec.include_dirs:
            cmd += ["-I", d]
        cmd += list(spec.flags)
        cmd += [src, "-o", out]
        return cmd

    def compile(self, src: str, out: str, spec: CompileSpec, deps_path: str, log_path: str | None = None,
                timeout: float | None = None, keep_dir: str | None = None,
                hold_fd: int | None = None, pipeline: bool = False) -> CompileResult:
        """Compile in the directory of ``out``. ``keep_dir``: keep intermediates there under names derived
        from the source (``-keep``) rather than ``tmpxft_<pid>`` names, which end up in the artifact.

        ``pipeline`` (needs ``keep_dir``): run nvcc's own steps as a graph (:func:`nvcc_pipeline`), the host
        front end (preprocessing, cudafe++) beside the device one (preprocessing, cicc, ptxas, fatbinary);
        same commands, same artifact bytes, a shorter critical path when a second core is free. Falls back
        to the plain nvcc run when nvcc's plan has a shape the pipeline does not know."""
        time_path = deps_path + ".time"
        cmd = self.command(src, out, spec, deps_path, time_path)
        if keep_dir:
            cmd = cmd[:-3] + ["-keep", "-keep-dir", keep_dir] + cmd[-3:]
        if pipeline and keep_dir:
            try:
                return nvcc_pipeline(cmd, src, out, deps_path, cwd=os.path.dirname(out) or None,
                                     log_path=log_path, timeout=timeout, hold_fd=hold_fd)
            except PipelineUnsupported:
                pass
        rc, log, wall, peak, cpu = run_measured(cmd, cwd=os.path.dirname(out) or None, timeout=timeout,
                                                hold_fd=hold_fd)
        if log_path:
            Path(log_path).write_text(f"$ {shlex.join(cmd)}\n{log}")
        raise_for_exit(rc, src, log, log_path)
        deps = parse_depfile(Path(deps_path).read_text()) if os.path.exists(deps_path) else []
        return CompileResult(seconds=wall, peak_rss=peak, cpu_s=cpu, deps=deps, phases=parse_nvcc_time(time_path),
                             log=log, command=cmd)


class PipelineUnsupported(Exception):
    """nvcc's plan (``--dryrun``) has a shape :func:`nvcc_pipeline` does not handle: run nvcc itself."""


def _dryrun_steps(cmd: list[str], cwd: str | None) -> tuple[list[str], list[str]]:
    """nvcc ``--dryrun`` -> (environment assignments, commands), both as shell text, in nvcc's order."""
    import subprocess
    r = subprocess.run(cmd + ["--dryrun"], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise PipelineUnsupported(r.stderr[-500:])
    env, steps = [], []
    for line in (r.stdout + r.stderr).splitlines():
        if not line.startswith("#$ "):
            continue
        line = line[3:]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
            env.append(line)
        else:
            steps.append(line)
    return env, steps


def _step_kind(step: str) -> str:
    tool = shlex.split(step)[0] if step.strip() and not step.startswith("--") else step
    base = os.path.basename(tool.replace("$CICC_PATH/", ""))
    if step.startswith("-- Filter Dependencies --"):
        return "deps"
    if base == "gcc" and " -E " in step:
        return "gcc (preprocessing 1)" if "-D__CUDA_ARCH__=" in step else "gcc (preprocessing 4)"
    if base in ("cudafe++", "cicc", "ptxas", "nvlink", "rm"):
        return base
    if base == "fatbinary":
        return "fatbinary (link)" if " -link " in step else "fatbinary"
    if base == "gcc" and " -c " in step:
        return "gcc (compiling)"
    if base in ("g++", "gcc"):
        return "g++ (linking)"
    return "?"


def _quoted_arg(step: str, opt: str) -> str | None:
    m = re.search(rf'{re.escape(opt)}\s+"([^"]+)"', step)
    return m.group(1) if m else None


def _pch_cleanup(pch_step: str, cwd: str | None) -> None:
    out = _quoted_arg(pch_step, "-o")
    if out:
        try:
            os.unlink(os.path.join(cwd or ".", out))
        except OSError:
            pass


def _host_pch_steps(host: list, tail_gcc: str, cwd: str | None) -> list:
    """Steps that let the host gcc compile (7-10 s, after cicc) start early: once cudafe++ has written
    ``X.cudafe1.cpp``, its text up to the ``#include`` of cicc's stub becomes ``X.cudafe1.head.hpp``,
    precompiled (gcc PCH, same flags) beside cicc; ``X.cudafe1.cpp`` becomes ``#include "X.cudafe1.head.hpp"``
    plus the rest. The host compile after cicc then loads the PCH (~2 s instead of ~10 s). Same file name,
    same flags: the same object code (gcc ignores a PCH it cannot use and reads the header as text)."""
    cudafe = next((s for s, k in host if k == "cudafe++"), "")
    gen = _quoted_arg(cudafe, "--gen_c_file_name")
    stub = _quoted_arg(cudafe, "--stub_file_name")
    if not gen or not stub or f'"{gen}"' not in tail_gcc or " -c -x c++ " not in tail_gcc:
        return []
    path = os.path.join(cwd or ".", gen)
    head_name = os.path.basename(gen)[:-len(".cpp")] + ".head.hpp"
    head = os.path.join(os.path.dirname(gen), head_name)
    marker = f'#include "{stub}"'

    def split() -> bool:
        try:
            text = Path(path).read_text()
        except OSError:
            return False
        i = text.rfind(marker)
        if i < 0 or "\n#include" in text[i + len(marker):]:
            return False
        Path(cwd or ".", head).write_text(text[:i])
        Path(path).write_text(f'#include "{head_name}"\n' + text[i:])
        return True

    pch = tail_gcc.replace(" -c -x c++ ", " -x c++-header ").replace(f'"{gen}"', f'"{head}"')
    obj = _quoted_arg(tail_gcc, "-o")
    if not obj:
        return []
    pch = pch.replace(f'-o "{obj}"', f'-o "{head}.gch"')
    return [(split, "pch split"), (pch, "gcc (pch)")]


def nvcc_pipeline(cmd: list[str], src: str, out: str, deps_path: str, cwd: str | None = None,
                  log_path: str | None = None, timeout: float | None = None,
                  hold_fd: int | None = None) -> CompileResult:
    """Run the steps nvcc would run for ``cmd`` (one ``.cu`` to a ``.so``), as two chains in parallel:

    * host front end: preprocessing + cudafe++ (13 s of a 66 s CUTLASS instance on a 16-core host),
    * device: preprocessing, cicc (the long pole), ptxas, fatbinary,

    then what needs both (host gcc on cudafe++'s output, which includes cicc's stub and the fatbin; nvlink,
    the final link). The host gcc's parsing moves onto the host chain too: a gcc precompiled header of
    cudafe++'s output up to the stub (:func:`_host_pch_steps`), so what runs after cicc is ~2 s, not ~10.
    Each step is nvcc's own command line from ``--dryrun`` (with ``-keep``: fixed names), so the artifact
    is byte-for-byte the one nvcc makes (checked: a CUTLASS moe2stage unit and the demo units). Two changes: cicc generates the module id itself
    (as it does for ``-cubin``) instead of reading cudafe++'s, and both ids must be equal (else
    :class:`PipelineUnsupported`, and the caller runs nvcc); the dependency list comes from the two
    preprocessors' ``-MD`` (their union, as nvcc's filter gives). Phases are the wall seconds of each step.
    """
    env_lines, steps = _dryrun_steps(cmd, cwd)
    kinds = [_step_kind(s) for s in steps]
    if "?" in kinds or kinds.count("cicc") != 1 or kinds.count("cudafe++") != 1 or "deps" not in kinds:
        raise PipelineUnsupported(f"unknown nvcc plan: {kinds}")
    i_tail = kinds.index("gcc (compiling)") if "gcc (compiling)" in kinds else -1
    if i_tail < 0 or any(k in ("cicc", "cudafe++", "ptxas") for k in kinds[i_tail:]):
        raise PipelineUnsupported(f"unknown nvcc plan: {kinds}")
    host, device, prelude = [], [], []
    mod_host = mod_dev = None
    for s, k in zip(steps[:i_tail], kinds[:i_tail]):
        if k == "deps":
            continue
        if k == "rm":
            prelude.append((re.sub(r"^rm ", "rm -f ", s), k))
        elif k in ("gcc (preprocessing 4)", "cudafe++"):
            if k == "gcc (preprocessing 4)":
                s += f" -MD -MF {shlex.quote(deps_path)}"
            else:
                m = re.search(r'--module_id_file_name "([^"]+)"', s)
                if not m or "--gen_module_id_file" not in s:
                    raise PipelineUnsupported("cudafe++ does not generate the module id")
                mod_host = m.group(1)
            host.append((s, k))
        else:
            if k == "cicc":
                m = re.search(r'--module_id_file_name "([^"]+)"', s)
                if not m:
                    raise PipelineUnsupported("cicc reads no module id")
                mod_dev = m.group(1) + ".cicc"
                s = s.replace(m.group(0), f'--gen_module_id_file --module_id_file_name "{mod_dev}"')
            if k == "gcc (preprocessing 1)":
                s += f" -MD -MF {shlex.quote(deps_path + '.dev')}"
            device.append((s, k))
    tail = list(zip(steps[i_tail:], kinds[i_tail:]))
    if os.environ.get("JITKILN_NVCC_PCH", "1") != "0":
        host += _host_pch_steps(host, tail[0][0], cwd)
    env = dict(os.environ)
    for line in env_lines:  # nvcc's settings (PATH with nvvm/bin, CICC_PATH, LD_LIBRARY_PATH, ...)
        name, _, value = line.partition("=")
        try:
            env[name] = " ".join(shlex.split(value))
        except ValueError:
            env[name] = value.strip()
    phases: dict[str, float] = {}
    logs: list[str] = []
    peaks = {"host": 0, "device": 0, "tail": 0}
    cpu = [0.0]
    lock = threading.Lock()
    t0 = time.monotonic()

    def run_chain(chain, name):
        for s, k in chain:
            if callable(s):  # a step of our own (the PCH split): never fatal, it only costs time if skipped
                t = time.monotonic()
                ok = s()
                with lock:
                    phases[k] = round(phases.get(k, 0.0) + time.monotonic() - t, 4)
                if not ok:
                    break
                continue
            rc, log, wall, peak, c = run_measured(["bash", "-c", s], cwd=cwd, env=env, timeout=timeout,
                                                  hold_fd=hold_fd)
            if k == "gcc (pch)" and rc != 0:  # no PCH: the host compile reads the header as text
                with lock:
                    logs.append(f"(PCH not built, exit {rc}; compiling without it)\n{log}")
                _pch_cleanup(s, cwd)
                break
            with lock:
                phases[k] = round(phases.get(k, 0.0) + wall, 4)
                peaks[name] = max(peaks[name], peak)
                cpu[0] += c
                if log.strip():
                    logs.append(log)
            if rc != 0:
                return rc, s
        return 0, ""

    run_chain(prelude, "tail")
    results: dict[str, tuple[int, str]] = {}
    th = threading.Thread(target=lambda: results.__setitem__("host", run_chain(host, "host")))
    th.start()
    try:
        results["device"] = run_chain(device, "device")
    finally:
        th.join()
    failed = [r for r in (results["host"], results["device"]) if r[0] != 0]
    if not failed:
        mh = Path(cwd or ".", mod_host).read_text() if mod_host else ""
        md = Path(cwd or ".", mod_dev).read_text() if mod_dev else ""
        if mh != md:
            raise PipelineUnsupported(f"module ids differ: cudafe++ {mh!r}, cicc {md!r}")
        failed = [r for r in [run_chain(tail, "tail")] if r[0] != 0]
    wall = time.monotonic() - t0
    log = "\n".join(logs)
    if log_path:
        Path(log_path).write_text(f"$ {shlex.join(cmd)}  (pipelined: host front end beside device)\n{log}")
    if failed:
        raise_for_exit(failed[0][0], src, log, log_path)
    deps: list[str] = []
    for p in (deps_path, deps_path + ".dev"):  # what nvcc's filter gives: host and device headers, once
        if os.path.exists(p):
            deps += [d for d in parse_depfile(Path(p).read_text()) if d not in deps]
    return CompileResult(seconds=wall, peak_rss=peaks["host"] + peaks["device"], cpu_s=cpu[0], deps=deps,
                         phases=phases, log=log, command=cmd + ["(pipelined)"])


def parse_nvcc_time(path: str) -> dict[str, float]:
    """``nvcc --time`` CSV -> {phase: seconds} (phases of the same name summed)."""
    phases: dict[str, float] = {}
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return phases
    for line in lines:
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 8:
            continue
        name, value, unit = cols[1], cols[-2], cols[-1]
        try:
            v = float(value)
        except ValueError:
            continue
        v = v / 1000.0 if unit == "ms" else v
        key = re.sub(r"\s*\(.*\)", "", name)
        phases[key] = round(phases.get(key, 0.0) + v, 4)
    return phases


def _fp_cache_path() -> Path:
    base = os.environ.get("JITKILN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jitkiln")
    return Path(base) / "toolchains.json"


def _cached_binary_digest(path: str) -> str:
    """Digest of a compiler binary, remembered across processes by (path, size, mtime)."""
    return _remembered(f"sha256:{path}", lambda: file_digest(path))


_remembered_memo: dict[str, str] = {}


def _remembered(what: str, compute) -> str:
    """A fact about a binary (its digest, its version), remembered across processes by (path, size, mtime)."""
    kind, _, path = what.partition(":")
    st = os.stat(path)
    k = f"{kind}:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    if k in _remembered_memo:
        return _remembered_memo[k]
    cp = _fp_cache_path()
    try:
        memo = json.loads(cp.read_text())
    except (OSError, ValueError):
        memo = {}
    if k in memo and isinstance(memo[k], str):
        _remembered_memo[k] = memo[k]
        return memo[k]
    d = compute()
    memo[k] = _remembered_memo[k] = d
    try:
        cp.parent.mkdir(parents=True, exist_ok=True)
        tmp = cp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, cp)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return d


def get_toolchain(name: str) -> Toolchain:
    if name == "hip":
        from . import toolchain_hip  # noqa: F401  (registers itself)
    cls = Toolchain._registry.get(name)
    if cls is None:
        from .errors import UsageError
        raise UsageError(f"unknown toolchain {name!r}; known: {', '.join(sorted(Toolchain._registry))}")
    return cls.find()
