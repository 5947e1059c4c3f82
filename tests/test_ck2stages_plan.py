"""ck2stages planning, verified against the installed AITER (its generator, its tuned CSV, its fused_moe.py)."""
from __future__ import annotations

import ast
import csv
import re

import pytest

from jitkiln.errors import MissingInstance, UsageError


def _tree():
    from jitkiln.families.ck2stages.aiter_tree import AiterNotFound, find_tree
    try:
        return find_tree()
    except AiterNotFound as e:
        print(f"SKIP reason: {e.full()}")
        pytest.skip(f"AITER is not installed here: {e}")


@pytest.fixture(scope="module")
def tree():
    return _tree()


@pytest.fixture
def fam(tree, monkeypatch):
    from jitkiln.families.ck2stages.family import CK2Stages
    for v in ("CU_NUM", "AITER_CONFIG_FMOE", "JITKILN_AITER_ROOT", "JITKILN_ARCH", "GPU_ARCHS"):
        monkeypatch.delenv(v, raising=False)
    return CK2Stages(arch="gfx950")


def generator_names(tree, variant, arch, tmp_path) -> set[str]:
    """Instance names AITER's generator writes, run independently of jitkiln's module reading."""
    from jitkiln.families.ck2stages.aiter_tree import run_generator
    from jitkiln.families.ck2stages.variants import VARIANTS
    out = tmp_path / f"gen-{variant}-{arch}"
    run_generator(tree, VARIANTS[variant].generator_args(), arch, out)
    return {p.stem for p in (out / "instances").glob("*.cu")}


@pytest.mark.parametrize("variant,arch", [("a4w4", "gfx950"), ("a4w4", "gfx942"), ("a16w16", "gfx950"),
                                          ("a16w16", "gfx942"), ("a8w8", "gfx942"), ("a8w8blkscale", "gfx950")])
def test_full_plan_equals_aiter_generator(fam, tree, variant, arch, tmp_path):
    from jitkiln.plan import make_plan
    plan = make_plan(fam, variant, fam.problems(variant), arch=arch)
    assert plan.full and not plan.unused
    assert {i.name for i in plan.instances} == generator_names(tree, variant, arch, tmp_path)


def test_arch_changes_names_and_counts(fam, tree, tmp_path):
    a = {i.name for i in fam.configure(arch="gfx950").candidates("a16w16")}
    b = {i.name for i in fam.configure(arch="gfx942").candidates("a16w16")}
    assert a != b and len(a) != len(b)
    assert b == generator_names(tree, "a16w16", "gfx942", tmp_path)


def test_a4w4_full_module_has_the_seed_small_stage2_kernels(fam):
    names = [i.name for i in fam.candidates("a4w4")]
    small = [n for n in names if n.startswith("moe_ck2stages_gemm2_64x")]
    assert len(small) == 3, names  # the three the upstream issue names (MulABScale spelling in this release)


def _stage2(plan):
    return sorted(u.instance.name for u in plan.units if "stage2" in u.slots)


