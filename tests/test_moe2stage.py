"""moe2stage on the CPU: declaration, planning, shapes, rendering (no GPU; one real compile marked slow)."""
import json
import os
import re
import shutil

import pytest

from jitkiln.families.moe2stage.dsl_instances import is_dsl
from jitkiln.families.moe2stage.gemv import is_gemv
from jitkiln.errors import UsageError
from jitkiln.families.moe2stage import (SMALL_INTER_DIM, MoE2Stage, MoEShape, expand_token_range,
                                        example_models, parse_tokens)
from jitkiln.families.moe2stage import heuristic


@pytest.fixture(scope="module")
def fam():
    return MoE2Stage()


def plan(fam, model, tp=1, ep=1, tokens="1-8192", variant="bf16"):
    probs = fam.problems(variant, model=model, tp=tp, ep=ep, tokens=parse_tokens(tokens))
    used = {}
    for p in probs:
        for slot, inst in fam.select(variant, p).items():
            used[inst.digest] = inst
    return probs, used


def test_registered_and_variants(fam):
    from jitkiln.family import _REGISTRY
    assert _REGISTRY.get("moe2stage") is not None
    assert list(fam.variants())[0] == "bf16" and "fp8" in fam.variants()


def test_candidates_unique_and_described(fam):
    for v in fam.variants():
        cands = fam.candidates(v)
        # bf16, fp8 and bf16-dsl also have the three weight-stream (GEMV) units (stage 1, stage 2 per token, stage 2
        # grouped by expert); fp8b128 keeps the tiles only; bf16 and fp8 (CUTLASS) trade the 128x128 cooperative tile
        # for the 64x256 ping-pong one (both stages) and gain the 128x192 cooperative one for stage 1; bf16-dsl adds
        # 64x256 for stage 2; bf16 and fp8 also have the two swapped-operand tiles (16 and 32 rows) of each stage
        assert len({c.digest for c in cands}) == len(cands) == {"fp8b128": 6, "bf16-dsl": 13}.get(v, 17)
        assert len({c.symbol for c in cands}) == len(cands)
        for c in cands:
            assert fam.rule(v, c)
            assert fam.abi_of(c) is type(c).abi and fam.abi_of(c).argtypes


def test_example_models_shipped():
    assert {"kimi-k2", "deepseek-v3", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b"} <= set(example_models())


def test_from_hf_config_styles(tmp_path):
    k = MoEShape.from_hf_config("kimi-k2", tp=8)
    assert (k.hidden, k.inter_dim, k.experts, k.topk) == (7168, 256, 384, 8)
    k = MoEShape.from_hf_config("kimi-k2", ep=8)
    assert (k.inter_dim, k.experts, k.ep) == (2048, 48, 8)
    q = MoEShape.from_hf_config("qwen3-235b-a22b")
    assert (q.hidden, q.inter_dim, q.experts, q.topk) == (4096, 1536, 128, 8)
    m = MoEShape.from_hf_config("mixtral-8x7b", tp=2)  # intermediate_size is the expert width here
    assert (m.inter_dim, m.experts, m.topk) == (7168, 8, 2)
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"text_config": {"hidden_size": 1024, "moe_intermediate_size": 512,
                                             "num_experts": 16, "num_experts_per_tok": 4}}))
    assert MoEShape.from_hf_config(str(tmp_path)).experts == 16  # a folder holding config.json, nested config
    assert MoEShape.from_hf_config({"hidden_size": 64, "intermediate_size": 128, "num_local_experts": 4,
                                    "num_experts_per_tok": 2}).inter_dim == 128


def test_from_hf_config_errors(tmp_path):
    with pytest.raises(UsageError) as e:  # a dense model
        MoEShape.from_hf_config({"hidden_size": 4096, "intermediate_size": 11008})
    assert "n_routed_experts" in str(e.value) and "num_experts_per_tok" in str(e.value)
    with pytest.raises(UsageError, match="hidden_size"):
        MoEShape.from_hf_config({"moe_intermediate_size": 1, "num_experts": 2, "num_experts_per_tok": 1})
    with pytest.raises(UsageError, match="divisible by tp"):
        MoEShape.from_hf_config("kimi-k2", tp=3)
    with pytest.raises(UsageError, match="divisible by ep"):
        MoEShape.from_hf_config("kimi-k2", ep=7)
    with pytest.raises(UsageError, match="no model config"):
        MoEShape.from_hf_config("no-such-model")
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="cannot read"):
        MoEShape.from_hf_config(str(bad))


