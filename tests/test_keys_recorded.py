"""Cache keys are byte-identical across the restructuring: existing caches and signed bundles stay valid.

``data/recorded_keys.json`` was written by the code before the compilers/fleet restructuring, with a fixed
compiler fingerprint (the real one depends on the machine's compiler binaries): module keys, instance digests,
unit keys and source digests of demo, moe2stage and ck2stages plans, and an entry key.

The moe2stage entries were written again (same fingerprint, same plans) when the kernels' text changed on purpose:
on 2026-11-30 every CUTLASS unit's stage-1 routing and GEMM setup became one launch (the shared setup and scan
code changed stage 2's text too) and the tile sets moved (fp8's 64x256 tile, the 128x192 stage-1 tile), after the
weight-stream units and the 64x256 tile had been added, and again when the swapped-operand tiles joined (same day:
new units only; every other unit's key is unchanged); the demo, ck2stages and entry-key records are still the
pre-restructuring ones.
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
        assert got == RECORDED[f"moe2stage/{v}/deepseek-v3-tp8"], v
        assert full == RECORDED[f"moe2stage/{v}/full"], v


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