def test_kimi_shape_plan_drops_small_stage2(fam):
    from jitkiln.plan import make_plan
    probs = fam.problems("a4w4", shapes=[{"inter_dim": 1024, "block_m": 128}])
    plan = make_plan(fam, "a4w4", probs, arch="gfx950")
    names = [u.instance.name for u in plan.units]
    assert not any("gemm2_64x" in n for n in names)
    mod = fam.module("a4w4")
    assert _stage2(plan) == [mod.pick(2, 128, 1024).instance.name]
    assert _stage2(plan)[0].startswith("moe_ck2stages_gemm2_256x128x128x128")
    unused = {i.name: r for i, r in plan.unused}
    assert all("inter_dim <= 256" in unused[n] for n in unused if "gemm2_64x" in n)
    js = plan.to_json()
    assert js["module"] == "reduced" and all(i.get("why") for i in js["instances"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_kimi_token_range_plan(fam, tp):
    """Any token range with inter_dim > 256: no gemm2_64x*, and stage 2 only uses gemm2_256x{32,64,128}."""
    from jitkiln.plan import make_plan
    probs = fam.problems("a4w4", model="kimi-k2", tp=tp, tokens=list(range(1, 8193)))
    assert {p["inter_dim"] for p in probs} == {2048 // tp}
    plan = make_plan(fam, "a4w4", probs, arch="gfx950")
    mod = fam.module("a4w4")
    expected = sorted({mod.pick(2, b, 2048 // tp).instance.name for b in mod.block_ms(2)})
    assert all(re.match(r"moe_ck2stages_gemm2_256x(32|64|128)x", n) for n in expected)
    assert set(_stage2(plan)) <= set(expected)
    assert not any("gemm2_64x" in u.instance.name for u in plan.units)
    prov = fam.provenance("a4w4", probs)
    assert set(prov) == {u.instance.name for u in plan.units}
    assert all("get_block_size_M" in v for v in prov.values())


def test_small_inter_dim_against_reduced_module(fam, tmp_path):
    """A reduced module asked for a shape it was not planned for: the runtime's policy 'error' names the missing
    instance and when AITER's dispatch picks it; the instances a shape needs beyond the plan are exactly those."""
    from jitkiln.plan import make_plan
    from jitkiln.runtime import Module
    from jitkiln.store import Store
    plan = make_plan(fam, "a4w4", fam.problems("a4w4", shapes=[{"inter_dim": 1024, "block_m": 128}]), arch="gfx950")
    small = {"inter_dim": 256, "block_m": 128}
    need_inst = fam.module("a4w4").pick(2, 128, 256).instance
    mod = Module(plan, Store(tmp_path / "cache"), policy="error")
    with pytest.raises(MissingInstance) as ei:
        mod.launcher(need_inst, small)
    msg = ei.value.full()
    need = need_inst.name
    assert need in msg and "gemm2_64x" in need and "hint:" in msg and "inter_dim <= 256" in msg

    def missing(problem):
        return [i.name for i in fam.select("a4w4", problem).values() if plan.unit_for(i) is None]
    assert missing(small) == [need]
    assert missing({"inter_dim": 4096, "block_m": 128}) == []


def test_tuned_csv_row_brings_in_its_named_kernels(fam, tree, monkeypatch):
    """A row of AITER's own tuned_fmoe.csv (a8w8, MI308 cu_num=80) decides block_m and the stage-2 kernel;
    its stage-1 kernel is AITER's assembly, so no CK stage-1 instance is planned."""
    from jitkiln.families.ck2stages.fmoe import tuned_files
    from jitkiln.families.ck2stages.variants import VARIANTS
    fam.configure(arch="gfx942")
    key = VARIANTS["a8w8"].csv_key("gfx942")
    rows = [r for r in csv.DictReader(open(tuned_files(tree)[0])) if r["cu_num"] == "80"
            and all(r[k] == v for k, v in key.items()) and r["use_g1u1"] == "1"
            and r["kernelName2"].startswith("moe_ck2stages") and "ck2stages" not in r["kernelName1"]]
    if not rows:
        pytest.skip("this AITER's tuned_fmoe.csv has no a8w8 cu_num=80 rows")
    r = rows[0]
    monkeypatch.setenv("CU_NUM", "80")
    prob = {k: int(r[k]) for k in ("token", "model_dim", "inter_dim", "expert", "topk")}
    sel = fam.select("a8w8", prob)
    assert list(sel) == ["stage2"] and sel["stage2"].name == r["kernelName2"]
    assert "tuned tuned_fmoe.csv" in fam.provenance("a8w8", [prob])[r["kernelName2"]]
    monkeypatch.setenv("CU_NUM", "304")  # no row for MI300X: the heuristic decides
    assert "untuned" in fam.provenance("a8w8", [prob])[fam.select("a8w8", prob)["stage2"].name]


def test_tuned_row_overrides_heuristic(fam, tmp_path, monkeypatch):
    """A tuned row naming a kernel the heuristic would not pick: the plan follows the row, like AITER."""
    from jitkiln.families.ck2stages.fmoe import KEY_COLS
    from jitkiln.families.ck2stages.variants import VARIANTS
    mod = fam.module("a4w4")
    heur = mod.pick(2, 128, 1024).instance.name
    other = next(i.name for i in mod.instances if i.stage == 2 and i.name != heur and "gemm2_256x" in i.name)
    key = VARIANTS["a4w4"].csv_key("gfx950")
    row = {"cu_num": 256, "token": 1024, "model_dim": 7168, "inter_dim": 1024, "expert": 384, "topk": 8,
           **key, "use_g1u1": 1, "block_m": 128, "ksplit": 0, "kernelName1": "not_a_ck_kernel",
           "kernelName2": other, "run_1stage": 0}
    f = tmp_path / "tuned_fmoe.csv"
    with open(f, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(KEY_COLS) + ["block_m", "ksplit", "kernelName1", "kernelName2",
                                                            "run_1stage"])
        w.writeheader()
        w.writerow(row)
    monkeypatch.setenv("AITER_CONFIG_FMOE", str(f))
    prob = {"token": 1024, "model_dim": 7168, "inter_dim": 1024, "expert": 384, "topk": 8}
    sel = fam.select("a4w4", prob)
    assert sel["stage2"].name == other
    # stage 1: the name is not in the module, so AITER's moe_dispatch falls back to the heuristic for block_m=128
    assert sel["stage1"].name == mod.pick(1, 128, 1024).instance.name
    prov = fam.provenance("a4w4", [prob])
    assert "tuned_fmoe.csv:2" in prov[other] and "names it" in prov[other]


def _aiter_function(tree, name: str, cu_num: int):
    """A function from the tree's aiter/fused_moe.py, compiled on its own (AITER's code, not a copy)."""
    src = (tree.package / "fused_moe.py").read_text()
    mod = ast.parse(src)
    import functools
    ns = {"get_cu_num": lambda: cu_num, "functools": functools}
    for node in mod.body:
        if isinstance(node, ast.FunctionDef) and node.name in (name, "nextPow2"):
            node.decorator_list = []  # e.g. an lru_cache: irrelevant to the arithmetic
            exec(compile(ast.Module([node], []), "fused_moe.py", "exec"), ns)
    return ns[name]


@pytest.mark.parametrize("cu_num", [80, 256, 304])
def test_block_size_and_padding_equal_aiter(tree, cu_num):
    from jitkiln.families.ck2stages.fmoe import block_size_m, padded_m
    if tree.package is None or not (tree.package / "fused_moe.py").is_file():
        pytest.skip("this AITER tree has no aiter/fused_moe.py")
    aiter_bs = _aiter_function(tree, "get_block_size_M", cu_num)
    aiter_pad = _aiter_function(tree, "get_padded_M", cu_num)
    for m in list(range(1, 40)) + [63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 511, 512, 1000, 1023, 1024,
                                   1025, 4096, 8192]:
        assert padded_m(m) == aiter_pad(m), m
    for token in (16, 32, 64, 128, 256, 512, 1024):
        for topk in (1, 2, 8):
            for expert in (8, 32, 128, 256, 384):
                for inter in (128, 256, 512, 1024, 2048, 4096):
                    assert block_size_m(token, topk, expert, inter, cu_num) == \
                        aiter_bs(token, topk, expert, inter), (token, topk, expert, inter)


def test_coinciding_names_get_distinct_digests_and_keys(fam):
    a = {i.name: i for i in fam.candidates("a4w4")}
    b = {i.name: i for i in fam.candidates("a4w4_bns")}
    common = set(a) & set(b)
    assert common, "expected a4w4 and a4w4_bns to share instance names in this AITER release"
    for n in common:
        assert a[n].digest != b[n].digest and a[n].header != b[n].header
    from jitkiln.families.ck2stages.blob import module_key
    ka = module_key(fam, "a4w4", [a[n] for n in common], full=False)
    kb = module_key(fam, "a4w4_bns", [b[n] for n in common], full=False)
    assert ka != kb
    full = module_key(fam, "a4w4", list(a.values()), full=True)
    assert full != module_key(fam, "a4w4", list(a.values()), full=False)
    g942 = fam.configure(arch="gfx942").candidates("a4w4")
    assert {i.digest for i in g942}.isdisjoint({i.digest for i in a.values()})


def test_render_is_aiters_instance_plus_c_abi(fam, tree, tmp_path):
    inst = next(i for i in fam.candidates("a4w4") if i.stage == 2)
    unit = fam.render(inst)
    gen = tmp_path / "g"
    from jitkiln.families.ck2stages.aiter_tree import run_generator
    from jitkiln.families.ck2stages.variants import VARIANTS
    run_generator(tree, VARIANTS["a4w4"].generator_args(), "gfx950", gen)
    assert (gen / "instances" / f"{inst.name}.cu").read_text() in unit
    assert 'extern "C"' in unit and inst.symbol in unit and f"jk_name_{inst.digest[:16]}" in unit
    assert "ck_moe_stage2_gemm<" in unit
    spec = fam.compile_spec("a4w4", "gfx950")
    assert spec.toolchain == "hip" and spec.arch == "gfx950"
    assert any(d.endswith("composable_kernel/include") for d in spec.include_dirs)


def test_clear_errors(fam, tmp_path):
    from jitkiln.families.ck2stages.aiter_tree import AiterNotFound, find_tree
    with pytest.raises(UsageError, match="unknown variant"):
        fam.candidates("a3w3")
    with pytest.raises(UsageError, match="lacks block_m"):
        fam.problems("a4w4", shapes=[{"inter_dim": 1024}])
    with pytest.raises(UsageError, match="unknown shape key"):
        fam.problems("a4w4", shapes=[{"inter_dim": 1024, "block_m": 128, "m": 3}])
    with pytest.raises(UsageError, match="unknown arch"):
        fam.configure(arch="sm_90a")
    with pytest.raises(UsageError, match="Unsupported block_m value") as ei:
        fam.select("a4w4", {"inter_dim": 1024, "block_m": 96})
    assert "[32, 64, 128]" in ei.value.hint
    with pytest.raises(UsageError, match="needs --tokens"):
        fam.problems("a4w4", model="kimi-k2")
    with pytest.raises(UsageError, match="do not divide"):
        fam.problems("a4w4", model="kimi-k2", tp=3, tokens=[1])
    with pytest.raises(AiterNotFound) as ei:
        find_tree(tmp_path)
    assert "pip install" in ei.value.full()
