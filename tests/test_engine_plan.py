"""Family API and planning (no compiles)."""
import json

import pytest

from jitkiln.cli import main
from jitkiln.tokens import parse_tokens
from jitkiln.errors import JitkilnError, UsageError
from jitkiln.families.demo import Demo, DemoGemm
from jitkiln.family import get_family
from jitkiln.plan import make_plan


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_instance_name_and_digest_are_stable_and_distinct():
    a = DemoGemm("f32", 8, 64, 16, 1, 2)
    b = DemoGemm("f32", 8, 64, 16, 1, 2)
    c = DemoGemm("f64", 8, 64, 16, 1, 2)
    assert a.name == b.name == "demo_gemm_f32_8x64x16_t1x2"
    assert a.digest == b.digest and a.digest != c.digest
    assert a.symbol.startswith("jk_launch_") and a.symbol != c.symbol


def test_instance_digest_covers_every_field_as_before():
    """params() is the instance's fields (shallow, for speed): the digest, hence every cache key, is what the
    deep dataclasses.asdict gave, for every candidate of the built-in CUDA families."""
    import dataclasses
    from jitkiln.family import Instance, canonical_json, sha256_hex
    n = 0
    for name in ("demo", "moe2stage"):
        fam = get_family(name)
        for variant in fam.variants():
            for inst in fam.candidates(variant):
                assert Instance.params(inst) == dataclasses.asdict(inst)
                want = {**dataclasses.asdict(inst), **inst.params()}
                assert inst.digest == sha256_hex("jitkiln-instance-v1", inst.family, inst.name, canonical_json(want))
                n += 1
    assert n > 20


def test_every_selection_is_a_candidate_and_render_exports_the_abi():
    fam = get_family("demo")
    for v in fam.variants():
        cands = {c.digest for c in fam.candidates(v)}
        for m in (1, 16, 17, 100, 511, 512, 4096):
            for n in (1, 64, 1000, 4096):
                inst = fam.select(v, {"m": m, "n": n, "k": 64})["gemm"]
                assert inst.digest in cands
        for c in fam.candidates(v):
            src = fam.render(c)
            assert c.symbol in src and f"jk_name_{c.digest[:16]}" in src
            assert "torch" not in src.lower()


def test_plan_json_contract(capsys, cache_dir):
    rc, out, _ = run_cli(capsys, "plan", "demo", "--json")
    assert rc == 0
    plan = json.loads(out)
    assert len(plan["module_key"]) == 64
    names = [i["name"] for i in plan["instances"]]
    assert names == ["demo_gemm_f32_8x64x16_t1x2", "demo_gemm_f32_32x32x16_t2x2", "demo_gemm_f32_64x64x8_t4x4"]
    assert all(len(i["key"]) == 64 for i in plan["instances"])
    assert [u["name"] for u in plan["unused"]] == ["demo_gemm_f32_16x16x16_t1x1"]
    reason = plan["unused"][0]["reason"]
    assert "chosen only when m > 16 and m*n <= 16384" in reason and "m in {8, 256, 1024}" in reason


def test_plan_follows_the_shapes(capsys, cache_dir):
    rc, out, _ = run_cli(capsys, "plan", "demo", "--shape", "m=4,n=100,k=8", "--shape", "m=8,n=10,k=8", "--json")
    plan = json.loads(out)
    assert [i["name"] for i in plan["instances"]] == ["demo_gemm_f32_8x64x16_t1x2"]
    assert len(plan["unused"]) == 3
    assert all("m in {4, 8}" in u["reason"] for u in plan["unused"])


def test_module_key_separates_full_reduced_variant_and_arch():
    fam = get_family("demo")
    probs = fam.default_problems("f32")
    keys = {
        make_plan(fam, "f32", probs).module_key,
        make_plan(fam, "f32", probs, full=True).module_key,
        make_plan(fam, "f64", probs).module_key,
        make_plan(fam, "f32", probs, arch="sm_80").module_key,
    }
    assert len(keys) == 4
    assert make_plan(fam, "f32", probs).module_key == make_plan(fam, "f32", list(reversed(probs))).module_key


def test_plan_table_is_readable(capsys, cache_dir):
    rc, out, _ = run_cli(capsys, "plan", "demo")
    assert rc == 0
    assert "planned instances (3)" in out and "unused candidates (1)" in out and "urgent" in out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "nosuch"], "unknown family 'nosuch'"),
    (["plan", "demo", "--variant", "bf99"], "unknown variant 'bf99'"),
    (["plan", "demo", "--shape", "m=1,q=2,k=3"], "unknown shape key 'q'"),
    (["plan", "demo", "--shape", "m=1,n=2"], "lacks k"),
    (["plan", "demo", "--shape", "m=x,n=2,k=3"], "not a valid int"),
    (["plan", "demo", "--shape", "garbage"], "bad --shape"),
    (["plan", "demo", "--tokens", "5-2"], "bad --tokens"),
    (["plan", "demo", "--tokens", "1-8"], "takes no --model/--tokens"),
])
def test_bad_input_exits_nonzero_with_one_line_reason(capsys, cache_dir, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    assert rc != 0
    first = err.splitlines()[0]
    assert first.startswith("jitkiln: error: ") and needle in first


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("plan", "build", "report", "cache", "doctor"):
        assert cmd in out


def test_parse_tokens():
    assert parse_tokens("1-8") == [1, 2, 4, 8]
    assert parse_tokens("3-20") == [3, 4, 8, 16, 20]
    assert parse_tokens("1,16,64") == [1, 16, 64]
    with pytest.raises(UsageError):
        parse_tokens("0-4")


class _Drifting(Demo):
    name = "drift"

    def select(self, variant, problem):
        return {"gemm": DemoGemm(variant, 128, 128, 8, 8, 8)}  # not a candidate


def test_dispatch_outside_the_candidates_is_refused():
    with pytest.raises(JitkilnError, match="not a candidate"):
        make_plan(_Drifting(), "f32", [{"m": 1, "n": 1, "k": 1}])
