"""The installed FlashInfer: its version (gated), its own ``JitSpec`` for the fused MoE module and the exact
compile commands of its ``build.ninja``.

Nothing here re-states FlashInfer's file list or flags: the spec comes from FlashInfer's
``gen_cutlass_fused_moe_sm90_module()`` (which also runs its kernel generator), the commands from its own
``generate_ninja_build_for_op`` (launcher variables left empty), expanded exactly as ninja would.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from . import VERIFIED_VERSIONS

INSTALL_HINT = ("install it with `pip install flashinfer-python==0.7.2.post1` (it needs torch; on a machine "
                "without a GPU `pip install --no-deps flashinfer-python==0.7.2.post1 apache-tvm-ffi` is enough "
                "for planning and building)")

# arch spellings -> FlashInfer's module for it. Only sm_90a is verified (fused_moe_90 on H100/H200).
ARCHES = {"sm_90a": "90", "sm_90": "90", "90": "90", "90a": "90", "9.0": "90", "9.0a": "90", "hopper": "90"}


def flashinfer_version() -> str:
    """The installed flashinfer-python version; UsageError (how to install it) when it is missing."""
    if importlib.util.find_spec("flashinfer") is None:
        raise UsageError("FlashInfer is not installed (no module named 'flashinfer')", hint=INSTALL_HINT)
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("flashinfer-python", "flashinfer_python", "flashinfer"):
        with contextlib.suppress(PackageNotFoundError):
            return version(dist)
    raise UsageError("FlashInfer is importable but has no package metadata (no flashinfer-python distribution)",
                     hint=INSTALL_HINT)


def check_version(v: str | None = None) -> str:
    v = v or flashinfer_version()
    if v not in VERIFIED_VERSIONS:
        raise UsageError(f"FlashInfer {v} is not a version this front end knows; it knows: "
                         f"{', '.join(VERIFIED_VERSIONS)}",
                         hint="install a known version (`pip install flashinfer-python==" + VERIFIED_VERSIONS[-1]
                              + "`), or use `jitkiln flashinfer cc` as FLASHINFER_NVCC_LAUNCHER, which works for "
                                "any version and module")
    return v


def module_arch(arch: str | None) -> str:
    a = (arch or "sm_90a").strip().lower()
    if a not in ARCHES:
        raise UsageError(f"arch {arch!r} is not one this front end builds FlashInfer's cutlass fused MoE for; "
                         "it builds fused_moe_90 for sm_90a (H100, H200)",
                         hint="give --arch sm_90a, or build other architectures with FlashInfer's own JIT "
                              "(optionally through `jitkiln flashinfer cc`)")
    return ARCHES[a]


def package_dir() -> Path:
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("FlashInfer is not installed (no module named 'flashinfer')", hint=INSTALL_HINT)
    return Path(list(spec.submodule_search_locations)[0])


def aot_path(module_name: str) -> Path:
    """Where FlashInfer's loader looks first for a prebuilt module (``jit/env.py``, ``FLASHINFER_AOT_DIR``)."""
    return package_dir() / "data" / "aot" / module_name / f"{module_name}.so"


# --- build.ninja ------------------------------------------------------------------------------------------
@dataclass
class Edge:
    out: str
    rule: str
    inputs: list[str]
    argv: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.inputs[0]


@dataclass
class Ninja:
    vars: dict[str, str]
    rules: dict[str, dict[str, str]]
    edges: list[Edge]


def _logical_lines(text: str) -> list[str]:
    out, cur = [], ""
    for line in text.splitlines():
        if line.endswith("$") and not line.endswith("$$"):
            cur += line[:-1]
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def _split_paths(s: str) -> list[str]:
    return [re.sub(r"\$([ :$])", r"\1", p) for p in re.split(r"(?<!\$) +", s.strip()) if p]


def expand(template: str, env: dict[str, str], depth: int = 0) -> str:
    if depth > 8:
        return template

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return expand(env.get(name, ""), env, depth + 1)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, template)


def parse_ninja(text: str) -> Ninja:
    """The subset of ninja syntax FlashInfer writes: variables, rules, build edges; each edge's command expanded
    into an argv exactly as ninja runs it (``$in``, ``$out`` and the variables)."""
    vars_: dict[str, str] = {}
    rules: dict[str, dict[str, str]] = {}
    edges: list[Edge] = []
    rule = None
    for line in _logical_lines(text):
        if not line.strip() or line.lstrip().startswith("#"):
            rule = None if not line.startswith(" ") else rule
            continue
        if line.startswith(" ") and rule is not None:
            k, _, v = line.strip().partition("=")
            rules[rule][k.strip()] = v.strip()
            continue
        rule = None
        if line.startswith("rule "):
            rule = line.split()[1]
            rules[rule] = {}
        elif line.startswith("build "):
            lhs, _, rhs = line[6:].partition(": ")
            parts = _split_paths(rhs)
            edges.append(Edge(_split_paths(lhs)[0], parts[0], [p for p in parts[1:] if p not in ("|", "||")]))
        elif "=" in line and not line.startswith(("default", "pool", "include", "subninja")):
            k, _, v = line.partition("=")
            vars_[k.strip()] = v.strip()
    for e in edges:
        cmd = rules.get(e.rule, {}).get("command", "")
        env = dict(vars_, **{"in": " ".join(e.inputs), "out": e.out})
        e.argv = shlex.split(expand(cmd, env))
    return Ninja(vars_, rules, edges)


