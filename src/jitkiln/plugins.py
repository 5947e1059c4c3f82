"""Entry points of installed packages, read once per process: how families, compilers and command-line
extensions are found without the engine naming any of them.

jitkiln's own come from its distribution's metadata (a pip install, editable or not); in a source checkout used
without installing (``PYTHONPATH=src``) they are read from ``pyproject.toml`` beside ``src/``.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _own() -> dict[str, dict[str, str]]:
    from importlib import metadata
    groups: dict[str, dict[str, str]] = {}
    try:
        eps = metadata.distribution("jitkiln").entry_points
        for ep in eps:
            groups.setdefault(ep.group, {})[ep.name] = ep.value
        return groups
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return groups
    group = None
    for line in text.splitlines():
        m = re.match(r'\s*\[project\.entry-points\."?([\w.-]+)"?\]\s*$', line)
        if m:
            group = m.group(1)
            continue
        if line.strip().startswith("["):
            group = None
            continue
        m = re.match(r'\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', line)
        if group and m:
            groups.setdefault(group, {})[m.group(1)] = m.group(2)
    return groups


@functools.lru_cache(maxsize=None)
def _others() -> dict[str, dict[str, str]]:
    from importlib import metadata
    groups: dict[str, dict[str, str]] = {}
    for dist in metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "jitkiln":
            continue
        for ep in dist.entry_points:
            if ep.group.startswith("jitkiln."):
                groups.setdefault(ep.group, {})[ep.name] = ep.value
    return groups


def entry_points(group: str, *, others: bool = True) -> dict[str, str]:
    """``name -> "module:attr"`` of ``group``: jitkiln's own, then (``others``) other installed packages'."""
    out = dict(_others().get(group, {})) if others else {}
    out.update(_own().get(group, {}))
    return out


def own_entry_point(group: str, name: str) -> str | None:
    """jitkiln's own entry point ``name`` of ``group`` (cheap: no scan of other packages)."""
    return _own().get(group, {}).get(name)
