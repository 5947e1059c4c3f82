"""Run AITER's own ``build.ninja`` with every object going through jitkiln's cache.

AITER's ``build_module`` computes its flags and writes ``build.ninja`` (torch cpp_extension layout: one
``cuda_compile`` edge per source, ``<stem>.cuda.o``, then one ``link`` edge to ``<md_name>.so``) and then runs
``ninja``. For a jitkiln module the hook replaces only that last step (``cpp_extension._run_ninja_build``) by
:func:`run_build`: each compile edge is expanded exactly as ninja would run it (AITER's compiler, flags, include
folders, ``-DTORCH_EXTENSION_NAME``), looked up in jitkiln's content-addressed cache (unit key: the command with
build paths normalised, the source text, the compiler fingerprint; entry key: plus the digest of every header
the compiler read), compiled on a miss (under the unit's lock, so concurrent processes compile it once) and
published; then the link edge runs as written. The compiler is whatever the ninja file names (AITER's
``$ROCM_HOME/bin/hipcc``), so a fake compiler in tests and the real one on a ROCm machine run the same code.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..fleet.config import store_from_env

INSTANCE_RE = re.compile(r"^moe_ck2stages_gemm[12]_")


@dataclass
class Edge:
    out: str
    rule: str
    inputs: list
    command: str = ""


@dataclass
class NinjaFile:
    vars: dict = field(default_factory=dict)
    rules: dict = field(default_factory=dict)  # name -> {command, rspfile, rspfile_content}
    edges: list = field(default_factory=list)


def _unescape(s: str) -> str:
    return re.sub(r"\$([ :$])", r"\1", s)


def _split_paths(s: str) -> list[str]:
    parts = re.split(r"(?<!\$) ", s.strip())
    return [_unescape(p) for p in parts if p]


def parse_ninja(text: str) -> NinjaFile:
    nf = NinjaFile()
    cur_rule = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw.startswith((" ", "\t")):
            if cur_rule is not None and "=" in raw:
                k, v = raw.strip().split("=", 1)
                nf.rules[cur_rule][k.strip()] = v.strip()
            continue
        cur_rule = None
        if raw.startswith("rule "):
            cur_rule = raw[5:].strip()
            nf.rules[cur_rule] = {}
        elif raw.startswith("build "):
            lhs, rhs = raw[6:].split(": ", 1)
            parts = rhs.strip().split(" ", 1)
            rule, ins = parts[0], (parts[1] if len(parts) > 1 else "")
            nf.edges.append(Edge(_unescape(lhs.strip()), rule, _split_paths(ins.split(" | ")[0])))
        elif raw.startswith("default "):
            continue
        elif "=" in raw:
            k, v = raw.split("=", 1)
            nf.vars[k.strip()] = v.strip()
    return nf


def expand(template: str, env: dict) -> str:
    t = template.replace("$$", "\0")
    t = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), t)
    return t.replace("\0", "$")


# --- fingerprints ----------------------------------------------------------------------------------------

_FP: dict[str, str] = {}


def compiler_fingerprint(exe: str) -> str:
    """Digest of the compiler driver and its ``--version`` (hipcc delegates to amdclang; its version names it)."""
    if exe in _FP:
        return _FP[exe]
    h = hashlib.sha256()
    real = os.path.realpath(exe)
    try:
        h.update(Path(real).read_bytes())
    except OSError:
        h.update(real.encode())
    try:
        h.update(subprocess.run([exe, "--version"], capture_output=True, timeout=60, check=False).stdout)
    except (OSError, subprocess.SubprocessError):
        pass
    _FP[exe] = h.hexdigest()
    return _FP[exe]


def _sha_file(p: str) -> str | None:
    try:
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()
    except OSError:
        return None


class Labeler:
    """Header paths <-> portable labels (``aiter:``, ``rocm:``, ``torch:``, ``py:``, ``blob:``) so that two
    machines with the same headers in different places share entries."""

    def __init__(self, roots: dict[str, str]):
        self.roots = sorted(((k, os.path.realpath(v)) for k, v in roots.items() if v), key=lambda kv: -len(kv[1]))

    def label(self, path: str) -> str:
        rp = os.path.realpath(path)
        for k, root in self.roots:
            if rp == root or rp.startswith(root + os.sep):
                return f"{k}:{os.path.relpath(rp, root)}"
        return rp

    def path(self, label: str) -> str:
        for k, root in self.roots:
            if label.startswith(k + ":"):
                return os.path.join(root, label[len(k) + 1:])
        return label

    def digest(self, label: str) -> str | None:
        return _sha_file(self.path(label))


def parse_depfile(text: str) -> list[str]:
    body = text.replace("\\\n", " ")
    if ":" not in body:
        return []
    deps = body.split(":", 1)[1]
    return [_unescape(d.replace("\\ ", " ")) for d in deps.split()]


# --- the compiler ---------------------------------------------------------------------------------------

class CompilerPlug:
    """Who runs a compile edge. Default (``JITKILN_AITER_HIPCC`` unset or ``aiter``): the command exactly as
    AITER's ninja file writes it (AITER's ``$ROCM_HOME/bin/hipcc``). ``JITKILN_AITER_HIPCC=jitkiln``: jitkiln's
    HIP adapter (:mod:`jitkiln.compilers.hipcc`: a native ROCm, or the ROCm chroot run through bwrap) with
    AITER's flags unchanged. Tests use the default with a recording fake hipcc."""

    def __init__(self, mode: str | None = None):
        self.mode = mode or os.environ.get("JITKILN_AITER_HIPCC", "aiter")
        self.h = None
        if self.mode == "jitkiln":
            from ..compilers.hipcc import Hipcc
            self.h = Hipcc.find()
        elif self.mode != "aiter":
            raise ValueError(f"JITKILN_AITER_HIPCC={self.mode!r}: use 'aiter' or 'jitkiln'")

    def exe(self, cmd: str) -> str:
        return self.h.path if self.h is not None else shlex.split(cmd)[0]

    def run(self, cmd: str, cwd: str, rw: list[str]) -> subprocess.CompletedProcess:
        if self.h is None:
            return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, check=False)
        inside = self.h.runner.inside
        argv = shlex.split(cmd)
        argv[0] = self.h.inner
        ro, out = [], [argv[0]]
        for k, a in enumerate(argv[1:], start=1):
            if a.startswith("-I") and len(a) > 2:
                ro.append(a[2:])
                out.append("-I" + inside(a[2:]))
            elif argv[k - 1] in ("-isystem", "-I", "-MF", "-o") or (a.startswith("/") and os.path.exists(a)):
                if argv[k - 1] in ("-isystem", "-I"):
                    ro.append(a)
                elif os.path.isfile(a):
                    ro.append(os.path.dirname(a))  # a source file's folder (the chroot sees only bound folders)
                out.append(inside(a) if a.startswith("/") else a)
            else:
                out.append(a)
        full = self.h.runner.wrap(out, rw=rw, ro=ro, cwd=cwd)
        return subprocess.run(full, cwd=cwd, capture_output=True, env=self.h.runner.env(), check=False)

    def host(self, path: str) -> str:
        return self.h.runner.host(path) if self.h is not None else path


