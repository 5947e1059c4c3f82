"""Header labels: a header read by a compile is named relative to its include folder or the compiler's root
(``inc0/cute/tensor.hpp``, ``tc/include/cuda.h``), so entry keys are the same on two machines with the same
headers in different places; each label's content digest is what enters the key."""
from __future__ import annotations

import os

from . import digests
from .compilers import Compiler
from .family import CompileSpec


class HeaderLabels:
    """Maps header paths to portable labels and back, and gives a label's current content digest (each header
    read once per instance of this class: use one per batch of lookups)."""

    def __init__(self, spec: CompileSpec, compiler: Compiler | None):
        roots = [(f"inc{i}", os.path.realpath(d)) for i, d in enumerate(spec.include_dirs)]
        root = compiler.root if compiler is not None else None
        if root:
            roots.append(("tc", os.path.realpath(root)))
        self.roots = sorted(roots, key=lambda r: -len(r[1]))
        self._memo: dict[str, str | None] = {}

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
        if label not in self._memo:
            self._memo[label] = digests.digest(self.path(label))
        return self._memo[label]

    def digests_of(self, paths, source: str) -> dict[str, str]:
        """{label: content digest} of the files a compile read, the unit's own source left out."""
        src = os.path.realpath(source)
        return {self.label(p): digests.file_digest(p) for p in paths if os.path.realpath(p) != src}
