"""Cache keys are byte-identical across the restructuring: existing caches and signed bundles stay valid.

``data/recorded_keys.json`` was written by the code before the compilers/fleet restructuring, with a fixed
compiler fingerprint (the real one depends on the machine's compiler binaries): module keys, instance digests,
unit keys and source digests of demo, moe2stage and ck2stages plans, and an entry key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from jitkiln import plan as planmod
from jitkiln.family import get_family
from jitkiln.keys import entry_key

RECORDED = json.loads((Path(__file__).parent / "data" / "recorded_keys.json").read_text())


@pytest.fixture
def fixed_fp(monkeypatch):
    monkeypatch.setattr(planmod, "find_compiler", lambda spec, required: (None, RECORDED["fingerprint"], None))


def dump(plan):
    return {"module_key": plan.module_key,
            "units": [[u.instance.name, u.instance.digest, u.ukey, hashlib.sha256(u.source.encode()).hexdigest()]
                      for u in plan.units]}


def test_demo_and_moe2stage_keys_unchanged(fixed_fp):
    from jitkiln.families.moe2stage import MoEShape
    demo = get_family("demo")
    assert dump(planmod.make_plan(demo, "f32", demo.default_problems("f32"))) == RECORDED["demo/f32"]
    assert dump(planmod.make_plan(demo, "f64", [], full=True)) == RECORDED["demo/f64/full"]
    moe = get_family("moe2stage")
    sh = MoEShape.from_hf_config("deepseek-v3", tp=8)
    for v in ("bf16", "fp8", "fp8b128"):
        got = dump(planmod.make_plan(moe, v, [sh.problem(t) for t in (1, 16, 64, 512, 4096)]))
        full = dump(planmod.make_plan(moe, v, [], full=True))
        if v in ("bf16", "fp8"):  # they gained the weight-stream (GEMV) units: every CUTLASS unit is byte-identical
            # bf16 no longer selects the 128x128 cooperative tile (the 64-row tiles serve up to 128 rows per expert)
            # and gained the 64x256 ping-pong tile (new units, new names: no recorded key to keep)
            dropped = {f"moe2stage_s{s}_bf16_128x128x64_cooperative_c1x1" for s in (1, 2)} if v == "bf16" else set()
            added = {f"moe2stage_s{s}_bf16_64x256x64_pingpong_c1x1" for s in (1, 2)} if v == "bf16" else set()
            assert_cutlass_units_unchanged(got, RECORDED[f"moe2stage/{v}/deepseek-v3-tp8"], added=added)
            assert_cutlass_units_unchanged(full, RECORDED[f"moe2stage/{v}/full"], all_kept=True, dropped=dropped,
                                           added=added)
            continue
        assert got == RECORDED[f"moe2stage/{v}/deepseek-v3-tp8"], v
        assert full == RECORDED[f"moe2stage/{v}/full"], v


def assert_cutlass_units_unchanged(got, rec, all_kept=False, dropped=frozenset(), added=frozenset()):
    """Units other than the GEMV ones and the ``added`` tiles are recorded units, unchanged (name, digest, unit
    key, source digest); ``all_kept``: every recorded unit but the ``dropped`` ones is still planned."""
    recorded = {u[0]: u for u in rec["units"]}
    assert not set(added) & set(recorded)
    mine = [u for u in got["units"] if "_gemv_" not in u[0] and u[0] not in added]
    assert len(mine) < len(got["units"])  # the weight-stream units were planned
    for u in mine:
        assert recorded.get(u[0]) == u, u[0]
    if all_kept:
        assert dropped <= set(recorded)
        assert {u[0] for u in mine} == set(recorded) - set(dropped)


def test_ck2stages_keys_unchanged(fixed_fp):
    pytest.importorskip("aiter_meta", reason="amd-aiter (AITER's sources) is not installed")
    ck = get_family("ck2stages")
    ck.configure(arch="gfx950")
    got = dump(planmod.make_plan(ck, "a4w4", [{"inter_dim": 1024, "block_m": 128}], arch="gfx950"))
    assert got == RECORDED["ck2stages/a4w4/gfx950/kimi"]
    assert dump(planmod.make_plan(ck, "a4w4", [], arch="gfx950", full=True)) == RECORDED["ck2stages/a4w4/gfx950/full"]
    ck.configure(arch="gfx942")
    assert dump(planmod.make_plan(ck, "a8w8", [], arch="gfx942", full=True)) == RECORDED["ck2stages/a8w8/gfx942/full"]


def test_entry_key_unchanged():
    deps = {"inc0/cute/tensor.hpp": "b" * 64, "tc/include/cuda.h": "c" * 64}
    assert entry_key("a" * 64, deps) == RECORDED["entry_key"]