def _record(bd: Path, res: "Result", t0: float, failed=()) -> None:
    res.wall_s = time.time() - t0
    (bd / "jitkiln_build.json").write_text(json.dumps({"compiled": res.compiled, "cache_hits": res.hits,
                                                       "failed": list(failed), "linked": res.linked,
                                                       "wall_s": round(res.wall_s, 3)}, indent=2) + "\n")


# --- the build ------------------------------------------------------------------------------------------

@dataclass
class Result:
    compiled: list = field(default_factory=list)
    hits: list = field(default_factory=list)
    linked: str = ""
    wall_s: float = 0.0


def run_build(build_directory: str, *, op_dir: str, roots: dict[str, str], store=None,
              jobs: int | None = None, depfiles: bool = True, log=None, plug: CompilerPlug | None = None) -> Result:
    """Execute ``build_directory/build.ninja`` like ninja, with cached compile edges. Raises RuntimeError (as
    AITER's ``_run_ninja_build`` does) with the compiler's output when an edge fails."""
    t0 = time.time()
    bd = Path(build_directory)
    nf = parse_ninja((bd / "build.ninja").read_text())
    if store is None:
        store = store_from_env()
    lab = Labeler({**roots, "blob": os.path.join(op_dir, "blob"), "op": op_dir})
    jobs = jobs or int(os.environ.get("MAX_JOBS") or max(1, int((os.cpu_count() or 1) * 0.8)))
    res = Result()
    plug = plug or CompilerPlug()
    compiles = [e for e in nf.edges if e.rule in ("compile", "cuda_compile")]
    links = [e for e in nf.edges if e.rule == "link"]
    # instance units first (they are the slow ones), then AITER's support units
    compiles.sort(key=lambda e: (0 if INSTANCE_RE.match(Path(e.inputs[0]).name) else 1, e.out))

    def one(e: Edge):
        env = dict(nf.vars, **{"in": " ".join(shlex.quote(i) for i in e.inputs), "out": e.out})
        cmd = expand(nf.rules[e.rule]["command"], env)
        src = e.inputs[0]
        norm = cmd.replace(os.path.realpath(op_dir), "<OP>").replace(op_dir, "<OP>")
        norm = norm.replace(src, "<SRC>").replace(e.out, "<OUT>")
        name = Path(src).name
        if INSTANCE_RE.match(name):
            # an instance unit's code does not depend on the module's name (only the pybind unit uses
            # TORCH_EXTENSION_NAME): one cache entry serves every module (plan) that contains the instance
            norm = re.sub(r"-DTORCH_EXTENSION_NAME=\S+", "-DTORCH_EXTENSION_NAME=<MD>", norm)
        exe = plug.exe(cmd)
        ukey = hashlib.sha256("\0".join(["jitkiln-aiter-object-v1", norm, _sha_file(src) or "",
                                         compiler_fingerprint(exe)]).encode()).hexdigest()
        out_path = bd / e.out
        with store.lock(ukey, what=f"aiter object {name}"):
            hit = store.lookup(ukey, lab.digest)
            if hit is not None:
                out_path.write_bytes(store.read_verified(hit))
                return ("hit", name)
            dep = out_path.with_suffix(out_path.suffix + ".jkdeps")
            run_cmd = cmd + (f" -MD -MF {shlex.quote(str(dep))}" if depfiles else "")
            p = plug.run(run_cmd, str(bd), [str(bd)])
            if p.returncode != 0 or not out_path.is_file():
                text = (p.stdout + p.stderr).decode(errors="replace")
                raise RuntimeError(f"Error building extension object {e.out}: {text}")
            deps: dict[str, str] = {}
            if dep.is_file():
                for d in map(plug.host, parse_depfile(dep.read_text())):
                    if os.path.realpath(d) == os.path.realpath(src):
                        continue
                    lbl = lab.label(d if os.path.isabs(d) else str(bd / d))
                    dg = lab.digest(lbl)
                    if dg:
                        deps[lbl] = dg
            store.publish(ukey, deps, str(out_path), {"name": name, "kind": "aiter-object",
                                                      "family": "ck2stages", "command": norm[:4000]})
            return ("compiled", name)

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = [ex.submit(one, e) for e in compiles]
        errors = []
        for f in futs:
            try:
                kind, name = f.result()
                (res.hits if kind == "hit" else res.compiled).append(name)
            except Exception as err:  # noqa: BLE001
                errors.append(err)
        if errors:
            _record(bd, res, t0, failed=[str(e).splitlines()[0][:300] for e in errors])
            raise errors[0]
    for e in links:
        rule = nf.rules["link"]
        env = dict(nf.vars, **{"in": " ".join(shlex.quote(i) for i in e.inputs), "out": e.out})
        if "rspfile" in rule:
            rsp = expand(rule["rspfile"], env)
            (bd / rsp).write_text(expand(rule.get("rspfile_content", "$in"), env) + "\n")
        cmd = expand(rule["command"], env)
        p = subprocess.run(cmd, shell=True, cwd=str(bd), capture_output=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"Error linking {e.out}: {(p.stdout + p.stderr).decode(errors='replace')}")
        res.linked = e.out
    _record(bd, res, t0)
    if log:
        log(f"jitkiln: {len(res.compiled)} compiled, {len(res.hits)} from cache, linked {res.linked} "
            f"in {res.wall_s:.1f}s")
    return res
