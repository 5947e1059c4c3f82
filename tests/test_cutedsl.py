"""The CuTe DSL back end: the ``cutedsl`` compiler and moe2stage's ``bf16-dsl`` variant (no GPU needed).

Planning and keys never import the DSL; compiles (skipped without ``nvidia-cutlass-dsl`` or nvcc) produce a
loadable C-ABI .so from a resident worker, deterministic bytes, and the errors the issue asks for.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from jitkiln import families  # noqa: F401
from jitkiln.compilers import cutedsl
from jitkiln.errors import CompileError, ToolchainNotFound
from jitkiln.family import get_family
from jitkiln.families.moe2stage import heuristic
from jitkiln.plan import make_plan

SHAPE = dict(tokens=4096, hidden=7168, inter_dim=256, experts=384, topk=8)


def _have_dsl() -> bool:
    try:
        cutedsl.CuteDsl.find()
        return True
    except ToolchainNotFound:
        return False


needs_dsl = pytest.mark.skipif(not _have_dsl(), reason=f"needs nvidia-cutlass-dsl 4.8.x and nvcc ({cutedsl.PIP})")


def test_dsl_variant_plans_the_same_tiles_without_importing_the_dsl():
    code = ("import sys, json\nfrom jitkiln import families\nfrom jitkiln.family import get_family\n"
            "from jitkiln.plan import make_plan\n"
            "f = get_family('moe2stage')\n"
            f"p = make_plan(f, 'bf16-dsl', [{SHAPE!r}])\n"
            "print(json.dumps([[u.instance.name for u in p.units], 'cutlass' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names, imported = json.loads(out)
    assert not imported, "planning a DSL variant must not import the DSL"
    # the family's heuristic with the DSL tiles' thresholds (heuristic.DECODE_ROWS_OTHER), the bf16 tiles renamed
    want = heuristic.select("bf16", SHAPE, dsl=True)
    assert names == [want[s].name + "_dsl" for s in ("stage1", "stage2")]


def test_dsl_instances_have_their_own_names_symbols_and_keys():
    fam = get_family("moe2stage")
    dsl = make_plan(fam, "bf16-dsl", [SHAPE])
    cxx = make_plan(fam, "bf16", [SHAPE])
    assert dsl.spec.toolchain == "cutedsl" and dsl.spec.arch == "sm_90a"
    for a, b in zip(dsl.units, cxx.units):
        assert a.instance.symbol != b.instance.symbol and a.ukey != b.ukey
        assert a.instance.params()["backend"] == "dsl" and "backend" not in b.instance.params()
        assert type(a.instance).abi is type(b.instance).abi  # the same C ABI
    slots = fam.select("bf16-dsl", SHAPE)
    want = heuristic.select("bf16", SHAPE, dsl=True)
    assert {k: v.name for k, v in slots.items()} == {k: v.name + "_dsl" for k, v in want.items()}
    # where both pick the same tiles (prefill: LARGE; below it bf16 has tiles the DSL has not: the swapped-operand
    # ones, 64x256 for stage 1, 128x192): the DSL's own names
    big = {**SHAPE, "tokens": 65536}
    assert [i.name for i in fam.select("bf16-dsl", big).values()] == [
        i.name + "_dsl" for i in fam.select("bf16", big).values()]
    assert fam.select("bf16-dsl", big)["stage1"].name.endswith("_128x256x64_cooperative_c2x1_dsl")


def test_dsl_unit_text_carries_the_kernel_digest_and_params():
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16-dsl") if i.name.startswith("moe2stage_s1_bf16_128x256x64"))
    spec, files = cutedsl.parse_unit(fam.render(inst))
    assert spec["kernel_sha256"] == cutedsl.file_sha256(cutedsl.kernel_file(spec["kernel"]))
    assert spec["params"] == {"dtype": "bf16", "tile_m": 128, "tile_n": 256, "tile_k": 64, "cluster_m": 2,
                              "cluster_n": 1, "schedule": "cooperative"}
    assert set(files) == {"glue.cu", "bridge.c"}
    assert inst.symbol in files["glue.cu"] and f"jk_name_{inst.digest[:16]}" in files["glue.cu"]
    assert "cutlass" not in files["glue.cu"].lower().replace("cutedsl", "")
    assert fam.packer.render([type("U", (), {"instance": inst, "source": ""})()]) is None  # never packed


def test_dsl_two_consumer_tiles_are_their_own_instances():
    """consumers=2 (two warpgroups taking turns on 64-row ping-pong tiles) is a field of the DSL tiles: its own
    name, digest and unit params; the default (1) leaves the unit text as it was; anything else is refused."""
    from jitkiln.families.moe2stage.dsl_instances import MoEStage1Dsl
    fam = get_family("moe2stage")
    one = MoEStage1Dsl(dtype="bf16", tile_m=64, tile_n=256, tile_k=64, schedule="pingpong")
    two = MoEStage1Dsl(dtype="bf16", tile_m=64, tile_n=256, tile_k=64, schedule="pingpong", consumers=2)
    assert two.name == one.name + "_w2" and two.digest != one.digest
    assert cutedsl.parse_unit(fam.render(two))[0]["params"]["consumers"] == 2
    assert "consumers" not in cutedsl.parse_unit(fam.render(one))[0]["params"]
    for bad in (dict(consumers=3), dict(consumers=2, tile_m=128), dict(consumers=2, schedule="cooperative",
                                                                       tile_m=128)):
        with pytest.raises(ValueError, match="consumers"):
            MoEStage1Dsl(**{**dict(dtype="bf16", tile_m=64, tile_n=256, tile_k=64, schedule="pingpong"), **bad})


def test_missing_dsl_says_the_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ToolchainNotFound) as e:
        cutedsl.CuteDsl.find()
    assert "pip install nvidia-cutlass-dsl==4.8.1" in e.value.hint


def test_other_dsl_version_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.9.0")
    with pytest.raises(ToolchainNotFound) as e:
        cutedsl.CuteDsl.find()
    assert "4.9.0" in e.value.reason and "4.8." in e.value.reason


def _compile(tmp_path, text: str, name: str = "u"):
    from jitkiln.compilers.base import CompileJob
    fam = get_family("moe2stage")
    tc = cutedsl.CuteDsl.find()
    work = tmp_path / name
    work.mkdir()
    src = work / f"{name}.cu"
    src.write_text(text)
    job = CompileJob(str(src), str(work / "artifact.so"), fam.compile_spec("bf16-dsl"), str(work),
                     log_path=str(tmp_path / f"{name}.log"))
    return tc.compile(job), work / "artifact.so"


@needs_dsl
def test_compile_loads_and_reuses_the_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("JITKILN_CACHE_DIR", str(tmp_path / "cache"))
    cutedsl.POOL.shutdown()
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16-dsl") if i.name.startswith("moe2stage_s2_bf16_64x64x128"))
    text = fam.render(inst)
    r1, so1 = _compile(tmp_path, text, "a")
    assert r1.mode == "worker-fresh" and "dsl_compile" in r1.phases
    assert any(d.endswith("dsl_gemm.py") for d in r1.deps)
    lib = ctypes.CDLL(str(so1))
    f = getattr(lib, f"jk_name_{inst.digest[:16]}")
    f.restype = ctypes.c_char_p
    assert f().decode() == inst.name
    assert hasattr(lib, inst.symbol)
    # a worker that died between jobs is replaced
    w = cutedsl.POOL.idle["sm_90a"][0]
    w.kill()
    w.p.wait()
    r2, so2 = _compile(tmp_path, text, "b")
    assert r2.mode == "worker-fresh"
    r3, so3 = _compile(tmp_path, text, "c")
    assert r3.mode == "worker-warm" and r3.seconds < r1.seconds + 5


@needs_dsl
def test_dsl_compile_error_names_instance_params_and_log(tmp_path, monkeypatch):
    monkeypatch.setenv("JITKILN_CACHE_DIR", str(tmp_path / "cache"))
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16-dsl") if i.name.startswith("moe2stage_s2_bf16_64x64x128"))
    text = fam.render(inst)
    head, _, rest = text.partition("\n")
    spec = json.loads(head[len(cutedsl.HEADER):])
    spec["params"]["tile_m"] = 96  # no such wgmma tile
    with pytest.raises(CompileError) as e:
        _compile(tmp_path, cutedsl.HEADER + json.dumps(spec) + "\n" + rest, "bad")
    assert '"tile_m": 96' in e.value.reason and "tile_m" in e.value.details
    assert e.value.log and os.path.isfile(e.value.log)


@needs_dsl
def test_changed_kernel_module_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("JITKILN_CACHE_DIR", str(tmp_path / "cache"))
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16-dsl") if i.name.startswith("moe2stage_s2_bf16_64x64x128"))
    text = fam.render(inst)
    spec, _ = cutedsl.parse_unit(text)
    with pytest.raises(CompileError, match="changed since"):
        _compile(tmp_path, text.replace(spec["kernel_sha256"], "0" * 64), "stale")


@needs_dsl
def test_plain_cuda_unit_of_the_dsl_variant_compiles_without_a_worker(tmp_path, monkeypatch):
    """bf16-dsl's weight-stream units are cutedsl units without a DSL kernel: nvcc compiles and links them alone."""
    monkeypatch.setenv("JITKILN_CACHE_DIR", str(tmp_path / "cache"))
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16-dsl") if i.name == "moe2stage_s2_bf16_gemv_w8u2n2_dsl")
    text = fam.render(inst)
    spec, files = cutedsl.parse_unit(text)
    assert spec["kernel"] is None and set(files) == {"unit.cu"}
    cutedsl.POOL.shutdown()
    r, so = _compile(tmp_path, text, "gemv")
    assert r.mode == "nvcc-only" and "dsl_compile" not in r.phases
    assert not cutedsl.POOL.idle.get("sm_90a")  # no worker was started
    lib = ctypes.CDLL(str(so))
    f = getattr(lib, f"jk_name_{inst.digest[:16]}")
    f.restype = ctypes.c_char_p
    assert f().decode() == inst.name and hasattr(lib, inst.symbol)
    # the ABI's size query answers without a GPU: float32 rows for every (token, expert) pair
    n = ctypes.c_size_t(0)
    launch = getattr(lib, inst.symbol)
    launch.argtypes = fam.abi_of(inst).argtypes
    T, topk, E, H, I = 3, 2, 4, 64, 32
    assert launch(None, None, None, None, None, T, topk, E, H, I, None, None, None, ctypes.byref(n), None) == 0
    assert n.value == T * topk * H * 4


def test_dsl_stage1_routes_in_one_launch_with_a_fallback():
    """bf16-dsl's stage 1: ranks, offsets and tile offsets in one block while the counts fit in shared memory and
    the pairs are few; otherwise the memset, count, scan and tile-offset launches (E > 8192 or n > 16384)."""
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16-dsl") if i.name.startswith("moe2stage_s1_bf16_64x128x128"))
    _, files = cutedsl.parse_unit(fam.render(inst))
    glue = files["glue.cu"]
    assert "route_tiles<<<1, 1024, 0, stream>>>" in glue
    assert "const bool one = E <= kRouteE && n <= kRouteN;" in glue
    assert "count_rows<<<" in glue and "if (!one) tile_offsets<<<" in glue
