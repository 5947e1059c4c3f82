"""Locate CUTLASS headers from the PyPI package ``nvidia-cutlass`` (never vendored)."""
from __future__ import annotations

import importlib.util
import os

from .errors import ToolchainNotFound


def cutlass_root() -> str:
    """``.../cutlass_library/source``: the CUTLASS tree the ``nvidia-cutlass`` wheel ships."""
    env = os.environ.get("JITKILN_CUTLASS_DIR")
    if env:
        root = env
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise ToolchainNotFound("CUTLASS headers not found (the nvidia-cutlass package is not installed)",
                                    hint="`pip install nvidia-cutlass==4.2.0.0` (or `pip install 'jitkiln[cutlass]'`), "
                                         "or set JITKILN_CUTLASS_DIR to a CUTLASS checkout")
        root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    if not os.path.isfile(os.path.join(root, "include", "cutlass", "cutlass.h")):
        raise ToolchainNotFound(f"no CUTLASS tree at {root} (include/cutlass/cutlass.h missing)",
                                hint="reinstall nvidia-cutlass, or point JITKILN_CUTLASS_DIR at a CUTLASS checkout")
    return root


def cutlass_include_dirs() -> list[str]:
    root = cutlass_root()
    return [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
