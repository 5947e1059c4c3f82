"""jitkiln's Python dispatch equals AITER's generated C++ dispatch, compiled with g++ against stub headers;
``aiter-blob`` modules keep AITER's answers for planned shapes and fail fast for the rest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jitkiln.families.ck2stages.variants import ARCHS, VARIANTS


def _tree(root=None):
    from jitkiln.families.ck2stages.aiter_tree import AiterNotFound, find_tree
    try:
        return find_tree(root)
    except AiterNotFound as e:
        print(f"SKIP reason: {e.full()}")
        pytest.skip(f"AITER is not installed here: {e}")


@pytest.fixture(scope="module")
def tree():
    if not shutil.which("g++"):
        print("SKIP reason: no g++ to compile AITER's dispatch with")
        pytest.skip("no g++")
    return _tree()


def _compare(mod, blob_dir=None):
    import ck2stages_cxx_check as cxx_check
    res = cxx_check.run_cxx(mod, blob_dir)
    assert res, "the harness printed nothing"
    return res, {k: cxx_check.python_view(mod, *k) for k in res}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_python_dispatch_equals_aiter_cxx(tree, variant, arch):
    from jitkiln.families.ck2stages.module import get_module
    mod = get_module(tree, variant, arch)
    cxx, py = _compare(mod)
    diff = {k: (cxx[k], py[k]) for k in cxx if cxx[k] != py[k]}
    assert not diff, f"{len(diff)} of {len(cxx)} calls differ, e.g. {list(diff.items())[:3]}"
    # the grid really exercises the dispatch: every supported block_m returns an instance of the module
    names = {v[1] for v in cxx.values() if v[0] == "NAME"}
    assert names and any(v[0] == "ERROR" for v in cxx.values())
    for stage in (1, 2):
        assert mod.block_ms(stage)


@pytest.mark.skipif(not os.environ.get("JITKILN_TEST_AITER_ROOTS"),
                    reason="set JITKILN_TEST_AITER_ROOTS=dir[:dir] to also check other AITER checkouts")
@pytest.mark.parametrize("variant", ["a4w4", "a8w8blkscale", "a16w16"])
def test_other_aiter_trees(variant):
    from jitkiln.families.ck2stages.module import get_module
    for root in os.environ["JITKILN_TEST_AITER_ROOTS"].split(os.pathsep):
        mod = get_module(_tree(root), variant, "gfx950")
        cxx, py = _compare(mod)
        assert cxx == py


def _blob_check(tree, tmp_path, variant, problems, arch="gfx950"):
    from jitkiln.families.ck2stages.blob import write_blob
    from jitkiln.families.ck2stages.family import CK2Stages
    from jitkiln.families.ck2stages.module import get_module
    out = tmp_path / "blob"
    man = write_blob(variant, problems, out, arch)
    mod = get_module(tree, variant, arch)
    fam = CK2Stages(arch=arch)
    planned = set(man["instances"])
    assert sorted(p.stem for p in (out / "instances").glob("*.cu")) == sorted(planned)
    for n in planned:  # AITER's generated units, byte for byte
        assert (out / "instances" / f"{n}.cu").read_text() == mod.blob.instances[n]
    import ck2stages_cxx_check as cxx_check
    res = cxx_check.run_cxx(mod, out)
    full = {k: cxx_check.python_view(mod, *k) for k in res}
    served = 0
    for (stage, bm, idim), (kind, text) in res.items():
        if kind == "NAME":
            assert text in planned and full[(stage, bm, idim)] == ("NAME", text)
            served += 1
        else:
            assert kind == "ERROR", (stage, bm, idim, kind, text)
            assert "jitkiln reduced ck2stages module" in text or "Unsupported" in text
            if full[(stage, bm, idim)][0] == "NAME":
                assert full[(stage, bm, idim)][1] not in planned or mod.regular(stage) is False
    for p in problems:  # every planned shape is served by the reduced dispatch with AITER's instance
        r = fam._resolve(variant, p)
        for slot, inst in fam.select(variant, p).items():
            key = (int(slot[-1]), r.block_m, p["inter_dim"])
            if key in res:
                assert res[key] == ("NAME", inst.name)
    return man, res, served


def test_aiter_blob_kimi_shape(tree, tmp_path):
    man, res, served = _blob_check(tree, tmp_path, "a4w4", [{"inter_dim": 1024, "block_m": 128}])
    assert man["module"] == "reduced" and len(man["instances"]) == 2
    assert not any("gemm2_64x" in n for n in man["instances"])
    kind, text = res[(2, 128, 256)]  # the small-inter_dim path against the reduced module: fails fast
    assert kind == "ERROR" and "no stage-2 kernel for block_m=128, inter_dim=256" in text
    assert "aiter-blob" in text
    assert res[(2, 128, 2048)][0] == "NAME"  # any inter_dim > 256 still served


def test_aiter_blob_token_range_and_cli(tree, tmp_path):
    from jitkiln.families.ck2stages.family import CK2Stages
    fam = CK2Stages(arch="gfx950")
    probs = fam.problems("a4w4", model="kimi-k2", tp=2, tokens=[1, 64, 512, 8192])
    man, res, served = _blob_check(tree, tmp_path, "a4w4", probs)
    assert served and not any("gemm2_64x" in n for n in man["instances"])
    # the same through the command line AITER's blob_gen_cmd would run
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    p = subprocess.run([sys.executable, "-m", "jitkiln.families.ck2stages.blob", "--variant", "a4w4",
                        "--model", "kimi-k2", "--tp", "2", "--tokens", "1,64,512,8192", "--arch", "gfx950",
                        "-w", str(out)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert sorted(x.stem for x in (out / "instances").glob("*.cu")) == sorted(man["instances"])
    bad = subprocess.run([sys.executable, "-m", "jitkiln.families.ck2stages.blob", "--variant", "a4w4",
                          "--shape", "inter_dim=1024", "-w", str(out)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "lacks block_m" in bad.stderr and "hint:" in bad.stderr


def test_aiter_blob_full_is_aiters_module(tree, tmp_path):
    from jitkiln.families.ck2stages.blob import write_blob
    from jitkiln.families.ck2stages.module import get_module
    man = write_blob("a4w4", [], tmp_path / "full", "gfx950")
    mod = get_module(tree, "a4w4", "gfx950")
    assert man["module"] == "full" and sorted(man["instances"]) == sorted(mod.blob.instances)
    red = write_blob("a4w4", [{"inter_dim": 1024, "block_m": 128}], tmp_path / "red", "gfx950")
    assert red["module_key"] != man["module_key"]
