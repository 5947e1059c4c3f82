"""Locate an AITER tree and run its own CK two-stage MoE generator.

jitkiln never copies AITER's kernel lists or dispatch: it runs ``gen_instances.py`` from the tree it is given
(the installed ``amd-aiter`` wheel by default, ``--aiter-root`` / ``JITKILN_AITER_ROOT`` for a checkout) and
reads what it writes. The generator needs no ROCm, only a ``hipconfig`` that prints a version (a stub is made in
a temporary directory for the run) and ``GPU_ARCHS`` naming the target.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import JitkilnError
from ...store import LAYOUT, default_root

CODEGEN = "csrc/ck_gemm_moe_2stages_codegen"
GENERATOR = "gen_instances.py"
ENV_ROOT = "JITKILN_AITER_ROOT"
INSTALL_HINT = ("install AITER's sources with `pip install 'jitkiln[aiter]'` (amd-aiter==0.1.7.post2.dev18), "
                f"or point --aiter-root / {ENV_ROOT} at an AITER checkout (the folder holding {CODEGEN}/)")


class AiterNotFound(JitkilnError):
    exit_code = 3


@dataclass(frozen=True)
class AiterTree:
    """An AITER source tree: ``root`` holds ``csrc/``; ``package`` is the ``aiter`` Python package next to it."""

    root: Path
    package: Path | None
    origin: str

    @property
    def codegen(self) -> Path:
        return self.root / CODEGEN

    @property
    def configs(self) -> Path | None:
        return self.package / "configs" if self.package else None

    @property
    def include_dirs(self) -> tuple[str, ...]:
        ck = self.root / "3rdparty" / "composable_kernel"
        dirs = [self.codegen, self.root / "csrc" / "include", ck / "include", ck / "library" / "include"]
        return tuple(str(d) for d in dirs)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Digest of the generator's own files: a different AITER gives a different fingerprint."""
        h = hashlib.sha256()
        for p in sorted(self.codegen.iterdir()):
            if p.is_file() and p.suffix in (".py", ".h", ".cuh", ".cu", ".hpp"):
                h.update(p.name.encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    @property
    def version(self) -> str:
        for cand in ([self.package / "_version.py"] if self.package else []):
            if cand.is_file():
                for line in cand.read_text().splitlines():
                    if "version" in line and "=" in line:
                        return line.split("=", 1)[1].strip().strip("'\"")
        return "unknown"


def _package_for(root: Path) -> Path | None:
    for cand in (root / "aiter", root.parent / "aiter"):
        if (cand / "jit" / "utils").is_dir():
            return cand
    return None


def find_tree(aiter_root: str | os.PathLike | None = None) -> AiterTree:
    """The AITER tree: ``aiter_root``, else ``$JITKILN_AITER_ROOT``, else the installed ``amd-aiter`` wheel."""
    given = aiter_root or os.environ.get(ENV_ROOT)
    if given:
        origin = "--aiter-root" if aiter_root else ENV_ROOT
        root = Path(given).expanduser().resolve()
        if not (root / CODEGEN / GENERATOR).is_file():
            # accept the wheel's site-packages folder or the aiter_meta folder itself
            if (root / "aiter_meta" / CODEGEN / GENERATOR).is_file():
                root = root / "aiter_meta"
            else:
                raise AiterNotFound(f"{origin} {given} is not an AITER tree: {CODEGEN}/{GENERATOR} is missing",
                                    hint=INSTALL_HINT)
        return AiterTree(root, _package_for(root), f"{origin}={root}")
    import importlib.util
    spec = importlib.util.find_spec("aiter_meta")
    if spec and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).resolve()
        if (root / CODEGEN / GENERATOR).is_file():
            return AiterTree(root, _package_for(root), "installed amd-aiter")
    raise AiterNotFound("AITER's sources were not found (no installed amd-aiter, no --aiter-root, "
                        f"no {ENV_ROOT})", hint=INSTALL_HINT)


# --- the generator ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratedBlob:
    """What ``gen_instances.py`` wrote: instance units by kernel name, the lookup header, the two dispatch headers."""

    args: tuple[str, ...]
    arch: str
    instances: dict = field(hash=False)  # kernel name -> unit text
    lookup: str = ""
    dispatch: dict = field(default_factory=dict, hash=False)  # stage -> header text