def test_token_range():
    t = expand_token_range(1, 8192)
    assert t[0] == 1 and t[-1] == 8192 and 16 in t and 24 in t and 4096 in t and 3000 not in t
    assert parse_tokens("1,16,64") == [1, 16, 64]
    assert parse_tokens("512") == [512]
    with pytest.raises(UsageError):
        parse_tokens("8-1")
    with pytest.raises(UsageError):
        parse_tokens("a")


def test_plan_kimi_tp8_keeps_small_inter_stage2(fam):
    # Kimi-K2 at tp 8: inter_dim = 2048 / 8 = 256 <= 256, so the small-inter_dim stage-2 kernel IS needed
    probs, used = plan(fam, "kimi-k2", tp=8)
    assert {p["inter_dim"] for p in probs} == {256}
    names = {i.name for i in used.values()}
    assert any("s2" in n and "128x128x64_pingpong" in n for n in names)
    assert len(used) < len(fam.candidates("bf16"))
    assert "inter_dim = 256 for every shape" in fam.describe_problems(probs)


def test_plan_kimi_ep8_prunes_small_inter_stage2(fam):
    # the seed's pruning story: inter_dim > 256 never selects the small-inter_dim stage-2 kernel
    probs, used = plan(fam, "kimi-k2", ep=8)
    assert {p["inter_dim"] for p in probs} == {2048} and {p["experts"] for p in probs} == {48}
    small = [c for c in fam.candidates("bf16") if heuristic.role_of(c) == "SMALL_K"]
    assert small and not set(c.digest for c in small) & set(used)
    assert "small-inter_dim stage-2 kernel is not needed" in fam.describe_problems(probs)
    assert "inter_dim <= %d" % SMALL_INTER_DIM in fam.rule("bf16", small[0])


def test_plan_qwen3(fam):
    for model in ("qwen3-235b-a22b", "qwen3-30b-a3b"):
        probs, used = plan(fam, model, tokens="1-16384")
        assert all(i.stage in (1, 2) for i in used.values())
        assert 2 <= len(used) <= len(fam.candidates("bf16")) - 1  # no SMALL_K: inter_dim > 256


