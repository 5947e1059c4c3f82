"""jitkiln's front end for AITER (see docs/aiter.md).

One line makes AITER build or load jitkiln's reduced CK two-stage MoE module for the planned shapes, under its own
module name (``<AITER's md_name>_jk<key12>``)::

    import aiter, jitkiln.aiter; jitkiln.aiter.enable(model="kimi-k2", tp=4, tokens="1-8192", arch="gfx950")

or, with the plan in a file, ``JITKILN_AITER_PLAN=plan.json`` and ``jitkiln.aiter.enable()``.
"""
from .hook import ENV_PLAN, ENV_POLICY, CallShape, current, disable, enable, status  # noqa: F401
from .planner import POLICIES, AiterCK2Stages, Spec  # noqa: F401
from .tree import AiterHookError, resolve_arch  # noqa: F401