_STUB_HIPCONFIG = "#!/bin/sh\n# stub written by jitkiln: AITER's generator only asks for a version\necho 6.4.0\n"


def run_generator(tree: AiterTree, args: tuple[str, ...], arch: str, out_dir: Path) -> None:
    """Run the tree's generator into ``out_dir`` (created, with ``instances/``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "instances").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jitkiln-hipconfig-") as bindir:
        env = dict(os.environ)
        if not shutil.which("hipconfig"):
            stub = Path(bindir) / "hipconfig"
            stub.write_text(_STUB_HIPCONFIG)
            stub.chmod(0o755)
            env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env["GPU_ARCHS"] = arch
        cmd = [sys.executable, str(tree.codegen / GENERATOR), *args, "-w", str(out_dir)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tree.codegen))
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-12:])
        raise JitkilnError(f"AITER's generator failed (exit {p.returncode}) for {' '.join(args)} on {arch}",
                           hint=f"run it by hand to see why: GPU_ARCHS={arch} {' '.join(cmd)}; "
                                f"the AITER tree is {tree.root} ({tree.origin})",
                           details=tail)


def _memo_file(tree: AiterTree, args: tuple[str, ...], arch: str) -> Path:
    """Where a generator run's output is remembered across processes: keyed by the content of every file the
    generator runs (its folder, and AITER's ``chip_info.py`` it imports), its arguments and the arch."""
    h = hashlib.sha256(f"jitkiln-aiter-gen-v1\0{tree.fingerprint}\0{' '.join(args)}\0{arch}".encode())
    for cand in ([tree.package / "jit" / "utils" / "chip_info.py"] if tree.package else []) + \
            [tree.root / "aiter" / "jit" / "utils" / "chip_info.py"]:
        if cand.is_file():
            h.update(cand.read_bytes())
            break
    return default_root() / LAYOUT / "aiter-gen" / f"{h.hexdigest()}.json"


def _remembered(path: Path, args: tuple[str, ...], arch: str) -> GeneratedBlob | None:
    try:
        d = json.loads(path.read_text())
        blob = GeneratedBlob(args, arch, dict(d["instances"]), str(d["lookup"]),
                             {int(k): str(v) for k, v in d["dispatch"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return blob if blob.instances and len(blob.dispatch) == 2 else None


def _remember(path: Path, blob: GeneratedBlob) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"instances": blob.instances, "lookup": blob.lookup, "dispatch": blob.dispatch}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs running the generator again


@functools.lru_cache(maxsize=64)
def generate(tree: AiterTree, args: tuple[str, ...], arch: str) -> GeneratedBlob:
    """What the tree's generator writes for ``args`` on ``arch``: remembered in the cache (by the content of the
    generator's files) after one run in a temporary folder, and per process."""
    memo = _memo_file(tree, args, arch)
    blob = _remembered(memo, args, arch)
    if blob is not None:
        return blob
    blob = _generate(tree, args, arch)
    _remember(memo, blob)
    return blob


def _generate(tree: AiterTree, args: tuple[str, ...], arch: str) -> GeneratedBlob:
    with tempfile.TemporaryDirectory(prefix="jitkiln-ck2stages-gen-") as d:
        out = Path(d)
        run_generator(tree, args, arch, out)
        inst = {p.stem: p.read_text() for p in sorted((out / "instances").glob("*.cu"))}
        lookup_p = out / "gemm_moe_ck2stages_lookup.h"
        disp = {}
        for s in (1, 2):
            p = out / f"ck2stages_moe_stage{s}_heuristic_dispatch.hpp"
            if p.is_file():
                disp[s] = p.read_text()
        if not inst or not lookup_p.is_file() or len(disp) != 2:
            raise JitkilnError(f"AITER's generator wrote no module for {' '.join(args)} on {arch}",
                               hint=f"check the AITER tree at {tree.root}: expected instances/*.cu, "
                                    "gemm_moe_ck2stages_lookup.h and two *_heuristic_dispatch.hpp")
        return GeneratedBlob(args, arch, inst, lookup_p.read_text(), disp)