def test_select_regimes(fam):
    base = dict(hidden=4096, inter_dim=1536, experts=128, topk=8)
    r = lambda t, **kw: {s: heuristic.role_of(i) for s, i in fam.select("bf16", {**base, "tokens": t, **kw}).items()}  # noqa
    assert r(1) == {"stage1": "GEMV", "stage2": "GEMV"}  # decode: the weight-stream units
    assert r(16) == {"stage1": "SWAP16", "stage2": "SWAP16"}  # ~1.6 rows per active expert: swapped operands
    assert r(4) == {"stage1": "SWAP16", "stage2": "GEMV"}  # 1.13 rows: stage 1 past the weight stream's 1.05
    assert r(256) == {"stage1": "SWAP32", "stage2": "SWAP32"}  # 16 rows: the 32-row swapped tiles
    d = lambda t, **kw: {s: heuristic.role_of(i) for s, i in fam.select("fp8", {**base, "tokens": t, **kw}).items()}  # noqa
    assert d(1) == {"stage1": "GEMV", "stage2": "GEMV"}  # fp8 (per-tensor) has its own weight-stream units
    assert all(i.dtype == "fp8" for i in fam.select("fp8", {**base, "tokens": 1}).values())
    b = lambda t: {s: heuristic.role_of(i) for s, i in fam.select("fp8b128", {**base, "tokens": t}).items()}  # noqa
    assert b(1)["stage1"].startswith("DECODE")  # fp8b128 keeps the tiles at decode
    dsl = fam.select("bf16-dsl", {**base, "tokens": 1})  # the DSL variant takes the same weight-stream units ...
    assert all(is_gemv(i) and i.name.endswith("_dsl") for i in dsl.values())
    assert fam.select("bf16-dsl", {**base, "tokens": 512})["stage1"].name.endswith("64x128x128_pingpong_c1x1_dsl")
    assert r(512) == {"stage1": "DECODE_N128", "stage2": "DECODE_N256"}  # 32 rows per expert
    assert r(1024) == {"stage1": "DECODE_N256", "stage2": "DECODE_N256"}  # 64: stage 1 past 40 rows is 256 wide
    assert r(4096) == {"stage1": "DECODE_N256", "stage2": "DECODE_N256"}  # 256 rows: 64x256 up to 512 rows
    assert r(8192) == {"stage1": "DECODE_N256", "stage2": "DECODE_N256"}  # 512
    assert r(16384) == {"stage1": "WIDE", "stage2": "LARGE"}  # 1024 rows: 128x192 (bf16 stage 1), 128x256
    assert r(32768)["stage1"] == "LARGE" and r(32768, inter_dim=192)["stage1"] == "WIDE"  # 2048: where 256 pads
    assert heuristic.role(1, {**base, "tokens": 1024, "inter_dim": 192}) == "DECODE_N128"  # 2I = 384: no padding
    assert heuristic.role(2, {**base, "tokens": 64, "experts": 8, "topk": 2, "inter_dim": 768}) == "DECODE_N128"  # few tiles
    # fp8 has the same regimes (its K tile 128: the same bytes per stage), but keeps LARGE for stage 1 where
    # 2 * inter_dim is a multiple of 256 and takes WIDE where the 256-wide tile would pad
    assert d(4096) == {"stage1": "DECODE_N256", "stage2": "DECODE_N256"}
    assert fam.select("fp8", {**base, "tokens": 4096})["stage1"].name == "moe2stage_s1_fp8_64x256x128_pingpong_c1x1"
    assert d(16384) == {"stage1": "LARGE", "stage2": "LARGE"} and d(16384, inter_dim=192)["stage1"] == "WIDE"
    assert "multiple of 256" in fam.rule("fp8", fam.select("fp8", {**base, "tokens": 16384})["stage1"])
    ds = lambda t: {k: heuristic.role_of(i) for k, i in fam.select("bf16-dsl", {**base, "tokens": t}).items()}  # noqa
    assert ds(512) == {"stage1": "DECODE_N128", "stage2": "DECODE_N256"}  # the DSL tiles: 32 rows, then MEDIUM
    assert ds(1024) == {"stage1": "MEDIUM", "stage2": "MEDIUM"}
    assert "rows per expert <= 32" in fam.rule("bf16-dsl", fam.select("bf16-dsl", {**base, "tokens": 512})["stage1"])
    assert "rows per expert <= 128" in fam.rule("bf16", fam.select("bf16", {**base, "tokens": 512})["stage1"])
    assert "40 < rows per active expert <= 512" in fam.rule("bf16", fam.select("bf16", {**base, "tokens": 4096})["stage1"])
    assert r(16384, inter_dim=256)["stage2"] == "SMALL_K"
    assert r(1, inter_dim=256)["stage2"] == "GEMV"  # decode stays a weight stream
    # small stage-2 weights at a few rows per expert: stage 2 grouped by expert (small-moe, Mixtral-style)
    small = dict(hidden=2048, inter_dim=192, experts=128, topk=8)
    s = lambda t, **kw: {k: heuristic.role_of(i) for k, i in fam.select("bf16", {**small, "tokens": t, **kw}).items()}  # noqa
    assert s(64)["stage2"] == "GEMV_GROUPED" and s(128)["stage2"] == "GEMV_GROUPED"
    assert s(16)["stage2"] == "GEMV" and s(1024)["stage2"] != "GEMV_GROUPED"  # per token below; tiles above
    assert s(32)["stage2"] == "GEMV_GROUPED"  # 2.3 rows per active expert: grouped (per token up to 2.0)
    assert s(8, hidden=4096, inter_dim=1792, experts=8, topk=2)["stage2"] == "GEMV_GROUPED"  # Mixtral: 2.3 rows
    assert s(4, hidden=4096, inter_dim=1792, experts=8, topk=2)["stage2"] == "GEMV"  # 1.5 rows: per token
    mix = dict(hidden=4096, inter_dim=1792, experts=8, topk=2)  # stage 1 at 64 rows: 112 tiles of 64x256 < 132 SMs
    assert s(256, **mix)["stage1"] == "DECODE_N128" and s(512, **mix)["stage1"] == "DECODE_N256"  # 224 tiles
    # stage 1's weight stream up to 1.6 rows per active expert where an expert's W13 is small (<= 1M elements) ...
    assert s(16)["stage1"] == "GEMV" and s(16, inter_dim=768)["stage1"] == "SWAP16"  # W13 of 1.5M vs 6M elements
    assert r(8)["stage1"] == "SWAP16"  # ... not with a large W13 (1.27 rows)
    assert r(64)["stage2"] != "GEMV_GROUPED"  # Qwen3-235B's W2 (1.6 GB) streams faster through the tiles
    assert s(16, hidden=4096, inter_dim=1792, experts=8, topk=2)["stage2"] == "GEMV_GROUPED"  # Mixtral tp8
    g = fam.select("fp8", {**small, "tokens": 64})["stage2"]
    assert is_gemv(g) and g.dtype == "fp8" and g.n == 2
    # 64x64 only where 128-wide tiles would not fill half the SMs
    assert heuristic.role(1, {**base, "tokens": 1}, gemv=False, dsl=True) == "DECODE_N128"  # 8 experts x 24 tiles
    assert heuristic.role(1, {**small, "tokens": 1}, gemv=False, dsl=True) == "DECODE_N64"  # 8 experts x 3 tiles
    # swapped operands: bf16 and fp8 (fp8 with K tiles of 256), never the DSL variant; stage 2 only with a long K
    assert fam.select("fp8", {**base, "tokens": 16})["stage1"].name == "moe2stage_s1_fp8_128x16x256_cooperative_c1x1_swap"
    dsl_sel = [i for t in (4, 16, 256) for i in fam.select("bf16-dsl", {**base, "tokens": t}).values()]
    assert not any(getattr(i, "swap", False) for i in dsl_sel)
    kimi = dict(hidden=7168, inter_dim=256, experts=384, topk=8)  # Kimi-K2 tp8: stage 2's K = 256
    assert heuristic.role(2, {**kimi, "tokens": 256}) == "DECODE_N256" and heuristic.role(1, {**kimi, "tokens": 256}) == "SWAP16"
    assert "swapped operands" in fam.rule("bf16", fam.select("bf16", {**base, "tokens": 16})["stage2"])


