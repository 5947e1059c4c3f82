"""A fake compiler for tests and dry runs: fast, deterministic, no GPU toolchain.

It does not compile the unit's GPU code. It reads the unit's text for what the engine relies on: the
``#include "..."`` files (resolved against the include folders, reported as the unit's dependencies, so header
keys work as with a real compiler) and the exported ``jk_name_<digest16>`` / ``jk_launch_<digest16>`` symbols, and
builds a real shared object exporting those symbols with the host C compiler (``cc``; ~50 ms): the runtime loads
it, checks its name and calls the launcher (which returns 0). Knobs:

* ``JITKILN_FAKE_SECONDS``: seconds each compile takes (default 0), to test schedulers and tiered start;
* a unit containing ``#error`` fails like a compile error (first error lines, log path).
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import time
from pathlib import Path

from ..errors import ToolchainNotFound
from .base import CompileJob, CompileResult, Compiler, raise_for_exit, run_measured

_NAME = re.compile(r'(jk_name_[0-9a-f]{16})\s*\(\s*void\s*\)\s*\{\s*return\s*"([^"]*)"')
_LAUNCH = re.compile(r"\b(jk_launch_[0-9a-f]{16})\b")
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


class FakeCompiler(Compiler):
    name = "fake"

    def __init__(self, cc: str):
        self.path = cc

    @classmethod
    def find(cls) -> "FakeCompiler":
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if not cc:
            raise ToolchainNotFound("the fake compiler needs a host C compiler (cc or gcc)",
                                    hint="install gcc, or set CC to a C compiler")
        return cls(cc)

    @property
    def version(self) -> str:
        return "1"

    def binaries(self) -> list[str]:
        return [__file__]

    def compile(self, job: CompileJob) -> CompileResult:
        t0 = time.monotonic()
        text = Path(job.source_path).read_text()
        delay = float(os.environ.get("JITKILN_FAKE_SECONDS", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        deps = [job.source_path]
        for inc in _INCLUDE.findall(text):
            for d in [os.path.dirname(job.source_path), *job.spec.include_dirs]:
                p = os.path.join(d, inc)
                if os.path.isfile(p):
                    deps.append(os.path.abspath(p))
                    break
        log_lines = [f"fake compile of {job.source_path} for {job.spec.arch}"]
        if "#error" in text:
            line = next(ln for ln in text.splitlines() if "#error" in ln)
            log = f"{job.source_path}:1: error: {line.strip()}\n"
            if job.log_path:
                Path(job.log_path).write_text(log)
            raise_for_exit(1, job.source_path, log, job.log_path, compiler="fake")
        names = dict(_NAME.findall(text))
        c = [f'/* fake artifact of a unit with sha256 {hashlib.sha256(text.encode()).hexdigest()} */',
             '#define EXPORT __attribute__((visibility("default")))']
        for sym, nm in names.items():
            c.append(f'EXPORT const char* {sym}(void) {{ return "{nm}"; }}')
        for sym in sorted(set(_LAUNCH.findall(text))):
            c.append(f"EXPORT int {sym}(void) {{ return 0; }}")
        c_path = os.path.join(job.workdir, "fake_unit.c")
        Path(c_path).write_text("\n".join(c) + "\n")
        cmd = [self.path, "-shared", "-fPIC", "-O0", "-o", job.out_path, c_path]
        rc, out, _, peak, cpu = run_measured(cmd, cwd=job.workdir, timeout=job.timeout, hold_fd=job.hold_fd)
        log = "\n".join(log_lines) + f"\n$ {shlex.join(cmd)}\n{out}"
        if job.log_path:
            Path(job.log_path).write_text(log)
        raise_for_exit(rc, job.source_path, log, job.log_path, compiler="fake (cc)")
        return CompileResult(seconds=time.monotonic() - t0, peak_rss=peak, deps=deps, phases={"fake": delay},
                             log=log, command=cmd, cpu_s=cpu, mode="fake")
