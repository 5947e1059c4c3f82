"""jitkiln: plan exactly the kernel instances a deployment's shapes need, build each once, cache and load them.

Data flows one way: shapes -> plan (:mod:`jitkiln.plan`) -> build (:mod:`jitkiln.build`) -> store
(:mod:`jitkiln.store`) -> load and dispatch (:mod:`jitkiln.runtime`).
"""
__version__ = "0.1.0"

from .errors import JitkilnError  # noqa: F401
from .family import Family, Instance, get_family, register  # noqa: F401