def test_swap_instances_render_and_constraints():
    """Swapped-operand tiles (weights as the GEMM's A): their own names and digests; the unit differs from the plain
    tile's only in the operand roles (problem shape, pointers, D's layout), and bad fields are refused."""
    from jitkiln.families.moe2stage.instances import MoEStage1, MoEStage1Swap, MoEStage2Swap
    from jitkiln.families.moe2stage.templates import render_unit
    kw = dict(dtype="bf16", tile_m=64, tile_n=16, tile_k=128, schedule="pingpong")
    s, p = MoEStage1Swap(**kw), MoEStage1(**kw)
    assert s.name == p.name + "_swap" and s.digest != p.digest and s.params()["operands"] == "swap"
    assert "operands" not in p.params()  # the plain tiles' parameters (and digests) are unchanged
    src, plain = render_unit(s), render_unit(p)
    assert "using LayoutD = cutlass::layout::ColumnMajor;" in src and "Shape3(N, m, K)" in src
    assert "using LayoutD = cutlass::layout::RowMajor;" in plain and "Shape3(m, N, K)" in plain
    assert "ColumnMajor;  // output" not in plain and "Shape3(N, m, K)" not in plain
    strip = lambda t, i: t.replace(i.name, "NAME").replace(i.digest[:16], "DIGEST")  # noqa: E731
    changed = [a for a, b in zip(strip(src, s).splitlines(), strip(plain, p).splitlines()) if a != b]
    assert len(src.splitlines()) == len(plain.splitlines()) and len(changed) == 5, changed  # LayoutD, shape, A, B, D stride
    assert "(N, rows)" in changed[0]
    for bad, msg in ((dict(dtype="fp8b128", tile_n=128), "fp8b128"), (dict(tile_n=12), "tile_n"),
                     (dict(tile_n=264), "tile_n")):
        with pytest.raises(ValueError, match=msg):
            MoEStage2Swap(**{**kw, **bad})
    assert MoEStage2Swap(**{**kw, "dtype": "fp8", "tile_k": 256}).name.endswith("_fp8_64x16x256_pingpong_c1x1_swap")


def test_problem_validation(fam):
    with pytest.raises(UsageError, match="unknown shape key"):
        fam.check_problem({"tokens": 1, "hidden": 16, "inter_dim": 16, "experts": 2, "topk": 1, "foo": 1})
    with pytest.raises(UsageError, match="lacks"):
        fam.check_problem({"tokens": 1})
    with pytest.raises(UsageError, match="multiples of 16"):
        fam.check_problem({"tokens": 1, "hidden": 100, "inter_dim": 16, "experts": 2, "topk": 1})
    assert fam.check_problem({"tokens": 1, "hidden": 16, "inter_dim": 16, "experts": 2, "topk": 1})["ep"] == 1
    with pytest.raises(UsageError, match="--tokens"):
        fam.problems("bf16", model="kimi-k2")
    with pytest.raises(UsageError):
        fam.problems("bf16")
    with pytest.raises(UsageError, match="variant"):
        fam.candidates("int4")


