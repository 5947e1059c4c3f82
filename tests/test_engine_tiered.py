"""Tiered start: calls are served by tier 0 while the tuned instances compile, and switch all at once.

CPU-only: the 'calls' resolve the problem and record what they would run; a fake slow compiler (a wrapper
that sleeps before running the real nvcc) keeps the build going long enough to observe many calls.
"""
import threading
import time

from conftest import make_wrapper
from jitkiln.families.demo import TILES, Demo, DemoGemm
from jitkiln.plan import make_plan
from jitkiln.runtime import Module
from jitkiln.store import Store


class TwoSlot(Demo):
    """A problem needs two instances (like MoE's stage 1 and stage 2); tier 0 is a host function."""

    name = "demo_two_slot"

    def select(self, variant, problem):
        small = "skinny" if problem["m"] <= 16 else "medium"
        return {"first": DemoGemm(variant, *TILES[small]), "second": DemoGemm(variant, *TILES["large"])}

    def fallback(self, variant, problem):
        def tier0(*args):
            return ("tier0", args)
        return tier0


def test_switch_is_all_or_nothing_and_monotonic(cache_dir, tmp_path, monkeypatch):
    slow = make_wrapper(tmp_path / "nvcc", tmp_path / "calls.log",
                        before='[ "$1" != "--version" ] && sleep 2')
    monkeypatch.setenv("JITKILN_NVCC", str(slow))
    fam = TwoSlot()
    problem = {"m": 8, "n": 64, "k": 64}
    plan = make_plan(fam, "f32", [problem])
    assert len(plan.units) == 2
    mod = Module(plan, Store(), policy="tiered")
    assert mod.load_available() == 0

    seen = {}  # per caller thread: the tier of each call, in order
    stop = threading.Event()
    errors = []

    def caller():
        mine = seen.setdefault(threading.get_ident(), [])
        while not stop.is_set():
            r = mod.resolve(problem)
            if r.tier == 1:
                # tier 1 only with every slot present and callable with its ABI set
                if set(r.fns) != {"first", "second"} or any(not f.argtypes for f in r.fns.values()):
                    errors.append(("half-done tier 1", r))
            else:
                if r.fallback is None or r.fallback(1)[0] != "tier0":
                    errors.append(("bad tier 0", r))
            mine.append(r.tier)
            time.sleep(0.001)

    t0 = time.monotonic()
    first = mod.resolve(problem)
    first_call_s = time.monotonic() - t0
    assert first.tier == 0 and first_call_s < 1.0  # the first call never waits for the compiler
    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    assert mod.wait(timeout=300)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(seen) == 3
    for tiers in seen.values():
        # each caller starts on tier 0, ends on tier 1, and never goes back once it saw tier 1
        assert tiers[0] == 0 and tiers[-1] == 1
        assert all(t == 1 for t in tiers[tiers.index(1):])
    assert mod.resolve(problem).tier == 1 and mod.generation == 2
    # with the first slot loaded and the second not, the problem stays on tier 0 (checked via a fresh module)
    mod2 = Module(plan, mod.store, policy="tiered")
    u_first = plan.units[0]
    mod2.load_entry(u_first.instance, mod2.builder.lookup(plan, u_first))
    assert mod2.resolve(problem).tier == 0  # checked before the background load starts
    assert mod2.wait(timeout=120) and mod2.resolve(problem).tier == 1
