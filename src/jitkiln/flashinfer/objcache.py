"""One compile command -> one content-addressed object file, in jitkiln's store.

Shared by the builder (``jitkiln flashinfer build``) and the launcher (``jitkiln flashinfer cc``): the command is
any ``nvcc``/``c++`` line of the form ``COMPILER ... -c SRC -o OUT`` (with or without a dependency-file option).

Keys (immune to paths and mtimes):

* unit key: the source text, the command with the output, the source path and dependency-file options removed
  and every path under an include folder (``-I``/``-isystem``), the source's folder or the compiler's toolkit
  written as a label (``<inc3>/...``, ``<src>``, ``<tc>/...``), and the compiler fingerprint (the content of
  nvcc, cicc, ptxas, fatbinary, nvlink and the host compiler; of the driver and cc1plus for ``c++``). The target
  arch is in the command (``-gencode``).
* entry key: plus (label, sha256) of every header the compiler read (its full dependency output).

On a hit the object is written to OUT (temp name, rename) and a dependency file for ninja when asked; on a miss
the unit's lock is taken (one compile per unit across processes and, with a shared lock folder, machines), the
command runs into a private folder, and the object is published atomically.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import digests
from ..compilers.base import first_error_lines, parse_depfile, remembered, remembered_digest, run_measured
from ..errors import CompileError, UsageError
from ..keys import canonical_json, sha256_hex

DEP_FLAGS_WITH_ARG = {"-MF", "-MT", "-MQ", "--dependency-output", "-odir"}
DEP_FLAGS = {"-MD", "-MMD", "--generate-dependencies-with-compile", "--generate-nonsystem-dependencies-with-compile",
             "-MP"}
INCLUDE_FLAGS = ("-I", "-isystem", "-iquote", "-idirafter", "--include-path")


@dataclass
class Command:
    """A parsed compile command."""

    argv: list[str]
    compiler: str
    source: str
    out: str
    depfile: str | None
    include_dirs: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, argv: list[str]) -> "Command":
        if not argv:
            raise UsageError("jitkiln cc: no compiler command given",
                             hint="use it as a launcher: `jitkiln flashinfer cc nvcc ... -c SRC -o OUT`")
        src = out = dep = None
        incs: list[str] = []
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "-c" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                src = argv[i + 1]
                i += 2
                continue
            if a == "-o" and i + 1 < len(argv):
                out = argv[i + 1]
                i += 2
                continue
            if a == "-MF" and i + 1 < len(argv):
                dep = argv[i + 1]
            for f in INCLUDE_FLAGS:
                if a == f and i + 1 < len(argv):
                    incs.append(argv[i + 1])
                elif a.startswith(f) and len(a) > len(f) and not a.startswith(f + "="):
                    if f == "-I" or a[len(f)] in "/.":
                        incs.append(a[len(f):].strip())
            i += 1
        if src is None:  # `-c` as a bare flag: the source is the one positional .cu/.cpp/.cc/.c argument
            pos = [a for a in argv[1:] if not a.startswith("-") and a.endswith((".cu", ".cpp", ".cc", ".cxx", ".c"))]
            src = pos[0] if len(pos) == 1 and "-c" in argv else None
        if src is None or out is None:
            raise UsageError(f"not a single-file compile (no `-c SRC` / `-o OUT`): {shlex.join(argv)[:200]}")
        return cls(list(argv), argv[0], src, out, dep, incs)

    def roots(self, compiler_root: str | None) -> list[tuple[str, str]]:
        """(label, real folder), longest first: include folders by position, the source's folder, the toolkit."""
        rs = [(f"inc{i}", os.path.realpath(d)) for i, d in enumerate(self.include_dirs)]
        rs.append(("src", os.path.realpath(os.path.dirname(os.path.abspath(self.source)))))
        if compiler_root:
            rs.append(("tc", os.path.realpath(compiler_root)))
        return sorted(rs, key=lambda r: -len(r[1]))

    def normalized(self, compiler_root: str | None) -> list[str]:
        """The command without compiler path, output, source, dependency options; paths written as labels."""
        roots = self.roots(compiler_root)
        src_real = os.path.realpath(self.source)
        out: list[str] = []
        skip = False
        args = self.argv[1:]
        for i, a in enumerate(args):
            if skip:
                skip = False
                continue
            if a in ("-o",) or a in DEP_FLAGS_WITH_ARG:
                skip = True
                continue
            if a in DEP_FLAGS or a == "-c":
                continue
            if os.path.realpath(a) == src_real and not a.startswith("-"):
                continue
            out.append(_label_text(a, roots))
        return out