def test_render_c_abi_no_torch(fam):
    for v in fam.variants():
        for inst in fam.candidates(v):
            src = fam.render(inst)
            assert "torch" not in src.lower().replace("no torch headers", "")
            assert "#include <torch" not in src and "ATen" not in src and "pybind" not in src
            exp = 'extern "C" __attribute__((visibility("default")))'  # units build with -fvisibility=hidden
            assert f'{exp} int {inst.symbol}(' in src
            assert f'{exp} const char* jk_name_{inst.digest[:16]}(void) {{ return "{inst.name}"; }}' in src
            assert "-DNDEBUG" in src  # the guard that refuses a build without it
            if is_gemv(inst):  # the weight-stream unit: plain CUDA, no CUTLASS
                assert "nc.L1::no_allocate" in src and '#include "cutlass' not in src
                assert "mma.sync.aligned.m16n8k16" in src  # the shared K stream (stage 1, stage 2 grouped)
                assert ("gemv_stage2g<<<" in src and "combine_y<<<" in src) == (inst.stage == 2 and inst.n > 0)
                assert src.startswith('// jitkiln-cutedsl {"kernel": null') == is_dsl(inst)  # bf16-dsl: plain CUDA
            elif is_dsl(inst):  # the GEMM is the CuTe DSL kernel module at this tile (the unit's JSON header)
                assert f'"tile_m": {inst.tile_m}' in src and f'"tile_n": {inst.tile_n}' in src
            else:
                assert f"Shape<_{inst.tile_m}, _{inst.tile_n}, _{inst.tile_k}>" in src
                # stage 1: routing and the GEMM's setup in one block while the counts fit in shared memory and the
                # pairs are few; else memset, count, scan and setup launches (E > 8192 or n > 16384)
                one = ("const bool one = E <= kRouteE && n <= kRouteN;" in src
                       and "route_groups<<<1, 1024, 0, stream>>>" in src and "count_rows<<<" in src
                       and "if (!one)\n    setup_groups<<<" in src)
                assert one == (inst.stage == 1), inst.name


def test_compile_spec(fam):
    try:
        spec = fam.compile_spec("bf16")
    except Exception as e:  # noqa: BLE001 - CUTLASS absent: a clear ToolchainNotFound
        assert "nvidia-cutlass" in getattr(e, "hint", "")
        return
    assert "-DNDEBUG" in spec.flags and spec.arch == "sm_90a"
    from jitkiln.compilers.nvcc import Nvcc
    assert "-gencode=arch=compute_90a,code=sm_90a" in Nvcc.gencode(spec.arch)
    assert any(d.endswith(os.path.join("source", "include")) or "include" in d for d in spec.include_dirs)
    with pytest.raises(UsageError):
        fam.compile_spec("bf16", arch="sm_80")


def test_moe_api_imports_without_torch_and_validates():
    import jitkiln.families.moe2stage.torch_ops as m
    assert m.fused_moe and m.ACTIVATIONS == {"silu": 0, "gelu": 1}
    torch = pytest.importorskip("torch")
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    w13 = torch.zeros(2, 32, 16, dtype=torch.bfloat16)
    w2 = torch.zeros(2, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="CUDA"):
        m.fused_moe(x, w13, w2, torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.int32))


