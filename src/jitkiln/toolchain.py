"""Compiler adapters: find the compiler, fingerprint it, compile one unit to a loadable artifact.

The adapter reports what the cache key needs and what the report shows:

* ``fingerprint``: compiler identity, version and the digest of its binaries (and the host compiler's),
* the list of every header the unit included (from the compiler's own dependency output),
* wall seconds, peak memory (``wait4`` rusage of the compiler process tree) and per-phase times.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
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


_digest_memo: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised per (path, size, mtime_ns) within the process."""
    st = os.stat(path)
    k = (os.fspath(path), st.st_size, st.st_mtime_ns)
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
                 timeout: float | None = None) -> tuple[int, str, float, int, float]:
    """Run ``cmd`` in its own process group; return (exit code, output, wall s, peak RSS bytes, CPU s).

    The exit code is negative for a signal. Peak RSS comes from ``wait4``: the largest resident set of the
    process and the descendants it waited for (nvcc waits for cicc, ptxas, gcc...).
    """
    import tempfile
    import threading

    t0 = time.monotonic()
    with tempfile.TemporaryFile() as logf:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)

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

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

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


class Nvcc(Toolchain):
    """NVIDIA nvcc: found through ``JITKILN_NVCC``, ``PATH``, ``CUDA_HOME`` or the ``nvidia-cuda-nvcc`` wheel."""

    name = "nvcc"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fp: str | None = None
        self._version: str | None = None

    @staticmethod
    def candidates() -> list[tuple[str, str]]:
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
        tried = []
        for origin, p in cls.candidates():
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return cls(p)
            tried.append(f"{origin}: {p}")
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
        try:
            out = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ToolchainNotFound(f"nvcc at {self.path} does not run: {e}",
                                    hint="reinstall the CUDA toolkit or point JITKILN_NVCC at a working nvcc")
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        return m.group(2) if m else out.strip().splitlines()[-1]

    def _binaries(self) -> list[str]:
        real = os.path.realpath(self.path)
        root = os.path.dirname(os.path.dirname(real))
        bins = [self.path]
        for rel in ("nvvm/bin/cicc", "bin/ptxas", "bin/cudafe++", "bin/fatbinary", "bin/nvlink"):
            p = os.path.join(root, rel)
            if os.path.isfile(p):
                bins.append(p)
        host = shutil.which(os.environ.get("NVCC_CCBIN", "g++") or "g++")
        if host:
            bins.append(host)
        return bins

    @property
    def fingerprint(self) -> str:
        """Version plus the digest of nvcc, cicc, ptxas, cudafe++, fatbinary, nvlink and the host compiler."""
        if self._fp is None:
            h = hashlib.sha256(f"nvcc {self.version}".encode())
            for b in self._binaries():
                h.update(os.path.basename(b).encode())
                h.update(_cached_binary_digest(b).encode())
            self._fp = f"nvcc-{self.version}-{h.hexdigest()[:16]}"
        return self._fp

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "version": self.version, "fingerprint": self.fingerprint}

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
                timeout: float | None = None) -> CompileResult:
        time_path = deps_path + ".time"
        cmd = self.command(src, out, spec, deps_path, time_path)
        rc, log, wall, peak, cpu = run_measured(cmd, cwd=os.path.dirname(out) or None, timeout=timeout)
        if log_path:
            Path(log_path).write_text(f"$ {shlex.join(cmd)}\n{log}")
        if rc < 0 or rc in (137, 139):
            sig = -rc if rc < 0 else rc - 128
            raise CompilerKilled(
                f"the compiler was killed by signal {sig} while compiling {src}"
                + (" (likely out of memory)" if sig == signal.SIGKILL else ""),
                hint="retry with fewer parallel jobs (`jitkiln build ... --jobs 1`) or on a machine with more "
                     "memory; nothing was written to the cache",
                details=f"log: {log_path}" if log_path else "", unit=src, log=log_path or "")
        if rc != 0:
            raise CompileError(
                f"nvcc failed (exit {rc}) compiling {src}",
                hint=f"the full log is {log_path}" if log_path else "",
                details=_first_error_lines(log), unit=src, log=log_path or "")
        deps = parse_depfile(Path(deps_path).read_text()) if os.path.exists(deps_path) else []
        return CompileResult(seconds=wall, peak_rss=peak, cpu_s=cpu, deps=deps, phases=parse_nvcc_time(time_path),
                             log=log, command=cmd)


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