def _label_text(arg: str, roots: list[tuple[str, str]]) -> str:
    for prefix in ("", *INCLUDE_FLAGS, "-L", "--compiler-bindir=", "-ccbin="):
        if not arg.startswith(prefix):
            continue
        rest = arg[len(prefix):]
        if rest.startswith("/"):
            rp = os.path.realpath(rest)
            for tag, root in roots:
                if rp == root or rp.startswith(root + os.sep):
                    return prefix + f"<{tag}>" + rp[len(root):]
    return arg


class Labels:
    """Header path <-> portable label, for one command's roots."""

    def __init__(self, roots: list[tuple[str, str]]):
        self.roots = roots

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
        return digests.digest(self.path(label))


# --- compiler fingerprints --------------------------------------------------------------------------------
_fp_memo: dict[str, tuple[str, str | None]] = {}


def compiler_identity(exe: str) -> tuple[str, str | None]:
    """(fingerprint, toolkit root) of the compiler a command names."""
    path = shutil.which(exe) or exe
    if path in _fp_memo:
        return _fp_memo[path]
    if not os.path.exists(path):
        raise UsageError(f"compiler {exe!r} not found", hint="check PATH / CUDA_HOME, or the command's compiler")
    base = os.path.basename(os.path.realpath(path))
    if "nvcc" in os.path.basename(path) or base == "nvcc":
        from ..compilers.nvcc import Nvcc
        n = Nvcc(path)
        res = (n.fingerprint, n.root)
    else:
        h = hashlib.sha256(b"cxx")
        h.update(remembered("version", path, lambda: subprocess.run([path, "--version"], capture_output=True,
                                                                     text=True).stdout).encode())
        h.update(remembered_digest(path).encode())
        for prog in ("cc1plus", "cc1", "as"):
            try:
                p = subprocess.run([path, f"-print-prog-name={prog}"], capture_output=True, text=True,
                                   timeout=30).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                p = ""
            p = shutil.which(p) or p
            if p and os.path.isfile(p):
                h.update(remembered_digest(p).encode())
        res = (f"cxx-{base}-{h.hexdigest()[:16]}", None)
    _fp_memo[path] = res
    return res


def unit_key(cmd: Command, fingerprint: str, root: str | None, source_text: bytes) -> str:
    return sha256_hex("jitkiln-flashinfer-obj-v1", source_text, fingerprint,
                      canonical_json(cmd.normalized(root)))


# --- compile or fetch -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # hit | waited | compiled
    seconds: float
    cpu_s: float
    peak_rss: int
    key: str
    name: str


def _write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".jk-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_depfile(cmd: Command, labels: Labels, deps: dict[str, str]) -> None:
    if not cmd.depfile:
        return
    paths = [os.path.abspath(cmd.source)] + [labels.path(lbl) for lbl in sorted(deps)]
    text = cmd.out.replace(" ", "\\ ") + ": " + " \\\n  ".join(p.replace(" ", "\\ ") for p in paths) + "\n"
    _write_atomic(cmd.depfile, text.encode())


def compile_cached(argv: list[str], store, name: str | None = None, cwd: str | None = None,
                   meta_extra: dict[str, Any] | None = None, on_wait=None, gate=None) -> Outcome:
    """Produce ``-o OUT`` of ``argv`` from the store, or compile it once (under the unit's lock) and publish."""
    cmd, fp, root, ukey, labels = prepare(argv, cwd)
    name = name or os.path.basename(cmd.source)
    return _compile_prepared(cmd, fp, root, ukey, labels, store, name, cwd, meta_extra, on_wait, gate)


