"""The compiler interface: one small protocol every compiler implements (nvcc, hipcc, a fake for tests...).

A compiler is found (:meth:`Compiler.find`), fingerprinted by the content of every binary that decides its
output (:attr:`Compiler.fingerprint`), and compiles one job (:meth:`Compiler.compile`): one source text into
one artifact, reporting what the cache key and the report need: the files the unit read (from the compiler's
own dependency output), wall and CPU seconds, peak memory, per-phase times, and the mode it chose.

Helpers shared by the compilers live here too: running a process measured (``wait4`` rusage), make-style
dependency files, turning an exit status into the error to report, content digests of binaries remembered
across processes under a strict stamp.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import CompileError, CompilerKilled
from ..family import CompileSpec


@dataclass
class CompileJob:
    """One compile: ``source_path`` (already written, in ``workdir``) to ``out_path``.

    ``hold_fd`` (a locked file) is handed to the compiler's processes, so the lock lives exactly as long as the
    compiler does. ``spare_cores``: cores that would otherwise idle while this job runs (a compiler may use
    them, e.g. nvcc's pipelined mode).
    """

    source_path: str
    out_path: str
    spec: CompileSpec
    workdir: str
    log_path: str | None = None
    timeout: float | None = None
    hold_fd: int | None = None
    spare_cores: int = 0


@dataclass
class CompileResult:
    seconds: float
    peak_rss: int  # bytes
    deps: list[str]  # every file the unit read (headers), absolute paths
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    log: str = ""
    command: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # user + system CPU seconds of the compiler and the children it waited for
    mode: str = ""  # how the compiler ran this job (e.g. nvcc "pipelined" or "sequential")


class Compiler(ABC):
    """A compiler adapter. ``name`` is what a family's :class:`~jitkiln.family.CompileSpec` names."""

    name: ClassVar[str] = ""
    policy: ClassVar[str] = ""  # how it chooses a mode per job, in words (goes into build records)
    path: str = ""

    @classmethod
    @abstractmethod
    def find(cls) -> "Compiler":
        """The compiler on this machine; raises :class:`~jitkiln.errors.ToolchainNotFound` (reason + what to do)."""

    @property
    @abstractmethod
    def version(self) -> str:
        ...

    @property
    def root(self) -> str | None:
        """The toolchain's root folder: headers under it are named relative to it (portable keys)."""
        return None

    def binaries(self) -> list[str]:
        """Every file whose bytes decide the output (drivers, compilers, libraries of device code)."""
        return [self.path] if self.path else []

    @property
    def fingerprint(self) -> str:
        """``NAME-VERSION-DIGEST``: the version plus the sha256 of the content of every file in :meth:`binaries`."""
        fp = self.__dict__.get("_fp")
        if fp is None:
            h = hashlib.sha256(f"{self.name} {self.version}".encode())
            for b in self.binaries():
                h.update(os.path.basename(b).encode())
                h.update(remembered_digest(b).encode())
            fp = self.__dict__["_fp"] = f"{self.name}-{self.version}-{h.hexdigest()[:16]}"
        return fp

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "version": self.version, "fingerprint": self.fingerprint}

    @abstractmethod
    def compile(self, job: CompileJob) -> CompileResult:
        """Compile ``job``; raise :class:`~jitkiln.errors.CompileError` (unit, first error lines, log path)."""


def first_executable(candidates: list[tuple[str, str]]) -> tuple[str | None, list[str]]:
    """The first (origin, path) candidate that is an executable file, and what was tried before it."""
    tried = []
    for origin, p in candidates:
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p, tried
        tried.append(f"{origin}: {p}")
    return None, tried


def run_measured(cmd: list[str], cwd: str | None = None, env: dict | None = None,
                 timeout: float | None = None, hold_fd: int | None = None) -> tuple[int, str, float, int, float]:
    """Run ``cmd`` in its own process group; return (exit code, output, wall s, peak RSS bytes, CPU s).

    The exit code is negative for a signal. Peak RSS comes from ``wait4``: the largest resident set of the
    process and the descendants it waited for. The whole process group is killed when this call is
    interrupted (an exception, a timeout): a compiler never outlives the build that started it.
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
        _children.add(p.pid)

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
            _children.discard(p.pid)
            if timer:
                timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        logf.seek(0)
        out = logf.read().decode(errors="replace")
    return p.returncode, out, time.monotonic() - t0, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime


_children: set[int] = set()  # process groups of compilers running now (ended on SIGTERM, see kill_compilers)


def kill_compilers() -> None:
    """End every compiler process group started by this process (they run in their own sessions, so a signal
    to the build does not reach them by itself)."""
    import signal
    for pid in list(_children):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


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


def first_error_lines(log: str, n: int = 8) -> str:
    lines = log.splitlines()
    errs = [i for i, line in enumerate(lines) if re.search(r"\berror\b", line, re.I)]
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
                           details=first_error_lines(log), unit=src, log=log_path or "")


# --- content digests of binaries, remembered across processes ------------------------------------------------
_file_memo: dict[tuple, str] = {}


def _stamp(st: os.stat_result) -> tuple:
    # ctime changes on every write and cannot be set back by a user (unlike mtime): part of every stamp
    return (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised within the process per (path, size, inode, mtime, ctime)."""
    st = os.stat(path)
    k = (os.fspath(path),) + _stamp(st)
    d = _file_memo.get(k)
    if d is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d = h.hexdigest()
        _file_memo[k] = d
    return d


def _memo_file() -> Path:
    base = os.environ.get("JITKILN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jitkiln")
    return Path(base) / "toolchains.json"


_remembered_memo: dict[str, str] = {}


def remembered(kind: str, path: str, compute: Callable[[], str]) -> str:
    """A fact about a binary (its digest, its version), remembered across processes by its real path, size,
    inode, mtime and ctime: rewriting the file (even to the same size, with its mtime set back) forgets it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    k = f"{kind}:{real}:" + ":".join(str(v) for v in _stamp(st))
    if k in _remembered_memo:
        return _remembered_memo[k]
    cp = _memo_file()
    try:
        memo = json.loads(cp.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(k), str):
        _remembered_memo[k] = memo[k]
        return memo[k]
    d = compute()
    memo[k] = _remembered_memo[k] = d
    tmp = cp.with_suffix(f".{os.getpid()}.{os.urandom(3).hex()}.tmp")
    try:
        cp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, cp)
    except OSError:
        pass  # a read-only (or full) cache only costs re-hashing next time
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    return d


def remembered_digest(path: str) -> str:
    """Content digest of a compiler binary (see :func:`remembered`)."""
    return remembered("sha256", path, lambda: file_digest(os.path.realpath(path)))
