"""Kernel family API: the one place a family is declared.

A family says, once, in Python:

* what an instance is (:class:`Instance`, a frozen dataclass of template parameters),
* which instances exist for a variant (:meth:`Family.candidates`),
* which instance serves a problem (:meth:`Family.select`: the dispatch heuristic, used by both the planner
  and the runtime, so the kernel list and the dispatch can never drift apart),
* the translation-unit text of an instance (:meth:`Family.render`), exporting a C ABI launcher
  (:class:`CAbi`) and nothing that needs torch headers.

Everything downstream (plan, build, store, runtime) works on these objects only.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

from .errors import UsageError
from .keys import canonical_json, sha256_hex

Problem = Mapping[str, Any]
"""A problem is a flat mapping of shape keys (declared by the family) to values."""


@dataclass(frozen=True)
class Instance:
    """One template instantiation. Subclass per family with the template parameters as fields.

    ``name`` is stable and canonical (same parameters, same name, in every process and version);
    ``digest`` covers the family, the name and every parameter value.
    """

    family: ClassVar[str] = ""
    abi: ClassVar["CAbi | None"] = None  # this instance kind's launcher ABI; None: the family's

    @property
    def name(self) -> str:  # pragma: no cover - subclasses override
        vals = "_".join(str(v) for v in dataclasses.astuple(self))
        return f"{self.family}_{vals}"

    def params(self) -> dict[str, Any]:
        # the fields, shallowly (what dataclasses.asdict gives for plain values, without its deep copy:
        # plans build hundreds of instances, and a warm start pays for each)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @functools.cached_property
    def digest(self) -> str:  # computed once per instance (instances are immutable)
        return sha256_hex("jitkiln-instance-v1", self.family, self.name, canonical_json(self.params()))

    @property
    def symbol(self) -> str:
        """The exported C symbol of this instance's launcher (unique, so units can be packed)."""
        return f"jk_launch_{self.digest[:16]}"


@dataclass(frozen=True)
class CAbi:
    """The C ABI of a family's launcher: ``int SYMBOL(argtypes...)``, returning 0 on success.

    Every unit also exports ``const char* jk_name_<digest16>(void)``, returning the instance's canonical
    name, which the runtime checks after loading.
    """

    argtypes: tuple = ()
    restype: Any = ctypes.c_int
    doc: str = ""


@dataclass(frozen=True)
class CompileSpec:
    """How a family's units are compiled. ``toolchain`` names the compiler (:mod:`jitkiln.compilers`:
    ``nvcc``, ``hip``, ...); the field keeps its name because cache keys contain it."""

    toolchain: str = "nvcc"
    arch: str = "sm_90a"
    flags: tuple[str, ...] = ()
    include_dirs: tuple[str, ...] = ()
    artifact: str = "so"  # a shared object loaded with ctypes


@dataclass(frozen=True)
class Packer:
    """How a family puts several instances in one compile unit (see :mod:`jitkiln.pack`)."""

    render: Callable[[Sequence[Any]], "str | None"]  # units -> one TU holding every member, or None
    shared_fraction: float  # of one unit's compile time, paid once per pack
    memory_growth: float = 0.3  # each extra member adds this fraction of one unit's peak memory


