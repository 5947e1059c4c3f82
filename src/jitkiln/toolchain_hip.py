"""HIP compiler adapter (ROCm): hipcc or amdclang++ with ``--offload-arch``.

Found through ``JITKILN_HIPCC``, ``PATH``, ``ROCM_PATH``/``ROCM_HOME`` or ``/opt/rocm``. Units become shared
objects (``-shared -fPIC``); headers come from the compiler's own ``-MD -MF`` output; phase times from clang's
``-ftime-trace`` JSON when the compiler accepts it. Nothing here has been run on a ROCm machine yet (see
docs/ck2stages.md): the commands follow the ROCm and clang documentation.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from .errors import ToolchainNotFound, UsageError
from .family import CompileSpec
from .toolchain import CompileResult, Toolchain, parse_depfile, raise_for_exit, run_measured

ARCH_RE = re.compile(r"gfx[0-9a-f]{3,4}(?::[a-z+-]+)*")


def parse_time_trace(path: str | os.PathLike) -> dict[str, float]:
    """clang ``-ftime-trace`` JSON -> {phase: seconds} from its ``Total ...`` events (summed per name)."""
    phases: dict[str, float] = {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return phases
    for ev in data.get("traceEvents", []):
        name = ev.get("name", "")
        if name.startswith("Total ") and "dur" in ev:
            key = name[len("Total "):]
            phases[key] = round(phases.get(key, 0.0) + ev["dur"] / 1e6, 4)
    return phases


class Hip(Toolchain):
    name = "hip"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._fp: str | None = None
        self._version: str | None = None
        self._time_trace: bool | None = None

    @staticmethod
    def candidates() -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if os.environ.get("JITKILN_HIPCC"):
            out.append(("JITKILN_HIPCC", os.environ["JITKILN_HIPCC"]))
        for exe in ("hipcc", "amdclang++"):
            w = shutil.which(exe)
            if w:
                out.append(("PATH", w))
        roots = [os.environ.get(v) for v in ("ROCM_PATH", "ROCM_HOME")] + ["/opt/rocm"]
        roots += sorted(glob.glob("/opt/rocm-*"), reverse=True)
        for r in roots:
            if r:
                out += [(r, os.path.join(r, "bin", "hipcc")), (r, os.path.join(r, "llvm", "bin", "clang++"))]
        return out

    @classmethod
    def find(cls) -> "Hip":
        path, tried = cls.first_executable(cls.candidates())
        if path:
            return cls(path)
        raise ToolchainNotFound(
            "no HIP compiler (hipcc or amdclang++) found: ROCm is not installed here",
            hint="install ROCm >= 6.2 (e.g. `apt install rocm-hip-sdk`, or use a rocm/pytorch container) and put "
                 "its bin/ on PATH, or set ROCM_PATH (or JITKILN_HIPCC) to it",
            details="looked in: " + "; ".join(tried))

    @property
    def version(self) -> str:
        if self._version is None:
            try:
                out = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=60).stdout
            except (OSError, subprocess.TimeoutExpired) as e:
                raise ToolchainNotFound(f"the HIP compiler at {self.path} does not run: {e}",
                                        hint="reinstall ROCm or point JITKILN_HIPCC at a working hipcc")
            m = re.search(r"HIP version:\s*([\w.\-]+)", out) or re.search(r"clang version\s*([\w.\-]+)", out)
            self._version = m.group(1) if m else (out.strip().splitlines() or ["unknown"])[0]
        return self._version

    def _binaries(self) -> list[str]:
        bins = [self.path]
        real = os.path.realpath(self.path)
        root = os.path.dirname(os.path.dirname(real))
        for rel in ("llvm/bin/clang", "lib/llvm/bin/clang", "bin/clang"):
            p = os.path.join(root, rel)
            if os.path.isfile(p):
                bins.append(p)
                break
        return bins

    def supports_time_trace(self) -> bool:
        if self._time_trace is None:
            try:
                out = subprocess.run([self.path, "--help"], capture_output=True, text=True, timeout=60).stdout
                self._time_trace = "-ftime-trace" in out
            except (OSError, subprocess.TimeoutExpired):
                self._time_trace = False
        return self._time_trace

    @staticmethod
    def offload_arch(arch: str) -> list[str]:
        if not ARCH_RE.fullmatch(arch):
            raise UsageError(f"unknown AMD GPU arch {arch!r}; give it as gfxNNN (e.g. gfx950, gfx942)")
        return [f"--offload-arch={arch}"]

    def command(self, src: str, out: str, spec: CompileSpec, deps_path: str, time_path: str) -> list[str]:
        cmd = [self.path, "-x", "hip", *self.offload_arch(spec.arch), "-shared", "-fPIC",
               "-MD", "-MF", deps_path]
        if time_path:
            cmd += ["-ftime-trace", "-ftime-trace-granularity=500"]
        for d in spec.include_dirs:
            cmd += ["-I", d]
        cmd += [f for f in spec.flags if f not in ("-fPIC",)]
        cmd += [src, "-o", out]
        return cmd

    def compile(self, src: str, out: str, spec: CompileSpec, deps_path: str, log_path: str | None = None,
                timeout: float | None = None) -> CompileResult:
        trace = self.supports_time_trace()
        cmd = self.command(src, out, spec, deps_path, "trace" if trace else "")
        rc, log, wall, peak, _cpu = run_measured(cmd, cwd=os.path.dirname(out) or None, timeout=timeout)
        if log_path:
            Path(log_path).write_text(f"$ {shlex.join(cmd)}\n{log}")
        raise_for_exit(rc, src, log, log_path, compiler=os.path.basename(self.path))
        deps = parse_depfile(Path(deps_path).read_text()) if os.path.exists(deps_path) else []
        phases: dict[str, float] = {}
        if trace:  # clang writes <output stem>*.json next to the output (one per offload target)
            stem = os.path.splitext(out)[0]
            for tp in glob.glob(stem + "*.json"):
                for k, v in parse_time_trace(tp).items():
                    phases[k] = round(phases.get(k, 0.0) + v, 4)
        return CompileResult(seconds=wall, peak_rss=peak, deps=deps, phases=phases, log=log, command=cmd)