# --- FlashInfer's module ------------------------------------------------------------------------------------
@dataclass
class ModuleSource:
    """FlashInfer's fused MoE module as FlashInfer itself would build it."""

    name: str  # fused_moe_90
    version: str
    sources: list[str]  # absolute, FlashInfer's order
    compiles: dict[str, Edge]  # source -> its compile edge
    link: Edge
    gen_dir: str  # the generator's output folder
    csrc_dir: str
    ldflags: list[str]

    def generated(self, src: str) -> bool:
        return os.path.realpath(src).startswith(os.path.realpath(self.gen_dir) + os.sep)

    def rel(self, src: str) -> str:
        """A stable, path-free name: ``gen/...`` under the generator folder, ``csrc/...`` under FlashInfer's."""
        r = os.path.realpath(src)
        for tag, root in (("gen", self.gen_dir), ("csrc", self.csrc_dir)):
            root = os.path.realpath(root)
            if r.startswith(root + os.sep):
                return f"{tag}/{os.path.relpath(r, root)}"
        return r


@contextlib.contextmanager
def _env(**kv: str | None):
    old = {k: os.environ.get(k) for k in kv}
    try:
        for k, v in kv.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_module_source(arch: str | None = None, version: str | None = None) -> ModuleSource:
    """Run FlashInfer's own spec function (and its generator) for ``arch``; expand its ninja commands."""
    v = check_version(version)
    mod_arch = module_arch(arch)
    # FlashInfer picks target arches from the visible GPUs or FLASHINFER_CUDA_ARCH_LIST; a build machine may
    # have neither: name the arch being built for.
    arch_list = os.environ.get("FLASHINFER_CUDA_ARCH_LIST") or "9.0a"
    with _env(FLASHINFER_CUDA_ARCH_LIST=arch_list, FLASHINFER_NVCC_LAUNCHER=None, FLASHINFER_CXX_LAUNCHER=None):
        try:
            import flashinfer.jit.core as fcore
            from flashinfer.jit import env as jit_env
            from flashinfer.jit.cpp_ext import generate_ninja_build_for_op
            from flashinfer.jit.fused_moe import gen_cutlass_fused_moe_sm90_module
        except ImportError as e:
            raise UsageError(f"FlashInfer {v} is installed but does not import here: {e}", hint=INSTALL_HINT) from None
        if hasattr(fcore, "refresh_current_compilation_context"):
            fcore.refresh_current_compilation_context()
        if mod_arch != "90":  # pragma: no cover - module_arch only returns 90 today
            raise UsageError(f"no FlashInfer module known for arch {arch}")
        spec = gen_cutlass_fused_moe_sm90_module()
        text = generate_ninja_build_for_op(
            name=spec.name, sources=spec.sources, extra_cflags=spec.extra_cflags,
            extra_cuda_cflags=spec.extra_cuda_cflags, extra_ldflags=spec.extra_ldflags,
            extra_include_dirs=spec.extra_include_dirs, needs_device_linking=spec.needs_device_linking,
            embedded_cubins=None, extra_cuda_cflags_by_source=getattr(spec, "extra_cuda_cflags_by_source", None))
        gen_dir = str(jit_env.FLASHINFER_GEN_SRC_DIR / f"cutlass_instantiations/{mod_arch}")
        csrc = str(jit_env.FLASHINFER_CSRC_DIR)
    nj = parse_ninja(text)
    compiles: dict[str, Edge] = {}
    link = None
    for e in nj.edges:
        if e.rule in ("compile", "cuda_compile"):
            compiles[os.path.realpath(e.source)] = e
        elif e.rule in ("link", "nvcc_link"):
            link = e
    sources = [os.path.realpath(str(s)) for s in spec.sources]
    missing = [s for s in sources if s not in compiles]
    if link is None or missing:
        raise UsageError(f"FlashInfer {v}'s build.ninja for {spec.name} has a shape this front end does not know "
                         f"({'no link edge' if link is None else f'{len(missing)} sources without a compile edge'})")
    ld = expand(nj.vars.get("ldflags", ""), nj.vars)
    return ModuleSource(spec.name, v, sources, compiles, link, gen_dir, csrc, shlex.split(ld))
