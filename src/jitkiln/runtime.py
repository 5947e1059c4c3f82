"""Runtime: load verified artifacts through ctypes and dispatch with the family's own heuristic.

Why ctypes and not TVM-FFI or a torch extension: every unit exports a plain C function taking raw pointers,
sizes and a stream, so the loader needs nothing but ``dlopen``; no unit compiles torch or FFI headers (that
costs ~20 s per unit upstream), torch stays optional, and the same artifact serves any Python framework.
The price, a few microseconds of ctypes call overhead, is paid once per launch and vanishes in a CUDA graph.

Artifacts are loaded from the very bytes whose digest was checked (copied to an anonymous memfd and
``dlopen``-ed from there), so a file swapped after the check can never be loaded.

Policies for a problem whose instance is not loaded:

* ``error`` (default): raise :class:`~jitkiln.errors.MissingInstance` naming the instance, why it is missing
  and the command that builds it;
* ``compile``: build that instance now (once, even across processes), load it, and go on;
* ``background``: build the rest of the plan in a background thread; block only on the instance needed;
* ``tiered``: never block: while the instances a problem needs are not all loaded, :meth:`Module.resolve`
  returns the family's tier-0 fallback (something that needs no long compile) and the plan builds in the
  background; the moment every slot of the problem is loaded, calls switch to the tuned instances.

The switch is all-or-nothing per problem and never observed half-done: a launcher becomes visible (one dict
assignment) only after its library is loaded, checked and its ABI set, and a problem resolves to tier 1 only
when every one of its slots is visible. ``Module.generation`` counts switches, for callers that captured a CUDA
graph on tier 0 and recapture when it changes.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from . import digests
from .build import Builder
from .errors import CorruptEntry, MissingInstance, UsageError
from .family import Family, Instance, Problem, get_family
from .headers import HeaderLabels
from .plan import Plan, Unit, make_plan
from .store import Entry, Store

POLICIES = ("error", "compile", "background", "tiered")


def dlopen_bytes(data: bytes, label: str) -> ctypes.CDLL:
    """dlopen exactly these bytes, through an anonymous memfd.

    The memfd stays open for the life of the process: the dynamic loader matches libraries by path, and a
    reused ``/proc/self/fd/N`` path would hand back the library loaded earlier under that number.
    """
    fd = os.memfd_create(f"jitkiln-{label}"[:240], os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return ctypes.CDLL(f"/proc/self/fd/{fd}", mode=os.RTLD_NOW | os.RTLD_LOCAL)
    except BaseException:
        os.close(fd)
        raise


@dataclass(frozen=True)
class Resolution:
    """How one problem is served now: tier 1 (``fns``: the tuned launcher of every slot) or tier 0
    (``fallback``: the family's no-compile path)."""

    tier: int
    fns: Mapping[str, Any]
    fallback: Callable | None
    generation: int


class Module:
    """A planned module whose instances are loaded as they become available."""

    def __init__(self, plan: Plan, store: Store | None = None, policy: str = "error",
                 builder: Builder | None = None):
        if policy not in POLICIES:
            raise UsageError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.plan = plan
        self.family: Family = plan.family
        self.variant = plan.variant
        self.store = store or Store()
        self.policy = policy
        self.builder = builder or Builder(self.store, progress=False)
        self._fns: dict[str, Any] = {}
        self._libs: list[ctypes.CDLL] = []
        self._lock = threading.RLock()
        self._bg: threading.Thread | None = None
        self._bg_error: BaseException | None = None
        self.generation = 0  # bumped after each instance becomes visible
        self.records: list = []  # build records of the builds this module ran (background, on demand)
        self.load_errors: dict[str, str] = {}  # instance digest -> why its cached artifact did not load
        self._extra: dict[str, threading.Thread] = {}

    @property
    def tier0_serves(self) -> bool:
        """Policy ``tiered`` and the family's tier 0 serves every planned problem: calls are correct before
        any instance is loaded, so the background build may pack urgent units too (full speed sooner)."""
        return self.policy == "tiered" and all(self.family.fallback(self.variant, p) is not None
                                               for p in self.plan.problems)

    # --- loading -------------------------------------------------------------------------------------
    def load_entry(self, instance: Instance, entry: Entry) -> Any:
        """Load one verified entry and publish its launcher (atomically: a dict assignment)."""
        with self._lock:
            if instance.digest in self._fns:
                return self._fns[instance.digest]
            data = self.store.read_verified(entry)
            lib = dlopen_bytes(data, instance.name)
            try:
                name_fn = getattr(lib, f"jk_name_{instance.digest[:16]}")
                fn = getattr(lib, instance.symbol)
            except AttributeError:
                raise CorruptEntry(f"artifact of {instance.name} lacks its exported symbols",
                                   hint="delete the entry (`jitkiln cache gc`) and rebuild") from None
            name_fn.restype = ctypes.c_char_p
            got = name_fn().decode()
            if got != instance.name:
                raise CorruptEntry(f"artifact loaded for {instance.name} says it is {got}")
            abi = self.family.abi_of(instance)
            fn.argtypes = list(abi.argtypes)
            fn.restype = abi.restype
            self._libs.append(lib)
            self._fns[instance.digest] = fn  # the switch: one assignment, after everything is ready
            self.generation += 1
        return fn

    def load_available(self) -> int:
        """Load every planned unit the cache already has; return how many are loaded."""
        labels = HeaderLabels(self.plan.spec, self.plan.compiler)
        for u in self.plan.units:
            if u.instance.digest in self._fns:
                continue
            e = self.builder.lookup(self.plan, u, labels)
            if e is not None:
                try:
                    self.load_entry(u.instance, e)
                except CorruptEntry as err:
                    self.load_errors[u.instance.digest] = err.reason  # said by missing(), if it is needed
        digests.flush()
        return len(self._fns)

    def is_loaded(self, instance: Instance) -> bool:
        return instance.digest in self._fns

    @property
    def ready(self) -> bool:
        return all(u.instance.digest in self._fns for u in self.plan.units)

    # --- dispatch ------------------------------------------------------------------------------------
    def dispatch(self, problem: Problem) -> dict[str, Any]:
        """The launcher of every slot of ``problem``, chosen by the family's heuristic."""
        sel = self.family.select(self.variant, problem)
        return {slot: self.launcher(inst, problem) for slot, inst in sel.items()}

    def resolve(self, problem: Problem) -> Resolution:
        """Tier 1 if every slot's instance is loaded, else (policy ``tiered``, family with a fallback) tier 0
        while the missing instances build in the background; other policies behave as :meth:`dispatch`."""
        sel = self.family.select(self.variant, problem)
        gen = self.generation
        fns = {}
        for slot, inst in sel.items():
            fn = self._fns.get(inst.digest)
            if fn is None:
                break
            fns[slot] = fn
        else:
            return Resolution(1, fns, None, gen)
        fb = self.family.fallback(self.variant, problem) if self.policy == "tiered" else None
        if fb is None:
            return Resolution(1, self.dispatch(problem), None, self.generation)
        self.start_background()
        for inst in sel.values():
            if inst.digest not in self._fns and self.plan.unit_for(inst) is None:
                self._build_extra(inst)
        return Resolution(0, {}, fb, gen)

    def _build_extra(self, instance: Instance) -> None:
        """Build an instance outside the plan in the background (tiered policy)."""
        with self._lock:
            if instance.digest in self._extra:
                return
            unit = self._extra_unit(instance)

            def run() -> None:
                try:
                    self.records.append(Builder(
                        self.store, jobs=1, progress=False, executor=self.builder.executor,
                        on_ready=lambda u, e: self.load_entry(u.instance, e)).build(self.plan, [unit]))
                except BaseException as e:  # noqa: BLE001 - surfaced by wait()
                    self._bg_error = e

            t = threading.Thread(target=run, name=f"jitkiln-extra-{instance.name}", daemon=True)
            self._extra[instance.digest] = t
            t.start()

    def launcher(self, instance: Instance, problem: Problem | None = None) -> Any:
        fn = self._fns.get(instance.digest)
        if fn is not None:
            return fn
        if self.policy == "error":
            raise self.missing(instance, problem)
        unit = self.plan.unit_for(instance) or self._extra_unit(instance)
        if self.policy in ("background", "tiered"):
            self.start_background()
        with self._lock:
            fn = self._fns.get(instance.digest)
        if fn is not None:
            return fn
        rec = self.builder.build(self.plan, [unit])
        self.records.append(rec)
        entry = self.store.get(rec.units[0].key)
        if entry is None:  # pragma: no cover - just published
            raise MissingInstance(f"{instance.name} was built but cannot be read back from the cache")
        return self.load_entry(instance, entry)

    def _extra_unit(self, instance: Instance) -> Unit:
        return self.plan.unit(instance, why="outside the plan: built on demand", urgent=True)

    def missing(self, instance: Instance, problem: Problem | None) -> MissingInstance:
        planned = self.plan.unit_for(instance) is not None
        fam, var = self.family.name, self.variant
        shape = ",".join(f"{k}={v}" for k, v in (problem or {}).items() if not isinstance(v, (list, dict)))
        cmd = f"jitkiln build {fam} --variant {var}" + (f" --shape {shape}" if shape else "")
        if instance.digest in self.load_errors:
            why = f"its cached artifact did not load: {self.load_errors[instance.digest]}"
        elif planned:
            why = "it is planned but not built yet"
        else:
            why = (f"this {'full' if self.plan.full else 'reduced'} module was planned for "
                   f"{self.family.describe_problems(self.plan.problems)}, and dispatch picks {instance.name} "
                   f"for {problem}: {self.family.rule(var, instance)}")
        return MissingInstance(
            f"instance {instance.name} is not loaded: {why}",
            hint=f"build it with `{cmd}`, or load the module with policy "
                 f"'compile' (build on demand) or 'background'")

    # --- background ----------------------------------------------------------------------------------
    def start_background(self) -> threading.Thread:
        """Build every planned unit not loaded yet in a background thread, loading each as it lands."""
        with self._lock:
            if self._bg is not None:
                return self._bg

            def run() -> None:
                try:
                    todo = [u for u in self.plan.units if u.instance.digest not in self._fns]
                    bld = Builder(self.store, jobs=self.builder.jobs, progress=False,
                                  on_ready=lambda u, e: self.load_entry(u.instance, e),
                                  executor=self.builder.executor, urgent_served=self.tier0_serves)
                    self.records.append(bld.build(self.plan, todo))
                except BaseException as e:  # noqa: BLE001 - surfaced by wait()
                    self._bg_error = e

            self._bg = threading.Thread(target=run, name="jitkiln-background-build", daemon=True)
            self._bg.start()
            return self._bg

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background build; re-raise its error. True when every planned unit is loaded."""
        for t in [self._bg, *self._extra.values()]:
            if t is not None:
                t.join(timeout)
        if self._bg_error is not None:
            raise self._bg_error
        return self.ready


def load(family: str | Family, variant: str | None = None, problems: Sequence[Problem] | None = None, *,
         policy: str = "error", store: Store | None = None, build: bool = True, jobs: int | None = None,
         arch: str | None = None, full: bool = False, progress: bool = False) -> Module:
    """Plan, build what the cache lacks (unless ``build=False``), and load a module.

    With ``policy='background'`` or ``'tiered'`` and ``build=True`` the build runs in the background and this returns at
    once with whatever the cache already had loaded.
    """
    fam = get_family(family) if isinstance(family, str) else family
    variant = fam.check_variant(variant)
    probs = list(problems) if problems is not None else fam.default_problems(variant)
    plan = make_plan(fam, variant, probs, arch=arch, full=full)
    store = store or Store()
    builder = Builder(store, jobs=jobs, progress=progress)
    mod = Module(plan, store, policy, builder)
    if build and policy not in ("background", "tiered"):
        builder.on_ready = lambda u, e: mod.load_entry(u.instance, e)  # load hits as the build finds them
        mod.records.append(builder.build(plan))
        builder.on_ready = None
    mod.load_available()
    if build and policy in ("background", "tiered") and not mod.ready:
        mod.start_background()
    return mod
