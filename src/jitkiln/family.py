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
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from .errors import UsageError

Problem = Mapping[str, Any]
"""A problem is a flat mapping of shape keys (declared by the family) to values."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_hex(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


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
    """How a family's units are compiled. ``toolchain`` names the adapter (``nvcc`` or ``hip``)."""

    toolchain: str = "nvcc"
    arch: str = "sm_90a"
    flags: tuple[str, ...] = ()
    include_dirs: tuple[str, ...] = ()
    artifact: str = "so"  # a shared object loaded with ctypes

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ShapeKey:
    name: str
    type: type = int
    doc: str = ""


class Family(ABC):
    """A kernel family. Subclasses are registered with :func:`register`."""

    name: ClassVar[str]
    doc: ClassVar[str] = ""
    shape_keys: ClassVar[tuple[ShapeKey, ...]] = ()
    abi: ClassVar[CAbi] = CAbi()

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
        """Family-wide options from the command line (e.g. ``aiter_root`` for ck2stages). Families with none
        refuse any option but ``arch``, which :meth:`compile_spec` takes per call."""
        if options:
            raise UsageError(f"family {self.name!r} takes no option {', '.join('--' + k.replace('_', '-') for k in options)}")
        return self

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
            try:
                out[k] = known[k].type(v)
            except (TypeError, ValueError):
                raise UsageError(f"shape key {k}={v!r} is not a valid {known[k].type.__name__}") from None
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
    """Register a family class (instantiated lazily) under its ``name``."""
    _REGISTRY[cls_or_obj.name] = cls_or_obj
    return cls_or_obj


BUILTIN = ("demo", "moe2stage", "ck2stages")


def _import_builtin(name: str) -> None:
    # Importing a built-in family's module registers it; each import is cheap (no toolchain, no torch).
    if name in BUILTIN and name not in _REGISTRY:
        __import__(f"jitkiln.families.{name}")


def get_family(name: str) -> Family:
    _import_builtin(name)
    if name not in _REGISTRY:
        raise UsageError(f"unknown family {name!r}; known families: {', '.join(family_names())}")
    f = _REGISTRY[name]
    if isinstance(f, type):
        f = f()
        _REGISTRY[name] = f
    return f


def family_names() -> list[str]:
    for n in BUILTIN:
        try:
            _import_builtin(n)
        except ImportError:
            pass  # listed by `jitkiln doctor` as unavailable
    return sorted(set(_REGISTRY) | {n for n in BUILTIN if n in _REGISTRY})


def unique(instances: Iterable[Instance]) -> list[Instance]:
    seen: dict[str, Instance] = {}
    for i in instances:
        seen.setdefault(i.digest, i)
    return list(seen.values())
