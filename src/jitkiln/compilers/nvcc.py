"""NVIDIA nvcc: found through ``JITKILN_NVCC``, ``PATH``, ``CUDA_HOME`` or the ``nvidia-cuda-nvcc`` wheel.

Fingerprint: nvcc's version plus the content of nvcc, cicc, ptxas, cudafe++, fatbinary, nvlink and the host
compiler (through wrapper scripts that ``exec`` the real nvcc). Compiles with ``-MD`` dependency output and
``--time`` phase times; when a core would otherwise idle it runs nvcc's own steps pipelined
(:mod:`jitkiln.compilers.nvcc_pipeline`: same commands, same bytes, shorter critical path).
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import ToolchainNotFound, UsageError
from ..family import CompileSpec
from . import nvcc_pipeline
from .base import (CompileJob, CompileResult, Compiler, first_executable, parse_depfile, raise_for_exit, remembered,
                   run_measured)


class Nvcc(Compiler):
    """NVIDIA nvcc: found through ``JITKILN_NVCC``, ``PATH``, ``CUDA_HOME`` or the ``nvidia-cuda-nvcc`` wheel."""

    name = "nvcc"
    policy = nvcc_pipeline.RULE

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
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
        path, tried = first_executable(cls.candidates())
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
            self._version = remembered("version", self.path, self._query_version)
        return self._version

    def _query_version(self) -> str:
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

    def binaries(self) -> list[str]:
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

    def compile(self, job: CompileJob) -> CompileResult:
        """Compile in ``job.workdir``, keeping intermediates under ``workdir/keep`` with names derived from the
        source (``-keep``) rather than ``tmpxft_<pid>`` names, which would end up in the artifact.

        When a core would idle (:func:`nvcc_pipeline.should_pipeline`), nvcc's own steps run as a graph, the
        host front end beside the device chain: same commands, same artifact bytes, a shorter critical path.
        Falls back to the plain nvcc run when nvcc's plan has a shape the pipeline does not know."""
        src, out = job.source_path, job.out_path
        deps_path = os.path.join(job.workdir, "deps.d")
        keep_dir = os.path.join(job.workdir, "keep")
        os.makedirs(keep_dir, exist_ok=True)
        time_path = deps_path + ".time"
        cmd = self.command(src, out, job.spec, deps_path, time_path)
        cmd = cmd[:-3] + ["-keep", "-keep-dir", keep_dir] + cmd[-3:]
        cwd = os.path.dirname(out) or None
        if nvcc_pipeline.should_pipeline(job.spare_cores):
            try:
                r = nvcc_pipeline.run(cmd, src, out, deps_path, cwd=cwd, log_path=job.log_path,
                                      timeout=job.timeout, hold_fd=job.hold_fd)
                r.mode = "pipelined"
                return r
            except nvcc_pipeline.PipelineUnsupported:
                pass
        rc, log, wall, peak, cpu = run_measured(cmd, cwd=cwd, timeout=job.timeout, hold_fd=job.hold_fd)
        if job.log_path:
            Path(job.log_path).write_text(f"$ {shlex.join(cmd)}\n{log}")
        raise_for_exit(rc, src, log, job.log_path)
        deps = parse_depfile(Path(deps_path).read_text()) if os.path.exists(deps_path) else []
        return CompileResult(seconds=wall, peak_rss=peak, cpu_s=cpu, deps=deps, phases=parse_nvcc_time(time_path),
                             log=log, command=cmd, mode="sequential")


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

