"""Compilers, by name: a lazy registry (``name -> "module:Class"``), extended by other packages through the
``jitkiln.compilers`` entry-point group or :func:`register`.

Adding a compiler is one file (a :class:`~jitkiln.compilers.base.Compiler` subclass) plus one line here or one
entry point.
"""
from __future__ import annotations

import importlib

from ..errors import UsageError
from .base import CompileJob, CompileResult, Compiler

BUILTIN: dict[str, str] = {
    "nvcc": "jitkiln.compilers.nvcc:Nvcc",
    "hip": "jitkiln.compilers.hipcc:Hipcc",
    "fake": "jitkiln.compilers.fake:FakeCompiler",
    "cutedsl": "jitkiln.compilers.cutedsl:CuteDsl",
}
_extra: dict[str, "str | type[Compiler]"] = {}


def register(name: str, target: "str | type[Compiler]") -> None:
    """Make compiler ``name`` available: a class, or ``"module:Class"`` imported on first use."""
    _extra[name] = target


def _entry_points() -> dict[str, str]:
    from ..plugins import entry_points
    return entry_points("jitkiln.compilers")


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_extra) | set(_entry_points()))


def compiler_class(name: str) -> type[Compiler]:
    target = _extra.get(name) or BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise UsageError(f"unknown compiler {name!r}; known: {', '.join(names())}")
    if isinstance(target, str):
        mod, _, cls = target.partition(":")
        target = getattr(importlib.import_module(mod), cls)
    return target


def get_compiler(name: str) -> Compiler:
    """The compiler ``name`` as found on this machine (raises ToolchainNotFound with what to do)."""
    return compiler_class(name).find()


__all__ = ["BUILTIN", "CompileJob", "CompileResult", "Compiler", "compiler_class", "get_compiler", "names",
           "register"]