def test_reference_moe_cpu():
    torch = pytest.importorskip("torch")
    from jitkiln.families.moe2stage.torch_ops import reference_moe
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 5, 16, 8, 4, 2
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g)
    w2 = torch.randn(E, H, I, generator=g)
    ids = torch.tensor([[0, 1], [1, 2], [3, -1], [0, 0 + 9], [2, 3]], dtype=torch.int32)
    w = torch.rand(T, k, generator=g)
    out = reference_moe(x, w13, w2, w, ids, dtype=torch.float64)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if 0 <= e < E:
                h = w13[e].double() @ x[t].double()
                ref[t] += w[t, j] * (w2[e].double() @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    assert torch.allclose(out, ref)


@pytest.fixture
def engine(fam):
    """The engine pieces a real compile needs, or a skip naming what is missing (nvcc, CUTLASS headers)."""
    if not shutil.which("nvcc"):
        pytest.skip("no nvcc")
    try:
        fam.compile_spec("bf16")
    except Exception:  # noqa: BLE001
        pytest.skip("no CUTLASS headers (pip install nvidia-cutlass)")
    from jitkiln.build import Builder
    from jitkiln.plan import make_plan
    from jitkiln.runtime import Module
    from jitkiln.store import Store
    return Builder, make_plan, Module, Store


@pytest.mark.slow
def test_real_nvcc_compile_one_instance(fam, cache_dir, engine):
    """One real CUTLASS sm90 instance through the engine (~35-60 s, ~3.2 GB): it compiles with the family's
    flags, ptxas reports no C7510 (no device assert left), it loads and exports the ABI under its name."""
    Builder, make_plan, Module, Store = engine
    # Kimi-K2 at tp 8, 4096 tokens: stage 2 is the small-inter_dim kernel (inter_dim = 256)
    problem = {"tokens": 4096, "hidden": 7168, "inter_dim": 256, "experts": 384, "topk": 8}
    inst = fam.select("bf16", problem)["stage2"]
    plan = make_plan(fam, "bf16", [problem], require_compiler=True)
    unit = plan.unit_for(inst)
    store = Store()
    rec = Builder(store, jobs=1, progress=False).build(plan, [unit])
    assert rec.units[0].status == "compiled"
    log = store.log_path(unit.ukey).read_text()
    assert "-DNDEBUG" in log and "C7510" not in log
    mod = Module(plan, store)
    assert mod.load_available() == 1 and mod.is_loaded(inst)  # loaded, name and symbols checked


def test_real_nvcc_compile_gemv_units(fam, cache_dir, engine):
    """The weight-stream units (plain CUDA, a few seconds each) of bf16 and fp8 compile with the family's flags
    without spills, load, and export the ABI under their names; a launch with bad scales is refused on the host."""
    Builder, make_plan, Module, Store = engine
    decode = {"tokens": 1, "hidden": 7168, "inter_dim": 256, "experts": 384, "topk": 8}
    small = {"tokens": 64, "hidden": 2048, "inter_dim": 192, "experts": 128, "topk": 8}  # stage 2 grouped by expert
    store = Store()
    for variant in ("bf16", "fp8"):
        sel = fam.select(variant, decode)
        assert all(is_gemv(i) and i.dtype == variant for i in sel.values())
        grouped = fam.select(variant, small)["stage2"]
        assert is_gemv(grouped) and grouped.n == 2
        plan = make_plan(fam, variant, [decode, small], require_compiler=True)
        assert grouped.digest in {u.instance.digest for u in plan.units}
        rec = Builder(store, jobs=1, progress=False).build(plan)
        assert {u.status for u in rec.units} <= {"compiled", "hit"} and len(rec.units) == 3
        for u in plan.units:  # the family builds with -Xptxas=-warn-spills
            log = store.log_path(u.ukey).read_text() if store.log_path(u.ukey).exists() else ""
            assert not re.search(r"warning.*spill", log, re.I), log[-2000:]
        mod = Module(plan, store)
        assert mod.load_available() == 3 and all(mod.is_loaded(i) for i in sel.values())
        import ctypes
        n = ctypes.c_size_t(0)
        s1 = mod.launcher(sel["stage1"])
        # size query: bf16 takes no scales, fp8 needs all three (refused without them, before any CUDA call)
        scale = ctypes.c_float(1.0)
        sp = ctypes.cast(ctypes.pointer(scale), ctypes.c_void_p).value
        args = [None] * 7 + [1, 8, 384, 7168, 256, 0]
        ok = (None, None, None) if variant == "bf16" else (sp, sp, sp)
        bad = (sp, None, None) if variant == "bf16" else (None, None, None)
        assert s1(*args, *ok, None, ctypes.byref(n), None) == 0 and n.value > 0
        assert s1(*args, *bad, None, ctypes.byref(n), None) != 0


# --- fp8b128: e4m3 with 128-block scales (weights 128x128, activations 1x128) --------------------------------

def test_fp8b128_declared_and_tiles(fam):
    assert "fp8b128" in fam.variants()
    cands = fam.candidates("fp8b128")
    assert {c.stage for c in cands} == {1, 2}
    for c in cands:  # CUTLASS's blockwise mainloop: K tile = scale block, N tile a multiple of it
        assert c.dtype == "fp8b128" and c.tile_k == 128 and c.tile_n % 128 == 0
        assert "fp8b128" in c.name and fam.rule("fp8b128", c)
    roles = {heuristic.role_of(c) for c in cands}
    assert roles == {"DECODE_N128", "MEDIUM", "LARGE"}


def test_fp8b128_instance_constraints():
    from jitkiln.families.moe2stage import MoEStage1, MoEStage2
    MoEStage1(dtype="fp8b128", tile_m=64, tile_n=128, tile_k=128, schedule="pingpong")
    with pytest.raises(ValueError, match="tile_k"):  # N tile below the weight-scale block
        MoEStage1(dtype="fp8b128", tile_m=64, tile_n=64, tile_k=128, schedule="pingpong")
    with pytest.raises(ValueError, match="tile_k"):
        MoEStage2(dtype="fp8b128", tile_m=128, tile_n=128, tile_k=64, schedule="cooperative")
    with pytest.raises(ValueError, match="registers"):  # 128x128 per warpgroup: two accumulators spill
        MoEStage2(dtype="fp8b128", tile_m=128, tile_n=128, tile_k=128, schedule="pingpong")
    with pytest.raises(ValueError, match="registers"):
        MoEStage1(dtype="fp8b128", tile_m=128, tile_n=256, tile_k=128, schedule="cooperative")


def test_fp8b128_select_regimes(fam):
    kimi = dict(hidden=7168, inter_dim=256, experts=384, topk=8)
    r = lambda t, **kw: {s: heuristic.role_of(i) for s, i in fam.select("fp8b128", {**kimi, "tokens": t, **kw}).items()}  # noqa
    assert r(1) == {"stage1": "DECODE_N128", "stage2": "DECODE_N128"}
    assert r(4096) == {"stage1": "MEDIUM", "stage2": "DECODE_N128"}  # small inter_dim: the ping-pong tile
    assert r(16384) == {"stage1": "LARGE", "stage2": "DECODE_N128"}
    assert r(16384, inter_dim=2048, experts=48, ep=8) == {"stage1": "LARGE", "stage2": "LARGE"}
    assert r(1024, inter_dim=1536, experts=128, hidden=4096) == {"stage1": "MEDIUM", "stage2": "MEDIUM"}
    with pytest.raises(UsageError, match="multiples of 128"):
        fam.select("fp8b128", {**kimi, "tokens": 8, "hidden": 7168 + 16})
    with pytest.raises(UsageError, match="multiples of 128"):
        fam.select("fp8b128", {**kimi, "tokens": 8, "inter_dim": 192})


def test_fp8b128_plan_prunes(fam):
    # Kimi-K2 at tp 8 (inter_dim 256): stage 2 is always the 64x128 ping-pong tile, so the cooperative stage-2
    # kernels are planned out; at ep 8 (inter_dim 2048) they are needed
    _, used = plan(fam, "kimi-k2", tp=8, variant="fp8b128", tokens="1-16384")
    s2 = {heuristic.role_of(i) for i in used.values() if i.stage == 2}
    assert s2 == {"DECODE_N128"} and len(used) == 4
    _, used = plan(fam, "kimi-k2", ep=8, variant="fp8b128", tokens="1-16384")
    assert len(used) == 6


def test_fp8b128_render(fam):
    for inst in fam.candidates("fp8b128"):
        src = fam.render(inst)
        assert "@@" not in src and "{{" not in src
        assert "FP8Blockwise" in src and "Sm90BlockwiseScaleConfig<1, kBlock, kBlock" in src
        assert "cute::tuple<LayoutA*, LayoutSFA*>" in src and "cute::tuple<LayoutB*, LayoutSFB*>" in src
        assert "cudaStreamSynchronize" not in src and "cudaDeviceSynchronize" not in src and "cudaMemcpy(" not in src
        kind = "Cooperative" if inst.schedule == "cooperative" else "Pingpong"
        assert f"KernelPtrArrayTmaWarpSpecialized{kind}FP8Blockwise" in src
        assert f"Shape<_{inst.cluster_m}, _{inst.cluster_n}, _1>" in src
        assert ("gather_rows" in src) == (inst.stage == 1) and ("combine_rows" in src) == (inst.stage == 2)


def _b128_inputs(torch, T=5, H=256, I=128, E=4, k=2, seed=0):
    from jitkiln.families.moe2stage.torch_ops import BLOCK
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)

    def qb(w):
        E_, N, K = w.shape
        b = w.reshape(E_, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
        sc = b.abs().amax(dim=(2, 4)) / 448
        return (b / sc[:, :, None, :, None]).to(torch.float8_e4m3fn).reshape(E_, N, K), sc.contiguous()
    q13, s13 = qb(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5)
    q2, s2 = qb(torch.randn(E, H, I, generator=g) / I ** 0.5)
    ids = torch.tensor([[0, 1], [1, 2], [3, -1], [0, 9], [2, 3]], dtype=torch.int32)[:T]
    w = torch.rand(T, k, generator=g)
    return x, q13, s13, q2, s2, ids, w


def test_fp8b128_quantize_1x128():
    torch = pytest.importorskip("torch")
    from jitkiln.families.moe2stage.torch_ops import quantize_1x128
    v = torch.randn(3, 256) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
    v[1, 128:] = 0
    q, s = quantize_1x128(v)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2) and s.dtype == torch.float32
    assert s[1, 1] == 1.0  # an all-zero block gets scale 1
    back = q.float() * s.repeat_interleave(128, dim=1)
    assert ((back - v).abs() <= v.abs() * 2 ** -4 + 1e-30 + s.repeat_interleave(128, dim=1) * 2 ** -9).all()
    assert (q.float().abs().amax(dim=1) == 448).all()  # each row's largest block uses the full e4m3 range