@dataclass(frozen=True)
class Option:
    """A family-wide command-line option (``--aiter-root DIR``), passed to :meth:`Family.configure`."""

    flag: str
    help: str = ""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _integral(v: Any) -> bool:
    """An int (not a bool), or text spelling one: never a float (8.5 would silently plan m=8)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, str):
        t = v.strip()
        return t.lstrip("+-").isdigit() and t.isascii()
    return False


@dataclass(frozen=True)
class ShapeKey:
    name: str
    type: type = int
    doc: str = ""
    min: int | None = 1  # integer keys are sizes: at least this (None: no bound)
    max: int | None = 2**31 - 1  # ... and at most this (a size no kernel indexes with 32-bit math is a typo)


class Family(ABC):
    """A kernel family. Subclasses are registered with :func:`register`."""

    name: ClassVar[str]
    doc: ClassVar[str] = ""
    shape_keys: ClassVar[tuple[ShapeKey, ...]] = ()
    abi: ClassVar[CAbi] = CAbi()
    # --- hooks the engine calls (all optional) ---
    packer: ClassVar["Packer | None"] = None  # several instances in one compile unit (jitkiln.pack)
    options: ClassVar[tuple[Option, ...]] = ()  # family-wide command-line options, given to configure()
    full_when_no_problems: ClassVar[bool] = False  # plan the full module when no shape is given

    # --- the declaration -------------------------------------------------------------------------
    @abstractmethod
    def variants(self) -> Sequence[str]:
        """Variant names (e.g. dtypes); the first is the default."""

    @abstractmethod
    def candidates(self, variant: str) -> Sequence[Instance]:
        """Every instance a full module of this variant contains."""

    @abstractmethod
    def select(self, variant: str, problem: Problem) -> Mapping[str, Instance]:
        """The dispatch heuristic: the instance serving each slot (e.g. ``stage1``, ``stage2``) of a problem."""

    @abstractmethod
    def rule(self, variant: str, instance: Instance) -> str:
        """When :meth:`select` picks ``instance``, in words (used to explain unused candidates)."""

    @abstractmethod
    def render(self, instance: Instance) -> str:
        """Translation-unit text exporting ``instance.symbol`` with :attr:`abi` (no torch headers)."""

    @abstractmethod
    def compile_spec(self, variant: str, arch: str | None = None) -> CompileSpec:
        """Flags, include directories and target arch for this variant's units."""

    def configure(self, *, arch: str | None = None, **options: Any) -> "Family":
        """Family-wide options from the command line (:attr:`options`, e.g. ``aiter_root`` for ck2stages).
        Families with none refuse any option but ``arch``, which :meth:`compile_spec` takes per call."""
        if options:
            raise UsageError(f"family {self.name!r} takes no option {', '.join('--' + k.replace('_', '-') for k in options)}")
        return self

    def provenance(self, variant: str, problems: Sequence[Problem]) -> dict[str, str]:
        """Per planned instance name, the rule that brought it in (shown by ``plan``); empty by default."""
        return {}

    # --- problems ---------------------------------------------------------------------------------
    def default_problems(self, variant: str) -> list[Problem]:
        """Problems planned when the user names none (the full module for families that have no default)."""
        return []

    def problems(self, variant: str, *, shapes: Sequence[Problem] = (), model: str | None = None,
                 tp: int = 1, ep: int = 1, tokens: Sequence[int] | None = None) -> list[Problem]:
        """Problems from the command line's ``--shape`` / ``--model --tp --ep --tokens``."""
        if model is not None or tokens is not None:
            raise UsageError(f"family {self.name!r} takes no --model/--tokens; use --shape "
                             + ",".join(f"{k.name}=..." for k in self.shape_keys))
        if shapes:
            return [self.check_problem(p) for p in shapes]
        return self.default_problems(variant)

    def check_problem(self, problem: Problem) -> dict[str, Any]:
        known = {k.name: k for k in self.shape_keys}
        out: dict[str, Any] = {}
        for k, v in problem.items():
            if k not in known:
                raise UsageError(f"unknown shape key {k!r} for family {self.name!r}; "
                                 f"known keys: {', '.join(known) or '(none)'}")
            sk = known[k]
            if sk.type is int and not _integral(v):
                raise UsageError(f"shape key {k}={v!r} is not a valid int (an integer)")
            try:
                out[k] = sk.type(v)
            except (TypeError, ValueError, OverflowError):
                raise UsageError(f"shape key {k}={v!r} is not a valid {sk.type.__name__}") from None
            if sk.type is int and sk.min is not None and out[k] < sk.min:
                raise UsageError(f"shape key {k}={v!r} must be >= {sk.min}")
            if sk.type is int and sk.max is not None and out[k] > sk.max:
                raise UsageError(f"shape key {k}={v!r} is implausibly large (more than {sk.max})")
        missing = [k for k in known if k not in out]
        if missing:
            raise UsageError(f"shape for family {self.name!r} lacks {', '.join(missing)}; "
                             f"give --shape " + ",".join(f"{k}=..." for k in known))
        return out

    def describe_problems(self, problems: Sequence[Problem]) -> str:
        """A short summary of the planned shapes, per key (``inter_dim = 1024 for every shape``)."""
        if not problems:
            return "no shapes were planned"
        parts = []
        for key in self.shape_keys:
            vals = sorted({p[key.name] for p in problems if key.name in p})
            if not vals:
                continue
            if len(vals) == 1:
                parts.append(f"{key.name} = {vals[0]} for every shape")
            elif len(vals) <= 4:
                parts.append(f"{key.name} in {{{', '.join(map(str, vals))}}}")
            else:
                parts.append(f"{key.name} in {vals[0]}..{vals[-1]} ({len(vals)} values)")
        return "; ".join(parts)

    def check_buildable(self, spec: CompileSpec) -> None:
        """Raise (one line, and the package to install) when units of ``spec`` cannot be compiled here, e.g.
        headers a build needs and planning does not. Called once before a build compiles anything."""

    # --- tier 0 ---------------------------------------------------------------------------------------
    def fallback(self, variant: str, problem: Problem):
        """A callable that serves ``problem`` correctly with nothing to compile (e.g. a library kernel the
        installed framework ships), taking the same arguments as the family's high-level call; or None.
        The runtime's ``tiered`` policy serves calls with it until every slot's tuned instance is loaded."""
        return None

    # --- build hints --------------------------------------------------------------------------------
    def cost_estimate(self, instance: Instance) -> float:
        """Expected compile seconds on one core when nothing was recorded yet."""
        return 5.0

    def memory_estimate(self, instance: Instance) -> int:
        """Expected peak compiler memory in bytes."""
        return 512 << 20

    def abi_of(self, instance: Instance) -> CAbi:
        return type(instance).abi or self.abi

    def check_variant(self, variant: str | None) -> str:
        vs = list(self.variants())
        if variant is None:
            return vs[0]
        if variant not in vs:
            raise UsageError(f"unknown variant {variant!r} for family {self.name!r}; "
                             f"choose one of: {', '.join(vs)}")
        return variant


