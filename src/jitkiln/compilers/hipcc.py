"""HIP compiler (ROCm hipcc on clang): a native ROCm, or Debian's ROCm in a jitkiln-installed chroot.

Discovery order: ``JITKILN_HIPCC``; a native ROCm (``hipcc``/``amdclang++`` on ``PATH``, ``ROCM_PATH``,
``ROCM_HOME``, ``/opt/rocm``); the chroot made by ``jitkiln toolchain install rocm DIR``
(:mod:`jitkiln.compilers.rocm_install`; ``JITKILN_ROCM_CHROOT``, default ``/opt/jitkiln-rocm``) when complete.

**The chroot runner.** Debian's ROCm 7.2 needs a newer glibc than the host may have, so hipcc runs inside the
chroot, one private mount namespace per compile (``bwrap``: nothing is mounted on the host, nothing outlives
the compiler). The sandbox root is a tmpfs holding the chroot's ``/usr`` and ``/etc`` (read-only), a fresh
``/proc``, ``/dev`` and ``/tmp``, and every host folder the job names (the source and output folders, the work
folder read-write; the include folders read-only) bound at the SAME absolute path, so the compiler's ``-MD``
output lists real host paths. A host folder that would collide with the chroot's own system folders
(``/usr/...``, ``/etc/...``) is bound under ``/run/jitkiln-host`` instead and mapped back; a dependency inside
the chroot itself (HIP and libstdc++ headers) is reported as ``<chroot>/<path>``, a real host path under
:attr:`root`, so keys name it relative to the toolchain.

**Fingerprint** (content): hipcc, clang (and the libLLVM / libclang-cpp it runs on), lld, the offload bundler,
the host linker, and every device-library bitcode file (``amdgcn/bitcode/*.bc``).

**Portability of the artifacts** (chroot): units are built against GCC 12's C++ headers
(``--gcc-install-dir``, see :meth:`Hipcc.gcc_install_dir`): a CK unit then needs at most ``GLIBCXX_3.4.29``
(sid's GCC 16 headers: 3.4.32, which Ubuntu 22.04 lacks). Units link ``libamdhip64.so.7``: they load on ROCm 7.

**Environment**: ``JITKILN_HIPCC``, ``JITKILN_ROCM_CHROOT``, ``JITKILN_HIP_MODE``, ``JITKILN_HIP_FLAGS`` (appended
flags), ``JITKILN_HIP_GCC_INSTALL_DIR``.

**Modes** (``JITKILN_HIP_MODE``). ``one-shot`` (default): ``hipcc -x hip --offload-arch=ARCH -fPIC -shared
-MD -MF deps -cuid=<digest of the unit>``. ``split``: the device half (``--offload-device-only -c``: bundled code
object) beside the host half (``--offload-host-only -c``, reading that bundle through a FIFO only where clang
embeds it), then the link: the same .so bytes as one-shot (checked), phases = each half and the link. The
explicit ``-cuid`` (clang's default hashes the input path and command line) makes artifacts independent of the
per-attempt work folder. No clang phase times: clang 22 drops ``-ftime-trace`` when one command compiles and
links (``argument unused``), and with ``-c`` the host and device traces share one file name.

Longer than 400 lines: discovery, the chroot runner and path mapping, and the two compile modes.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import ToolchainNotFound, UsageError
from ..family import CompileSpec
from .base import (
    CompileJob,
    Compiler,
    CompileResult,
    first_executable,
    parse_depfile,
    raise_for_exit,
    remembered,
    run_measured,
)

ARCH_RE = re.compile(r"(gfx[0-9a-f]{3,4})((?::[a-z0-9_-]+[+-])*)")
INSTALL_HINT = "jitkiln toolchain install rocm /opt/jitkiln-rocm"
DEFAULT_CHROOT = "/opt/jitkiln-rocm"
HOST_PREFIX = "/run/jitkiln-host"  # where host folders that collide with the chroot's system folders appear
_RESERVED = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/dev", "/sys",
             HOST_PREFIX)

def python_include(compiler: Hipcc | None = None) -> str:
    """Python's headers for a unit that includes torch/extension.h (compile-only: units call no Python).

    This interpreter's own, unless the compiler runs in the chroot and they are a Debian-style multiarch
    split (``pyconfig.h`` includes ``<x86_64-linux-gnu/python3.X/pyconfig.h>`` from the system include folder,
    which inside the chroot is the chroot's): then the chroot's python3-dev headers."""
    import sysconfig
    inc = sysconfig.get_paths()["include"]
    if compiler is None or not compiler.runner.chroot:
        return inc
    try:
        head = Path(inc, "pyconfig.h").read_text(errors="replace")[:4096]
    except OSError:
        head = ""
    if not re.search(r"#\s*include\s*<[^>]*/pyconfig\.h>", head):
        return inc
    own = sorted(glob.glob(os.path.join(compiler.runner.chroot, "usr/include/python3*/Python.h")))
    return os.path.dirname(own[-1]) if own else inc


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


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _resolve_in(root: str, path: str, depth: int = 0) -> str:
    """``path`` (absolute, as seen inside the chroot ``root``) with its symlinks resolved inside ``root``;
    returned as the host path ``root + path``."""
    parts = [p for p in path.split("/") if p]
    cur = ""
    for i, part in enumerate(parts):
        nxt = f"{cur}/{part}"
        host = root + nxt
        if os.path.islink(host) and depth < 40:
            target = os.readlink(host)
            base = target if target.startswith("/") else os.path.normpath(f"{cur or '/'}/{target}")
            rest = "/".join(parts[i + 1:])
            return _resolve_in(root, os.path.normpath(base + ("/" + rest if rest else "")), depth + 1)
        cur = nxt
    return root + (cur or "/")


class Runner:
    """How the compiler's processes run: natively, or inside the chroot (bwrap, paths mapped)."""

    chroot: str | None = None

    def inside(self, host_path: str) -> str:
        return host_path

    def host(self, inner_path: str) -> str:
        return inner_path

    def host_file(self, inner_path: str) -> str:
        """The host path of a toolchain file named as the compiler sees it (symlinks resolved)."""
        return os.path.realpath(inner_path)

    def wrap(self, cmd: list[str], rw: list[str], ro: list[str], cwd: str | None = None) -> list[str]:
        return cmd

    def env(self) -> dict | None:
        return None


class ChrootRunner(Runner):
    def __init__(self, chroot: str, bwrap: str):
        self.chroot = os.path.realpath(chroot)
        self.bwrap = bwrap

    def inside(self, host_path: str) -> str:
        p = os.path.abspath(host_path)
        if _under(p, self.chroot):
            return p[len(self.chroot):] or "/"
        if any(_under(p, r) for r in _RESERVED):
            return HOST_PREFIX + p
        return p

    def host(self, inner_path: str) -> str:
        p = os.path.normpath(inner_path)
        if _under(p, HOST_PREFIX):
            return p[len(HOST_PREFIX):]
        if any(_under(p, r) for r in _RESERVED):  # the sandbox has only these, /tmp and the bound host folders
            return self.chroot + p
        return p

    def host_file(self, inner_path: str) -> str:
        return _resolve_in(self.chroot, inner_path)

    def wrap(self, cmd: list[str], rw: list[str], ro: list[str], cwd: str | None = None) -> list[str]:
        r = self.chroot
        args = [self.bwrap, "--die-with-parent", "--unshare-ipc", "--unshare-uts", "--tmpfs", "/",
                "--ro-bind", f"{r}/usr", "/usr", "--ro-bind", f"{r}/etc", "/etc"]
        for d in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            hp = os.path.join(r, d)
            if os.path.islink(hp):
                args += ["--symlink", os.readlink(hp), f"/{d}"]
            elif os.path.isdir(hp):
                args += ["--ro-bind", hp, f"/{d}"]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", "/var/tmp", "--dir", HOST_PREFIX]
        binds: dict[str, str] = {}
        for mode, paths in (("--ro-bind", ro), ("--bind", rw)):
            for hp in paths:  # bound at the path as named (a symlinked folder is bound at its link path)
                hp = os.path.abspath(hp)
                if not os.path.exists(hp) or _under(os.path.realpath(hp), r):
                    continue
                if binds.get(hp) != "--bind":
                    binds[hp] = mode
        for hp in sorted(binds, key=lambda p: (p.count("/"), p)):  # parents before children
            args += [binds[hp], hp, self.inside(hp)]
        if cwd:
            args += ["--chdir", self.inside(os.path.abspath(cwd))]
        return args + ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                       "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8", "--", *cmd]