def test_fp8b128_reference_and_tier0_cpu():
    torch = pytest.importorskip("torch")
    from jitkiln.families.moe2stage.torch_ops import dequant_blocks, quantize_1x128, reference_moe, torch_moe
    x, q13, s13, q2, s2, ids, w = _b128_inputs(torch)
    T, H = x.shape
    I = q2.shape[2]
    ref = reference_moe(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2, dtype=torch.float64)
    # by hand: per (token, pick), the kernels' 1x128 quantization of x and of the weighted activation
    a13 = dequant_blocks(q13, s13, torch.float64)
    a2 = dequant_blocks(q2, s2, torch.float64)
    xq, xs = quantize_1x128(x)
    xd = xq.double() * xs.double().repeat_interleave(128, dim=1)
    hand = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < a13.shape[0]:
                h = (a13[e] @ xd[t]).to(torch.bfloat16).double()
                v = torch.nn.functional.silu(h[:I]) * h[I:] * w[t, j].double()
                vq, vs = quantize_1x128(v[None])
                hand[t] += a2[e] @ (vq.double() * vs.double().repeat_interleave(128, dim=1))[0]
    assert torch.allclose(ref, hand, rtol=1e-9, atol=1e-12)
    # e4m3 input with caller scales [T, H/128] is the same as the kernels quantizing the bf16 input
    ref_pre = reference_moe(xq, q13, q2, w, ids, a_scale=xs, w13_scale=s13, w2_scale=s2, dtype=torch.float64)
    assert torch.equal(ref_pre, ref)
    # tier 0 (dequantizing loop) = the model reference (no activation quantization), float32 vs float64
    model = reference_moe(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2, dtype=torch.float64, quantize_acts=False)
    t0 = torch_moe(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2)
    assert ((t0.double() - model).norm() / model.norm()) < 1e-2  # bf16 output rounding
    t0p = torch_moe(xq, q13, q2, w, ids, a_scale=xs, w13_scale=s13, w2_scale=s2)
    model_p = reference_moe(xq, q13, q2, w, ids, a_scale=xs, w13_scale=s13, w2_scale=s2, dtype=torch.float64,
                            quantize_acts=False)
    assert ((t0p.double() - model_p).norm() / model_p.norm()) < 1e-2
    # and the quantization error against the model stays within the documented fp8 model bound
    assert ((ref - model).norm() / model.norm()) < 8e-2