_REGISTRY: dict[str, type[Family] | Family] = {}


def register(cls_or_obj):
    """Register a family class (instantiated lazily) or object under its ``name``. Installed families are also
    found through the ``jitkiln.families`` entry-point group (``name = "module:Class"``)."""
    _REGISTRY[cls_or_obj.name] = cls_or_obj
    return cls_or_obj


def _load_entry_point(name: str, target: str | None) -> None:
    if target and name not in _REGISTRY:
        import importlib
        mod, _, attr = target.partition(":")
        obj = getattr(importlib.import_module(mod), attr)
        _REGISTRY.setdefault(name, obj)


def get_family(name: str) -> Family:
    from .plugins import entry_points, own_entry_point
    if name not in _REGISTRY:
        _load_entry_point(name, own_entry_point("jitkiln.families", name)
                          or entry_points("jitkiln.families").get(name))
    if name not in _REGISTRY:
        raise UsageError(f"unknown family {name!r}; known families: {', '.join(family_names())}")
    f = _REGISTRY[name]
    if isinstance(f, type):
        f = f()
        _REGISTRY[name] = f
    return f


def family_names() -> list[str]:
    """Every family registered or installed (those whose import fails are left out: `jitkiln doctor` says why)."""
    from .plugins import entry_points
    for n, target in entry_points("jitkiln.families").items():
        try:
            _load_entry_point(n, target)
        except ImportError:
            pass
    return sorted(_REGISTRY)