class Hipcc(Compiler):
    """``hipcc`` (ROCm's driver) or ``amdclang++``/``clang++`` with ``-x hip``."""

    name = "hip"

    def __init__(self, path: str, runner: Runner | None = None, origin: str = ""):
        self.runner = runner or Runner()
        self.inner = path  # as the compiler's processes see it
        self.path = self.runner.host_file(path) if self.runner.chroot else os.path.abspath(path)
        self.origin = origin
        self._version: str | None = None
        self._archs: list[str] | None = None

    # ---- discovery -----------------------------------------------------------------------------------------
    @staticmethod
    def native_candidates() -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for exe in ("hipcc", "amdclang++"):
            w = shutil.which(exe)
            if w:
                out.append(("PATH", w))
        roots = [os.environ.get(v) for v in ("ROCM_PATH", "ROCM_HOME")] + ["/opt/rocm"]
        roots += sorted(glob.glob("/opt/rocm-*"), reverse=True)
        for r in roots:
            if r:
                out += [(r, os.path.join(r, "bin", "hipcc")), (r, os.path.join(r, "llvm", "bin", "amdclang++"))]
        return out

    @staticmethod
    def chroot_dir() -> str:
        return os.environ.get("JITKILN_ROCM_CHROOT") or DEFAULT_CHROOT

    @classmethod
    def find(cls) -> Hipcc:
        env = os.environ.get("JITKILN_HIPCC")
        if env:
            if not (os.path.isfile(env) and os.access(env, os.X_OK)):
                raise ToolchainNotFound(f"JITKILN_HIPCC={env} is not an executable file",
                                        hint="point JITKILN_HIPCC at hipcc, or unset it to search ROCm and the "
                                             "jitkiln ROCm chroot")
            return cls(env, origin="JITKILN_HIPCC")
        path, tried = first_executable(cls.native_candidates())
        if path:
            return cls(path, origin="native")
        from .rocm_install import is_complete
        root = cls.chroot_dir()
        if is_complete(root):
            bwrap = shutil.which("bwrap")
            if not bwrap:
                raise ToolchainNotFound(f"the ROCm chroot at {root} needs bubblewrap (bwrap) to run the compiler",
                                        hint="apt-get install bubblewrap (or re-run: " + INSTALL_HINT + ")")
            return cls("/usr/bin/hipcc", runner=ChrootRunner(root, bwrap), origin=f"chroot {root}")
        tried.append(f"jitkiln ROCm chroot: {root} ({'incomplete' if os.path.exists(root) else 'absent'})")
        raise ToolchainNotFound(
            "no HIP compiler (hipcc) found: no ROCm here and no jitkiln ROCm chroot",
            hint=f"run `{INSTALL_HINT}` (root; 1.5-4 min, 1.1 GB: Debian's ROCm 7.2 in a sid chroot), or install ROCm and "
                 "set ROCM_PATH (or JITKILN_HIPCC)",
            details="looked in: " + "; ".join(tried))

    # ---- identity ------------------------------------------------------------------------------------------
    def _run_tool(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = self.runner.wrap(args, rw=[], ro=[])
        try:
            return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                                  env=self.runner.env())
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ToolchainNotFound(f"the HIP compiler at {self.path} does not run: {e}",
                                    hint=f"reinstall it (`{INSTALL_HINT}`) or point JITKILN_HIPCC at a working hipcc")

    @property
    def clang(self) -> str:
        """The clang the driver runs, as the compiler's processes see it."""
        d = os.path.dirname(self.inner)
        cands = [os.path.join(d, "clang"), os.path.join(d, "clang++")]
        if self.runner.chroot:
            cands = sorted(glob.glob(self.runner.chroot + "/usr/lib/llvm-*/bin/clang"), reverse=True)
            cands = [c[len(self.runner.chroot):] for c in cands]
        else:
            root = os.path.dirname(d)
            cands += [os.path.join(root, "llvm", "bin", "clang"), os.path.join(root, "lib", "llvm", "bin", "clang")]
        for c in cands:
            if os.path.isfile(self.runner.host_file(c)):
                return c
        return self.inner

    @property
    def version(self) -> str:
        if self._version is None:
            st = os.stat(self.path)
            stamp = f"{st.st_size}.{st.st_ino}.{st.st_mtime_ns}.{st.st_ctime_ns}"
            v = remembered(f"hipversion@{self.path}@{stamp}", self.runner.host_file(self.clang), self._query_version)
            gcc = self.gcc_install_dir()  # the C++ library units are built against is part of the identity
            self._version = v + (f"+libstdcxx{os.path.basename(gcc.rstrip('/'))}" if gcc else "")
        return self._version

    def _query_version(self) -> str:
        r = self._run_tool([self.inner, "--version"])
        out = r.stdout + r.stderr
        hip = re.search(r"HIP version:\s*([\d.]+)", out)
        clang = re.search(r"clang version\s*([\d.]+)", out)
        parts = ([hip.group(1)] if hip else []) + ([f"clang{clang.group(1)}"] if clang else [])
        if not parts:
            how = " (run through bwrap: can this machine create mount namespaces?)" if self.runner.chroot else ""
            raise ToolchainNotFound(f"the HIP compiler at {self.path} does not run{how}",
                                    hint=f"reinstall it (`{INSTALL_HINT}`), or point JITKILN_HIPCC at a working hipcc",
                                    details=out[-500:])
        return "+".join(parts)

    @property
    def root(self) -> str | None:
        if self.runner.chroot:
            return self.runner.chroot
        real = os.path.realpath(self.path)
        return os.path.dirname(os.path.dirname(real))

    def binaries(self) -> list[str]:
        """hipcc, clang (+ the libLLVM/libclang-cpp it runs on), lld, the offload bundler and linker wrapper,
        the host linker, and every device-library bitcode file."""
        inner_clang = self.clang
        bindir = os.path.dirname(inner_clang)
        files = [self.path, self.runner.host_file(inner_clang)]
        for tool in ("lld", "ld.lld", "clang-offload-bundler", "clang-linker-wrapper", "clang-offload-packager",
                     "llvm-link", "ld"):
            for d in (bindir, "/usr/bin") if self.runner.chroot else (bindir,):
                p = self.runner.host_file(os.path.join(d, tool))
                if os.path.isfile(p):
                    files.append(p)
                    break
        libdirs = [os.path.join(os.path.dirname(bindir), "lib")]  # the shared libraries clang and lld run on
        if self.runner.chroot:
            libdirs.append("/usr/lib/x86_64-linux-gnu")
        for d in libdirs:
            for pat in ("libLLVM*.so*", "libclang-cpp.so*"):
                for p in sorted(glob.glob(os.path.join(self.runner.host_file(d), pat))):
                    files.append(self.runner.host_file(p[len(self.runner.chroot):]) if self.runner.chroot
                                 else os.path.realpath(p))
        files += self.bitcode_files()
        seen: list[str] = []
        for f in files:
            if f not in seen and os.path.isfile(f):
                seen.append(f)
        return seen

    def bitcode_files(self) -> list[str]:
        root = self.root or ""
        pats = ["usr/lib/llvm-*/lib/clang/*/amdgcn/bitcode/*.bc", "usr/lib/x86_64-linux-gnu/amdgcn/bitcode/*.bc"] \
            if self.runner.chroot else ["amdgcn/bitcode/*.bc", "lib/llvm/lib/clang/*/lib/amdgcn/bitcode/*.bc",
                                        "llvm/lib/clang/*/lib/amdgcn/bitcode/*.bc"]
        out: list[str] = []
        for pat in pats:
            out += sorted(glob.glob(os.path.join(root, pat)))
        return out

    def describe(self) -> dict:
        d = super().describe()
        d.update(origin=self.origin, root=self.root, clang=self.runner.host_file(self.clang),
                 runner="bwrap chroot" if self.runner.chroot else "native")
        return d

    # ---- arch ----------------------------------------------------------------------------------------------
    def supported_archs(self) -> list[str]:
        if self._archs is None:
            def query() -> str:
                r = self._run_tool([self.clang, "--target=amdgcn-amd-amdhsa", "--print-supported-cpus"])
                return " ".join(sorted(set(re.findall(r"\bgfx[0-9a-f]+\b", r.stdout + r.stderr))))
            self._archs = remembered("amdgpu-cpus", self.runner.host_file(self.clang), query).split()
        return self._archs

    def offload_arch(self, arch: str) -> list[str]:
        m = ARCH_RE.fullmatch(arch)
        known = self.supported_archs()
        if not m or not m.group(1).startswith("gfx9") or (known and m.group(1) not in known):
            gfx9 = [a for a in known if a.startswith("gfx9")]
            raise UsageError(f"the HIP compiler ({self.version}) cannot compile for arch {arch!r}; "
                             f"it knows: {', '.join(gfx9) or 'none'}",
                             hint="give an AMD Instinct arch, e.g. gfx942 (MI300) or gfx950 (MI350)")
        return [f"--offload-arch={arch}"]

    def gcc_install_dir(self) -> str | None:
        """In the chroot: the host C++ library the units are built against (as the compiler sees it).

        sid's default libstdc++ (GCC 16) makes any unit that includes <iostream> (CK's headers do) need
        ``GLIBCXX_3.4.32`` (``std::ios_base_library_init``), which Ubuntu 22.04's libstdc++ lacks: the unit would
        not load there. GCC 12's headers (``libstdc++-12-dev`` in the chroot) need at most 3.4.30.
        ``JITKILN_HIP_GCC_INSTALL_DIR`` overrides (empty: clang's default)."""
        env = os.environ.get("JITKILN_HIP_GCC_INSTALL_DIR")
        if env is not None:
            return env or None
        if not self.runner.chroot:
            return None
        d = "/usr/lib/gcc/x86_64-linux-gnu/12"
        ok = os.path.isdir(self.runner.host_file(d)) and os.path.isfile(self.runner.host_file("/usr/include/c++/12/iostream"))
        return d if ok else None

    # ---- compile -------------------------------------------------------------------------------------------
    def command(self, src: str, out: str, spec: CompileSpec, deps_path: str, trace_dir: str | None,
                extra: tuple[str, ...] = (), cuid: str | None = None) -> list[str]:
        i = self.runner.inside
        cmd = [self.inner, "-x", "hip", *self.offload_arch(spec.arch), "-fPIC", *extra, "-MD", "-MF", i(deps_path)]
        gcc = self.gcc_install_dir()
        if gcc:
            cmd.append(f"--gcc-install-dir={gcc}")
        if cuid:
            cmd.append(f"-cuid={cuid}")
        if trace_dir:
            cmd += [f"-ftime-trace={i(trace_dir)}/", "-ftime-trace-granularity=500"]
        for d in spec.include_dirs:
            cmd += ["-I", i(d)]
        cmd += [f for f in spec.flags if f != "-fPIC"]
        extra_env = os.environ.get("JITKILN_HIP_FLAGS")
        if extra_env:
            cmd += shlex.split(extra_env)
        cmd += [i(src), "-o", i(out)]
        return cmd

    def _run(self, cmd: list[str], job: CompileJob, rw: list[str]) -> tuple[int, str, float, int, float]:
        ro = list(job.spec.include_dirs)
        full = self.runner.wrap(cmd, rw=rw, ro=ro, cwd=job.workdir)
        return run_measured(full, cwd=job.workdir, env=self.runner.env(),
                            timeout=job.timeout, hold_fd=job.hold_fd)

    def _deps(self, deps_paths: list[str]) -> list[str]:
        deps: list[str] = []
        for p in deps_paths:
            if os.path.exists(p):
                for d in parse_depfile(Path(p).read_text()):
                    h = self.runner.host(os.path.normpath(d))
                    if h not in deps:
                        deps.append(h)
        return deps

    def compile(self, job: CompileJob) -> CompileResult:
        if os.environ.get("JITKILN_HIP_MODE", "one-shot") == "split":
            return self.compile_split(job)
        src, out = job.source_path, job.out_path
        deps_path = os.path.join(job.workdir, "deps.d")
        # no -ftime-trace: clang 22 ignores it when one command compiles and links ("argument unused")
        cmd = self.command(src, out, job.spec, deps_path, None, extra=("-shared",), cuid=unit_cuid(src, job.spec))
        rw = [job.workdir, os.path.dirname(os.path.abspath(out)), os.path.dirname(os.path.abspath(src))]
        rc, log, wall, peak, cpu = self._run(cmd, job, rw)
        if job.log_path:
            Path(job.log_path).write_text(f"$ {shlex.join(cmd)}\n{log}")
        raise_for_exit(rc, src, log, job.log_path, compiler="hipcc")
        phases: dict[str, float] = {}
        return CompileResult(seconds=wall, peak_rss=peak, cpu_s=cpu, deps=self._deps([deps_path]), phases=phases,
                             log=log, command=cmd, mode="one-shot")

    def compile_split(self, job: CompileJob) -> CompileResult:
        """Device half and host half side by side, then the link: the same commands clang runs in one-shot mode,
        so the same code-object bytes (same ``-cuid``).

        * device: ``--offload-device-only -c`` -> ``dev.hipfb`` (device cc1, lld, offload bundler);
        * host: ``--offload-host-only -c`` with ``-fcuda-include-gpubinary`` on a FIFO: the host front end (parsing,
          IR generation) runs beside the device half and blocks only where clang embeds the fatbin (end of IR
          generation); the bytes are written into the FIFO as soon as the device half is done;
        * link: ``hipcc -shared --hip-link host.o``.
        Phases: the wall seconds of each half and of the link."""
        import threading
        src, out, w = job.source_path, job.out_path, job.workdir
        spec, cuid = job.spec, unit_cuid(src, job.spec)
        i = self.runner.inside
        dev, host_o, fifo = os.path.join(w, "dev.hipfb"), os.path.join(w, "host.o"), os.path.join(w, "gpubin.fifo")
        if os.path.exists(fifo):
            os.unlink(fifo)
        os.mkfifo(fifo)
        dev_cmd = self.command(src, dev, spec, os.path.join(w, "deps.dev.d"), None,
                               extra=("--offload-device-only", "-c"), cuid=cuid)
        host_cmd = self.command(src, host_o, spec, os.path.join(w, "deps.host.d"), None,
                                extra=("--offload-host-only", "-c", "-Xclang", "-fcuda-include-gpubinary",
                                       "-Xclang", i(fifo)), cuid=cuid)
        gcc = self.gcc_install_dir()
        link_cmd = [self.inner, "-fPIC", "-shared", "--hip-link", *([f"--gcc-install-dir={gcc}"] if gcc else []),
                    i(host_o), "-o", i(out)]
        rw = [w, os.path.dirname(os.path.abspath(out)), os.path.dirname(os.path.abspath(src))]
        res: dict[str, tuple] = {}
        t0 = time.monotonic()
        host_thread = threading.Thread(target=lambda: res.__setitem__("host", self._run(host_cmd, job, rw)))
        host_thread.start()
        try:
            res["device"] = self._run(dev_cmd, job, rw)
            data = Path(dev).read_bytes() if res["device"][0] == 0 else b""
            while host_thread.is_alive():  # hand the fatbin to the host half when it asks (or an empty one on failure)
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # no reader yet
                    host_thread.join(0.05)
                    continue
                try:
                    os.set_blocking(fd, True)
                    os.write(fd, data) if data else None
                except BrokenPipeError:
                    pass
                finally:
                    os.close(fd)
                break
        finally:
            host_thread.join()
            try:
                os.unlink(fifo)
            except OSError:
                pass
        t_halves = time.monotonic() - t0
        logs = []
        for half, cmd in (("device", dev_cmd), ("host", host_cmd)):
            rc, log = res[half][0], res[half][1]
            logs.append(f"$ {shlex.join(cmd)}\n{log}")
            if rc != 0:
                if job.log_path:
                    Path(job.log_path).write_text("\n".join(logs))
                raise_for_exit(rc, src, log, job.log_path, compiler=f"hipcc ({half} half)")
        rc, log3, wall3, _peak3, cpu3 = self._run(link_cmd, job, rw)
        logs.append(f"$ {shlex.join(link_cmd)}\n{log3}")
        if job.log_path:
            Path(job.log_path).write_text("\n".join(logs))
        raise_for_exit(rc, src, log3, job.log_path, compiler="hipcc (link)")
        (_, _, wd, pd, cd), (_, _, wh, ph, ch) = res["device"], res["host"]
        return CompileResult(seconds=time.monotonic() - t0, peak_rss=pd + ph, cpu_s=cd + ch + cpu3,
                             deps=self._deps([os.path.join(w, "deps.dev.d"), os.path.join(w, "deps.host.d")]),
                             phases={"device half": round(wd, 3), "host half": round(wh, 3),
                                     "halves (side by side)": round(t_halves, 3), "link": round(wall3, 3)},
                             log="\n".join(logs), command=dev_cmd + ["&"] + host_cmd + ["&&"] + link_cmd, mode="split")


def unit_cuid(src: str, spec: CompileSpec) -> str:
    """The compilation-unit id (``-cuid``) that pairs a unit's host and device halves: from the unit's text, arch
    and flags, not (as clang's default) from its path and command line, so an artifact does not depend on the
    per-attempt work folder and the split mode's halves pair up with the same bytes as one-shot."""
    import hashlib
    h = hashlib.sha256(Path(src).read_bytes())
    h.update(repr((spec.arch, tuple(spec.flags))).encode())
    return h.hexdigest()[:16]