def test_fp8b128_validation_cpu():
    torch = pytest.importorskip("torch")
    from jitkiln.families.moe2stage.torch_ops import _check_b128, _is_block_scaled
    x, q13, s13, q2, s2, ids, w = _b128_inputs(torch)
    assert _is_block_scaled(s13, q13) and not _is_block_scaled(torch.ones(4), q13)
    _check_b128(x, q13, q2, None, s13, None, s2)  # ok
    with pytest.raises(UsageError, match=r"w13_scale of shape \[4, 2, 2\]"):
        _check_b128(x, q13, q2, None, s13[:, :1], None, s2)
    with pytest.raises(UsageError, match=r"w2_scale of shape \[4, 2, 1\]"):
        _check_b128(x, q13, q2, None, s13, None, s2.transpose(1, 2))
    with pytest.raises(UsageError, match="float32"):
        _check_b128(x, q13, q2, None, s13.half(), None, s2)
    with pytest.raises(UsageError, match="contiguous"):
        _check_b128(x, q13, q2, None, s13.transpose(1, 2).contiguous().transpose(1, 2), None, s2)
    with pytest.raises(UsageError, match="a2_scale=None"):
        _check_b128(x, q13, q2, None, s13, torch.ones(1), s2)
    with pytest.raises(UsageError, match="a_scale=None"):
        _check_b128(x, q13, q2, torch.ones(5, 2), s13, None, s2)
    xq = x.to(torch.float8_e4m3fn)
    with pytest.raises(UsageError, match=r"a_scale of shape \[T, H/128\] = \[5, 2\]"):
        _check_b128(xq, q13, q2, None, s13, None, s2)
    with pytest.raises(UsageError, match=r"\[5, 2\]"):
        _check_b128(xq, q13, q2, torch.ones(5, 1), s13, None, s2)
    _check_b128(xq, q13, q2, torch.ones(5, 2), s13, None, s2)
    with pytest.raises(UsageError, match="multiples of 128"):
        _check_b128(x[:, :144].contiguous(), q13[:, :, :144], q2[:, :144], None, s13, None, s2)
