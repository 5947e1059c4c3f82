"""Cheaper compiles: the nvcc pipeline (same bytes) and packing (cost model, recorded reason, same SASS).

Real nvcc compiles of the demo family; CPU only.
"""
import ctypes
import json
import os
import sys
from pathlib import Path

import pytest

from jitkiln import pack
from jitkiln.build import Builder, compile_unit
from jitkiln.compilers.nvcc_pipeline import should_pipeline
from jitkiln.headers import HeaderLabels
from jitkiln.family import get_family
from jitkiln.plan import make_plan
from jitkiln.runtime import Module
from jitkiln.store import Store
from jitkiln.compilers.nvcc import Nvcc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sass_diff  # noqa: E402

DEMO = get_family("demo")
THREE = DEMO.default_problems("f32")  # 3 units: one urgent (skinny), two not


def _unit(name: str):
    plan = make_plan(DEMO, "f32", THREE)
    return plan, next(u for u in plan.units if u.instance.name == name)


def test_pipelined_compile_is_byte_identical_to_nvcc(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    plan, u = _unit("demo_gemm_f32_32x32x16_t2x2")
    tc = Nvcc.find()
    labels = HeaderLabels(plan.spec, tc)
    r_seq, data_seq, deps_seq = compile_unit(plan.spec, tc, labels, u.instance.name, u.source, u.ukey)
    r_pip, data_pip, deps_pip = compile_unit(plan.spec, tc, labels, u.instance.name, u.source, u.ukey,
                                             spare_cores=1)
    assert "(pipelined)" in r_pip.command and "(pipelined)" not in r_seq.command
    assert data_pip == data_seq  # the same commands, run as a graph: the same artifact bytes
    assert deps_pip == deps_seq  # the same headers (host + device preprocessors), so the same entry key
    for phase in ("cicc", "cudafe++", "ptxas", "gcc (compiling)"):
        assert r_pip.phases.get(phase, 0) > 0, r_pip.phases


def test_pipeline_compile_error_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    plan, u = _unit("demo_gemm_f32_32x32x16_t2x2")
    tc = Nvcc.find()
    from jitkiln.errors import CompileError
    with pytest.raises(CompileError) as ei:
        compile_unit(plan.spec, tc, HeaderLabels(plan.spec, tc), "broken", u.source + "\nint x = ;\n", "broken0",
                     spare_cores=1)
    assert "error" in ei.value.details


def test_pipeline_choice(monkeypatch):
    # the builder gives the cores that would idle: min(jobs, cores) - (units running + units waiting)
    monkeypatch.delenv("JITKILN_NVCC_PIPELINE", raising=False)
    assert should_pipeline(2 - 1 - 0)  # a spare core: host front end beside device
    assert not should_pipeline(2 - 2 - 0)
    assert not should_pipeline(2 - 1 - 5)  # the core is better spent on another unit
    assert should_pipeline(16 - 6 - 0)
    monkeypatch.setenv("JITKILN_NVCC_PIPELINE", "0")
    assert not should_pipeline(16 - 1 - 0)


def _fake(n, cost=34.0, urgent=0, mem=3 << 30):
    plan = make_plan(DEMO, "f32", THREE)
    base = plan.units[0]
    units = []
    for i in range(n):
        u = type(base)(instance=base.instance, source=base.source, ukey=f"k{i}", urgent=i < urgent)
        units.append((u, cost, mem))
    return units


def test_packing_cost_model():
    # plenty of cores: the critical path matters, every unit separately
    c = pack.choose(get_family("moe2stage").packer, _fake(6), cores=16, mem_avail=100 << 30)
    assert all(len(g) == 1 for g in c.groups) and "<= 16 cores" in c.reason
    # few cores: total work matters; 6 x 34 s on 2 cores = 102 s, two packs of 3 ~ 54 s
    c = pack.choose(get_family("moe2stage").packer, _fake(6), cores=2, mem_avail=100 << 30)
    assert sorted(len(g) for g in c.groups) == [3, 3]
    assert c.estimate_packed_s < 0.6 * c.estimate_separate_s and "packed as 3+3" in c.reason
    # urgent units are never packed (they are needed first)
    c = pack.choose(get_family("moe2stage").packer, _fake(6, urgent=2), cores=2, mem_avail=100 << 30)
    assert [len(g) for g in c.groups][:2] == [1, 1] and "2 urgent units separately" in c.reason
    # ... unless a tier 0 serves the calls meanwhile: then every unit may join a pack
    c = pack.choose(get_family("moe2stage").packer, _fake(6, urgent=2), cores=2, mem_avail=100 << 30, urgent_served=True)
    assert sorted(len(g) for g in c.groups) == [3, 3] and "urgent ones too" in c.reason
    assert "separately\"" not in c.reason and "urgent units separately" not in c.reason
    # memory bounds the packs
    c = pack.choose(get_family("moe2stage").packer, _fake(6), cores=2, mem_avail=7 << 30)
    assert all(len(g) == 1 for g in c.groups) or max(len(g) for g in c.groups) <= 2
    # a family without a packer, or packing off
    assert "no packer" in pack.choose(get_family("ck2stages").packer, _fake(6), cores=1, mem_avail=100 << 30).reason
    assert "disabled" in pack.choose(get_family("demo").packer, _fake(6), 1, 100 << 30, enabled=False).reason
    assert pack.makespan([3, 3, 2, 2, 2], 2) == 7  # longest first, as the Builder runs them
    assert pack.pack_cost([10, 10], 0.7) == pytest.approx(13)


def _build_three(jobs: int, **kw):
    """Build the demo family's 3-unit plan from an empty cache; (store, plan, the build record's JSON)."""
    store = Store()
    plan = make_plan(DEMO, "f32", THREE)
    rec = Builder(store, jobs=jobs, progress=False, **kw).build(plan)
    return store, plan, json.loads(rec.path.read_text())


def test_builder_packs_when_cores_are_few_and_records_why(cache_dir, monkeypatch):
    monkeypatch.delenv("JITKILN_PACK", raising=False)
    store, plan, j = _build_three(1)
    p = j["packing"]
    assert len(p["packs"]) == 1 and sorted(p["packs"][0]) == ["demo_gemm_f32_32x32x16_t2x2",
                                                               "demo_gemm_f32_64x64x8_t4x4"]
    assert "1 cores" in p["reason"] and "urgent units separately" in p["reason"]
    units = {u["name"]: u for u in j["units"]}
    assert units["demo_gemm_f32_8x64x16_t1x2"]["pack"] == ""  # urgent: alone
    packed = [u for u in j["units"] if u["pack"]]
    assert len(packed) == 2 and len({u["pack"] for u in packed}) == 1 and all(u["status"] == "compiled"
                                                                              for u in packed)
    assert j["compile_s_sum"] == pytest.approx(units["demo_gemm_f32_8x64x16_t1x2"]["seconds"]
                                               + packed[0]["seconds"], abs=0.01)
    # every member's entry holds its own C ABI symbol; a warm build compiles nothing
    for u in plan.units:
        e = Builder(store, jobs=1, progress=False).lookup(plan, u)
        assert e is not None
        lib = ctypes.CDLL(str(store.obj_dir(e.key) / "artifact"))
        assert getattr(lib, u.instance.symbol) is not None
        meta = json.loads((store.obj_dir(e.key) / "meta.json").read_text())
        assert ("packed" in meta) == (u.instance.name != "demo_gemm_f32_8x64x16_t1x2")
    again = Builder(store, jobs=1, progress=False).build(plan)
    assert again.compiled == [] and len(again.hits) == 3
    mod = Module(plan, store, policy="error")
    assert mod.load_available() == 3 and mod.ready


def test_builder_packs_urgent_units_when_a_tier0_serves(cache_dir, monkeypatch):
    monkeypatch.delenv("JITKILN_PACK", raising=False)
    store, plan, j = _build_three(1, urgent_served=True)
    assert len(j["packing"]["packs"]) == 1 and len(j["packing"]["packs"][0]) == 3
    assert "urgent ones too" in j["packing"]["reason"]
    assert all(u["pack"] and u["status"] == "compiled" for u in j["units"])
    assert Module(plan, store, policy="error").load_available() == 3
    # the runtime asks for it only where calls have a tier 0: demo has no fallback
    assert not Module(plan, store, policy="tiered").tier0_serves


def test_builder_does_not_pack_with_plenty_of_cores(cache_dir, monkeypatch):
    monkeypatch.delenv("JITKILN_NVCC_PIPELINE", raising=False)
    store, plan, j = _build_three(4)
    assert j["packing"]["packs"] == [] and "<= 4 cores" in j["packing"]["reason"]
    assert all(u["pack"] == "" and u["mode"] in ("pipelined", "sequential") for u in j["units"])
    assert "min(jobs, cores)" in j["compiler_policy"]
    # one unit to build and a spare core: it compiles pipelined, and loads
    one = make_plan(DEMO, "f64", [{"m": 8, "n": 64, "k": 64}])
    rec = Builder(store, jobs=4, progress=False).build(one)
    if os.cpu_count() and len(os.sched_getaffinity(0)) >= 2:
        assert rec.units[0].mode == "pipelined" and "cudafe++" in rec.units[0].phases
    assert Module(one, store, policy="error").load_available() == 1


def test_packed_kernels_have_the_same_sass(tmp_path, monkeypatch):
    try:
        sass_diff.find_cuobjdump()
    except FileNotFoundError:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    plan = make_plan(DEMO, "f32", THREE)
    tc = Nvcc.find()
    labels = HeaderLabels(plan.spec, tc)
    members = [u for u in plan.units if not u.urgent]
    pk = pack.make_pack(get_family("demo").packer, members, [(2.0, 1)] * len(members))
    _, packed, _ = compile_unit(plan.spec, tc, labels, pk.name, pk.source, pk.ukey)
    (tmp_path / "pack.so").write_bytes(packed)
    for u in members:
        _, data, _ = compile_unit(plan.spec, tc, labels, u.instance.name, u.source, u.ukey)
        (tmp_path / "one.so").write_bytes(data)
        assert sass_diff.main([str(tmp_path / "one.so"), str(tmp_path / "pack.so"), "--subset"]) == 0
    # and the script does fail on a difference
    assert sass_diff.main([str(tmp_path / "one.so"), str(tmp_path / "pack.so")]) == 1
