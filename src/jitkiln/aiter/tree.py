"""The AITER tree AITER itself runs from, the target arch, and the dispatch-signature check.

jitkiln must generate the reduced module with the *same* generator as the AITER that compiles and calls it: the
generated dispatch headers are called from that tree's ``gemm_moe_ck2stages.cu``. So the root is taken from the
imported ``aiter`` package (``aiter.jit.core.AITER_META_DIR``: ``aiter_meta/`` for a wheel, the checkout for a
git/develop install), never silently from another installed copy.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import JitkilnError
from ..families.ck2stages.aiter_tree import CODEGEN, GENERATOR

ARCHS = ("gfx950", "gfx942")
# KFD topology "gfx_target_version" -> gfx name (major*10000 + minor*100 + stepping)
_KFD = {90500: "gfx950", 90402: "gfx942"}


class AiterHookError(JitkilnError):
    """A failure of the AITER front end; ``str(e)`` is the one-line reason."""

    exit_code = 9


def runtime_root(core=None) -> Path:
    """The tree AITER compiles from: ``core.AITER_META_DIR`` of the imported AITER (imported if needed)."""
    if core is None:
        core = sys.modules.get("aiter.jit.core")
    if core is not None and getattr(core, "AITER_META_DIR", None):
        root = Path(core.AITER_META_DIR).resolve()
    else:
        root = package_root()
    if not (root / CODEGEN / GENERATOR).is_file():
        raise AiterHookError(f"the AITER that is running ({root}) has no {CODEGEN}/{GENERATOR}",
                             hint="install AITER with its sources (a git checkout with `pip install -e .`, or the "
                                  "amd-aiter wheel, which ships them under aiter_meta/)")
    return root


def package_root() -> Path:
    """The AITER source root for the importable ``aiter`` package, without importing it (for seed/prebuild)."""
    spec = importlib.util.find_spec("aiter")
    if spec is None or not spec.submodule_search_locations:
        raise AiterHookError("AITER is not importable in this Python",
                             hint="install AITER (pip install amd-aiter, or pip install -e an AITER checkout)")
    pkg = Path(list(spec.submodule_search_locations)[0]).resolve()
    for cand in (pkg.parent / "aiter_meta", pkg.parent):
        if (cand / CODEGEN / GENERATOR).is_file():
            mode = pkg / "install_mode"
            if cand.name == "aiter_meta" and mode.is_file() and mode.read_text().strip() == "develop":
                continue  # AITER's own rule: develop installs compile from the checkout
            return cand
    raise AiterHookError(f"AITER at {pkg} ships no {CODEGEN}/{GENERATOR}",
                         hint="install AITER with its sources (git checkout or the amd-aiter wheel)")


def jit_dir() -> Path:
    """Where AITER imports JIT modules from (``aiter.jit.core.get_user_jit_dir`` without importing AITER)."""
    env = os.environ.get("AITER_JIT_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("aiter")
    if spec is None or not spec.submodule_search_locations:
        raise AiterHookError("AITER is not importable and AITER_JIT_DIR is not set",
                             hint="set AITER_JIT_DIR to the folder AITER loads JIT modules from")
    here = Path(list(spec.submodule_search_locations)[0]) / "jit"
    if os.access(here, os.W_OK):
        return here
    return Path.home() / ".aiter" / "jit"


# --- arch -----------------------------------------------------------------------------------------------

def detect_gpu_arch() -> str | None:
    """The gfx name of a visible AMD GPU (rocminfo, else the KFD topology), or None."""
    exe = shutil.which("rocminfo") or next((p for p in (os.path.join(os.environ.get("ROCM_PATH", "/opt/rocm"),
                                                                    "bin", "rocminfo"),) if os.path.exists(p)), None)
    if exe:
        try:
            out = subprocess.run([exe], capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        names = re.findall(r"^\s*Name:\s*(gfx[0-9a-f]+)\s*$", out, re.MULTILINE)
        if names:
            return names[0]
    for props in sorted(glob.glob("/sys/class/kfd/kfd/topology/nodes/*/properties")):
        try:
            m = re.search(r"gfx_target_version\s+(\d+)", Path(props).read_text())
        except OSError:
            continue
        if m and int(m.group(1)) in _KFD:
            return _KFD[int(m.group(1))]
    return None


def resolve_arch(arch: str | None = None) -> str:
    """``arch``, else ``$JITKILN_ARCH``, else ``$GPU_ARCHS`` (last entry, AITER's rule); ``native`` (AITER's default
    when GPU_ARCHS is unset) is resolved from the GPU, and refused with a clear error when none is visible."""
    src = "arch argument"
    val = arch
    if not val:
        val, src = os.environ.get("JITKILN_ARCH"), "JITKILN_ARCH"
    if not val:
        val, src = os.environ.get("GPU_ARCHS", "native"), "GPU_ARCHS" if "GPU_ARCHS" in os.environ else \
            "GPU_ARCHS (unset: AITER's default 'native')"
        val = [a.strip() for a in val.split(";") if a.strip()][-1] if val.strip() else "native"
    if val == "native":
        got = detect_gpu_arch()
        if got is None:
            raise AiterHookError(f"{src} is 'native' and no AMD GPU is visible to resolve it",
                                 hint="name the target: JITKILN_ARCH=gfx950 (or --arch gfx950 / arch='gfx950'), "
                                      "or GPU_ARCHS=gfx950")
        val, src = got, f"native GPU ({got})"
    if val not in ARCHS:
        raise AiterHookError(f"{src} names {val!r}, which jitkiln's ck2stages front end does not support",
                             hint=f"use one of: {', '.join(ARCHS)}")
    return val


# --- the dispatch signature ----------------------------------------------------------------------------

def caller_arity(root: Path) -> dict[int, int]:
    """How many arguments the tree's ``gemm_moe_ck2stages.cu`` passes to each stage's heuristic dispatch."""
    src = root / CODEGEN / "gemm_moe_ck2stages.cu"
    try:
        text = src.read_text()
    except OSError as e:
        raise AiterHookError(f"cannot read AITER's dispatch caller {src}: {e.strerror or e}") from None
    out = {}
    for stage in (1, 2):
        m = re.search(rf"moe_stage{stage}_heuristic_dispatch\s*\(([^;]*?)\)\s*;", text, re.DOTALL)
        if not m:
            raise AiterHookError(f"AITER's {src.name} does not call moe_stage{stage}_heuristic_dispatch",
                                 hint="this AITER's ck2stages layout is not one jitkiln understands")
        out[stage] = len([a for a in _split_args(m.group(1)) if a.strip()])
    return out


def _split_args(s: str) -> list[str]:
    depth, cur, out = 0, "", []
    for ch in s:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def check_signature(mod, root: Path) -> None:
    """Refuse (before any compile) a tree whose generated dispatch does not match its caller, or whose
    dispatch parameters jitkiln cannot fill in."""
    arity = caller_arity(root)
    for stage in (1, 2):
        fn = mod.dispatch[stage]
        params = list(fn.param_names)
        if len(params) != arity[stage]:
            raise AiterHookError(
                f"AITER tree {root}: the generated stage-{stage} dispatch takes {len(params)} parameters "
                f"({', '.join(params)}) but gemm_moe_ck2stages.cu passes {arity[stage]}",
                hint="the generator and the caller come from different AITER versions; reinstall AITER so that "
                     "csrc/ and aiter/ match")
        known = set(mod.variant.dispatch_values(stage)) | {"block_m", "inter_dim"}
        unknown = [p for p in params if p not in known]
        if unknown:
            raise AiterHookError(
                f"AITER tree {root}: the stage-{stage} dispatch takes {', '.join(unknown)}, which jitkiln does "
                f"not understand",
                hint="use an AITER version jitkiln supports, or disable jitkiln.aiter (AITER's full module)")


def check_tree(root: Path, variant: str, arch: str):
    """Run the tree's generator for ``variant``/``arch`` and check its dispatch signature; returns the family."""
    from .planner import AiterCK2Stages
    fam = AiterCK2Stages(aiter_root=str(root), arch=arch)
    try:
        mod = fam.module(variant)
    except JitkilnError as e:
        raise AiterHookError(f"AITER tree {root}: {e}", hint=e.hint, details=e.details) from None
    check_signature(mod, root)
    return fam