def prepare(argv: list[str], cwd: str | None = None):
    """(command, compiler fingerprint, toolkit root, unit key, header labels) of a compile command."""
    cmd = Command.parse(argv)
    if cwd:
        cmd.source = os.path.join(cwd, cmd.source)
        cmd.out = os.path.join(cwd, cmd.out)
        if cmd.depfile:
            cmd.depfile = os.path.join(cwd, cmd.depfile)
        cmd.include_dirs = [os.path.join(cwd, d) for d in cmd.include_dirs]
    fp, root = compiler_identity(cmd.compiler)
    src_text = Path(cmd.source).read_bytes()
    ukey = unit_key(cmd, fp, root, src_text)
    return cmd, fp, root, ukey, Labels(cmd.roots(root))


def _compile_prepared(cmd: Command, fp: str, root: str | None, ukey: str, labels: Labels, store, name: str,
                      cwd: str | None, meta_extra: dict[str, Any] | None, on_wait, gate) -> Outcome:

    def fetch(status: str) -> Outcome | None:
        e = store.lookup(ukey, labels.digest)
        if e is None:
            return None
        data = store.read_verified(e)
        _write_atomic(cmd.out, data)
        deps = {}
        for rec in reversed(store.read_manifest(ukey)) if hasattr(store, "read_manifest") else []:
            if rec.get("key") == e.key:
                deps = rec["deps"]
                break
        _write_depfile(cmd, labels, deps)
        return Outcome(status, 0.0, 0.0, 0, e.key, name)

    hit = fetch("hit")
    digests.flush()
    if hit:
        return hit
    store.ensure()
    waited: list[str] = []
    with store.lock(ukey, name, on_wait=(lambda h: (waited.append(h), on_wait and on_wait(h)))):
        got = fetch("waited" if waited else "hit")
        if got:
            return got
        work = Path(tempfile.mkdtemp(prefix="jk-fi-", dir=str(store.root / "tmp")))
        try:
            obj = work / "out.o"
            dep = work / "out.d"
            run = _private_command(cmd, str(obj), str(dep))
            with (gate() if gate else contextlib.nullcontext()):
                rc, log, wall, peak, cpu = run_measured(run, cwd=cwd or str(work))
            log_path = store.log_path(ukey)
            with contextlib.suppress(OSError):
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_path.write_text(f"$ {shlex.join(run)}\n{log}")
            if rc != 0:
                if rc < 0 or rc in (137, 139):
                    from ..errors import CompilerKilled
                    raise CompilerKilled(f"the compiler was killed (signal {-rc if rc < 0 else rc - 128}) compiling "
                                         f"{name} (likely out of memory)", hint="compile with fewer parallel jobs",
                                         unit=cmd.source, log=str(log_path))
                raise CompileError(f"{os.path.basename(cmd.compiler)} failed (exit {rc}) compiling {name}",
                                   hint=f"the full log is {log_path}", details=first_error_lines(log),
                                   unit=cmd.source, log=str(log_path))
            src_real = os.path.realpath(cmd.source)
            deps = {labels.label(p): digests.file_digest(p) for p in parse_depfile(dep.read_text())[1:]
                    if os.path.realpath(p) != src_real and os.path.exists(p)} if dep.exists() else {}
            meta = {"name": name, "family": "flashinfer", "kind": "o", "compile_s": round(wall, 3),
                    "cpu_s": round(cpu, 3), "peak_rss": peak, "toolchain": fp,
                    "command": cmd.normalized(root), "host": os.uname().nodename, **(meta_extra or {})}
            data = obj.read_bytes()
            e = store.publish(ukey, deps, data, meta)
            _write_atomic(cmd.out, data)
            _write_depfile(cmd, labels, deps)
            return Outcome("compiled", wall, cpu, peak, e.key, name)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _private_command(cmd: Command, obj: str, dep: str) -> list[str]:
    """The command writing into a private folder, with full (system headers included) dependency output."""
    out: list[str] = [cmd.argv[0]]
    args = cmd.argv[1:]
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "-o" or a in DEP_FLAGS_WITH_ARG:
            skip = True
            continue
        if a in DEP_FLAGS:
            continue
        out.append(a)
    is_nvcc = "nvcc" in os.path.basename(cmd.compiler)
    out += (["--generate-dependencies-with-compile", "--dependency-output", dep] if is_nvcc else ["-MD", "-MF", dep])
    return out + ["-o", obj]
