"""jitkiln.aiter: the AITER front end, run against AITER's real Python code (the installed amd-aiter wheel).

No GPU and no ROCm here: AITER's ``aiter.jit.core`` and ``aiter.ops.moe_op`` are imported for real (only the
package ``__init__``, which JIT-builds other modules, is skipped, and the pybind enum module ``aiter.ops.enum``
is replaced by Python enums with aiter_enum.h's values); ``hipcc``/``hipconfig`` are a recording fake that
writes its ``-o`` output. AITER's own ``build_module`` runs: it writes its ``build.ninja``, copies the ``.so``
to ``AITER_JIT_DIR`` and tries to import it (which fails on the fake bytes: expected). Each scenario runs in a
fresh interpreter (AITER keeps module-level state).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

aiter_spec = pytest.importorskip("importlib.util").find_spec("aiter")
if aiter_spec is None or aiter_spec.submodule_search_locations is None:
    pytest.skip("amd-aiter is not installed (pip install -e '.[test]')", allow_module_level=True)
AITER_PKG = Path(list(aiter_spec.submodule_search_locations)[0])
META = AITER_PKG.parent / "aiter_meta"
if not (META / "csrc" / "ck_gemm_moe_2stages_codegen" / "gen_instances.py").is_file():
    pytest.skip("the installed AITER has no aiter_meta sources", allow_module_level=True)
torch = pytest.importorskip("torch")
if not hasattr(torch, "float4_e2m1fn_x2"):
    pytest.skip("this torch has no float4_e2m1fn_x2", allow_module_level=True)

from jitkiln.aiter.tree import AiterHookError, check_tree, resolve_arch
from jitkiln.errors import JitkilnError

FAKE_HIPCC = r'''#!{python}
import json, os, sys
argv = sys.argv[1:]
log = os.environ.get("FAKE_HIPCC_LOG")
if log:
    with open(log, "a") as f:
        f.write(json.dumps({{"argv": argv, "exe": os.path.basename(sys.argv[0])}}) + "\n")
if "--version" in argv:
    print("HIP version: 7.2.41134-fake\nAMD clang version 20.0.0 (fake hipcc recorder)")
    sys.exit(0)
if "-E" in argv:
    sys.exit(0)
srcs = [a for a in argv if a.endswith((".cu", ".cpp", ".hip"))]
if "-o" in argv:
    with open(argv[argv.index("-o") + 1], "w") as f:
        f.write("fake artifact from " + " ".join(srcs) + "\n")
if "-MF" in argv:
    with open(argv[argv.index("-MF") + 1], "w") as f:
        f.write(argv[argv.index("-o") + 1] + ": " + " ".join(srcs) + "\n")
'''

AITER_IMPORT = r'''
import enum, importlib.util, json, os, sys, types
import torch
if getattr(torch.version, "hip", None) is None:
    torch.version.hip = "7.2.41134"   # optCompilerConfig.json evaluates torch.version.hip for ck2stages flags
spec = importlib.util.find_spec("aiter")
pkg = types.ModuleType("aiter")
pkg.__path__, pkg.__file__, pkg.__spec__ = list(spec.submodule_search_locations), spec.origin, spec
sys.modules["aiter"] = pkg            # AITER's package __init__ is skipped; its modules below are real


class ActivationType(enum.Enum):
    No = -1
    Silu = 0
    Gelu = 1
    Swiglu = 2


class QuantType(enum.Enum):
    No = 0
    per_Tensor = 1
    per_Token = 2
    per_1x32 = 3
    per_1x128 = 4
    per_128x128 = 5


en = types.ModuleType("aiter.ops.enum")
en.ActivationType, en.QuantType, en.Enum = ActivationType, QuantType, int
import aiter.ops
sys.modules["aiter.ops.enum"] = en
import aiter.jit.core as core
import aiter.ops.moe_op as moe_op

RECORD = []
_real_build = core.build_module
def recording_build_module(md_name, srcs, flags_extra_cc, flags_extra_hip, blob_gen_cmd, *a, **k):
    RECORD.append({"md_name": md_name, "blob_gen_cmd": blob_gen_cmd})
    if os.environ.get("STOP_BEFORE_BUILD"):
        raise RuntimeError("STOP_BEFORE_BUILD")
    return _real_build(md_name, srcs, flags_extra_cc, flags_extra_hip, blob_gen_cmd, *a, **k)
core.build_module = recording_build_module

fp4 = torch.float4_e2m1fn_x2


def call(stage, inter_dim, block_m, kernel=""):
    E, D, T = 2, 256, 4
    x = torch.zeros(T, (D if stage == 1 else inter_dim) // 2, dtype=torch.uint8).view(fp4)
    w1 = torch.zeros(E, 2 * inter_dim, D // 2, dtype=torch.uint8).view(fp4); w1.is_shuffled = True
    w2 = torch.zeros(E, D, inter_dim // 2, dtype=torch.uint8).view(fp4); w2.is_shuffled = True
    ids = torch.zeros(64, dtype=torch.int32)
    out = torch.zeros(T, 1, inter_dim, dtype=torch.bfloat16)
    sw = None if stage == 1 else torch.zeros(64, dtype=torch.float32)   # a4w4: routed weight in stage 2
    fn = moe_op.ck_moe_stage1 if stage == 1 else moe_op.ck_moe_stage2
    try:
        fn(x, w1, w2, ids, ids, ids, out, 1, kernel, None, None, block_m, sw,
           QuantType.per_1x32.value, ActivationType.Silu.value)
        return "returned"
    except BaseException as e:   # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def done(**kw):
    import jitkiln.aiter as ja
    kw.update(record=RECORD, status=ja.status(), meta_dir=core.AITER_META_DIR, jit_dir=core.get_user_jit_dir())
    print("RESULT " + json.dumps(kw, default=str))
'''


@pytest.fixture
def aiter_env(tmp_path):
    """Environment for a driver process: fake ROCm first on PATH, GPU_ARCHS=gfx950, private JIT and cache dirs."""
    rocm = tmp_path / "rocm" / "bin"
    rocm.mkdir(parents=True)
    (rocm / "hipcc").write_text(FAKE_HIPCC.format(python=sys.executable))
    (rocm / "hipconfig").write_text("#!/bin/sh\necho 7.2.41134-fake\n")
    for f in rocm.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AITER_", "JITKILN_", "GPU_ARCHS"))}
    env.update(PATH=f"{rocm}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
               ROCM_HOME=str(rocm.parent), GPU_ARCHS="gfx950", AITER_JIT_DIR=str(tmp_path / "jit"),
               JITKILN_CACHE_DIR=str(tmp_path / "cache"), FAKE_HIPCC_LOG=str(tmp_path / "hipcc.jsonl"),
               CXX=str(rocm / "hipcc"), MAX_JOBS="2", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return env


def run_driver(tmp_path, env, body: str, name="driver.py"):
    script = tmp_path / name
    script.write_text(AITER_IMPORT + "\n" + textwrap.dedent(body))
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"driver failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def compiles(env) -> list[dict]:
    log = Path(env["FAKE_HIPCC_LOG"])
    out = []
    if log.is_file():
        for line in log.read_text().splitlines():
            argv = json.loads(line)["argv"]
            if "-c" in argv:
                out.append({"src": Path([a for a in argv if a.endswith(".cu")][0]).name, "argv": argv})
    return out


STOCK = "module_moe_ck2stages_fp4x2_fp4x2_preshuffle_on_b16_silu_per_1x32_mulWeightStage2"


# --- (a) planned shape: distinct md_name, jitkiln's blob command on AITER's own tree, only planned instances ---

def test_planned_shape_builds_reduced_module_under_its_own_name(tmp_path, aiter_env):
    r = run_driver(tmp_path, aiter_env, """
        import jitkiln.aiter as ja
        ja.enable(shapes=["inter_dim=1024,block_m=128"], arch="gfx950")
        s1 = call(1, 1024, 128)
        s2 = call(2, 1024, 128)
        done(s1=s1, s2=s2)
    """)
    st = r["status"]
    md = f"{STOCK}_{st['suffix']}"
    assert st["suffix"] == "jk" + st["module_key"][:12]
    # AITER was asked to build exactly once, under the distinct name, with jitkiln's blob command
    assert [x["md_name"] for x in r["record"]] == [md]
    cmd = r["record"][0]["blob_gen_cmd"]
    assert len(cmd) == 1 and cmd[0].startswith("-m jitkiln.aiter.blobcmd --spec ") and cmd[0].endswith("-w {}")
    spec = json.loads(Path(cmd[0].split()[3]).read_text())
    assert Path(spec["aiter_root"]) == Path(r["meta_dir"]).resolve()  # the tree AITER itself runs from
    # the .so is where AITER's loader looks; importing the fake bytes is the only failure
    assert (Path(aiter_env["AITER_JIT_DIR"]) / f"{md}.so").is_file()
    assert "ImportError" in r["s1"] and md in r["s1"]
    assert r["s2"].startswith("ImportError")  # stage 2 asks for the same (cached) module name
    # the recording hipcc compiled only the planned instances plus AITER's two support units
    srcs = sorted(c["src"] for c in compiles(aiter_env))
    inst = [s for s in srcs if s.startswith("moe_ck2stages_gemm")]
    assert sorted(s[:-3] for s in inst) == sorted(st["instances"])
    assert len(inst) == 2 and not [s for s in srcs if "gemm2_64x" in s]
    assert [s for s in srcs if not s.startswith("moe_ck2stages_gemm")] == ["gemm_moe_ck2stages.cu",
                                                                           "moe_ck_2stages_pybind.cu"]
    # with AITER's flags from AITER's own build.ninja
    argv = " ".join(compiles(aiter_env)[0]["argv"])
    for flag in ("--offload-arch=gfx950", "-D__Float4_e2m1fn_x2", "--amdgpu-kernarg-preload-count=16",
                 f"/build/{md}/blob", "-fgpu-flush-denormals-to-zero"):
        assert flag in argv, flag
    blob = Path(aiter_env["AITER_JIT_DIR"]) / "build" / md / "blob"
    assert sorted(p.stem for p in (blob / "instances").glob("*.cu")) == sorted(st["instances"])

    # a second machine sharing the cache (fresh AITER JIT dir): no instance compiles again
    log = Path(aiter_env["FAKE_HIPCC_LOG"])
    log.unlink()
    env2 = dict(aiter_env, AITER_JIT_DIR=str(tmp_path / "jit2"))
    r2 = run_driver(tmp_path, env2, """
        import jitkiln.aiter as ja
        ja.enable(shapes=["inter_dim=1024,block_m=128"], arch="gfx950")
        done(s1=call(1, 1024, 128))
    """, name="driver2.py")
    assert "ImportError" in r2["s1"]
    assert compiles(env2) == []  # every object (instances and support units) came from jitkiln's cache
    built = json.loads((tmp_path / "jit2" / "build" / md / "build" / "jitkiln_build.json").read_text())
    assert len(built["cache_hits"]) == 4 and built["compiled"] == []


def test_plan_from_env_var_and_disable(tmp_path, aiter_env):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"shapes": ["inter_dim=1024,block_m=128"], "arch": "gfx950", "policy": "error"}))
    env = dict(aiter_env, JITKILN_AITER_PLAN=str(plan), STOP_BEFORE_BUILD="1")
    r = run_driver(tmp_path, env, """
        import jitkiln.aiter as ja
        ja.enable()
        a = call(2, 1024, 128)
        pol = ja.status()["policy"]
        ja.disable()
        b = call(2, 1024, 128)
        done(a=a, b=b, pol=pol)
    """)
    assert r["pol"] == "error"
    assert r["record"][0]["md_name"].startswith(STOCK + "_jk")
    assert r["record"][1]["md_name"] == STOCK  # after disable(): AITER unchanged
    assert compiles(env) == []


# --- (b) shapes outside the plan follow the policy ---------------------------------------------------------

def test_unplanned_shape_policy_full_uses_aiters_full_module(tmp_path, aiter_env):
    env = dict(aiter_env, STOP_BEFORE_BUILD="1")
    r = run_driver(tmp_path, env, """
        import jitkiln.aiter as ja
        ja.enable(shapes=["inter_dim=1024,block_m=128"], arch="gfx950")   # default policy: full
        done(s=call(2, 256, 32))
    """)
    assert [x["md_name"] for x in r["record"]] == [STOCK]
    cmd = r["record"][0]["blob_gen_cmd"][0]
    assert "gen_instances.py" in cmd and "jitkiln" not in cmd


def test_unplanned_shape_policy_error_fails_fast_with_one_line(tmp_path, aiter_env):
    r = run_driver(tmp_path, aiter_env, """
        import jitkiln.aiter as ja
        ja.enable(shapes=["inter_dim=1024,block_m=128"], arch="gfx950", policy="error")
        done(s=call(2, 256, 32), planned=None)
    """)
    assert r["record"] == []  # AITER never got to build anything
    assert r["s"].startswith("AiterHookError: jitkiln.aiter (policy 'error'): stage-2 call with block_m=32, "
                             "inter_dim=256 needs moe_ck2stages_gemm2_64x")
    assert compiles(aiter_env) == []


def test_gen_func_alone_sees_the_shape(tmp_path, aiter_env):
    """Inside a torch.compile'd graph only AITER's custom op runs (no Python wrapper around it): the hook then
    reads the shape from AITER's own gen_func (cmdGenFunc_ck_moe_stage*), which compile_ops calls with the args."""
    r = run_driver(tmp_path, aiter_env, """
        import jitkiln.aiter as ja
        ja.enable(shapes=["inter_dim=1024,block_m=128"], arch="gfx950", policy="error")
        I, D = 1024, 256
        x = torch.zeros(4, I // 2, dtype=torch.uint8).view(fp4)
        w1 = torch.zeros(2, 2 * I, D // 2, dtype=torch.uint8).view(fp4); w1.is_shuffled = True
        w2 = torch.zeros(2, D, I // 2, dtype=torch.uint8).view(fp4)
        ids = torch.zeros(8, dtype=torch.int32); sw = torch.zeros(8)
        out = torch.zeros(4, D, dtype=torch.bfloat16)
        planned = moe_op.cmdGenFunc_ck_moe_stage2(x, w1, w2, ids, ids, ids, out, 1, "", None, None, 128, sw,
                                                  3, 0, is_shuffled=True) if "is_shuffled" in \
            moe_op.cmdGenFunc_ck_moe_stage2.__code__.co_varnames else \
            moe_op.cmdGenFunc_ck_moe_stage2(x, w1, w2, ids, ids, ids, out, 1, "", None, None, 128, sw, 3, 0)
        try:
            moe_op.cmdGenFunc_ck_moe_stage2(x[:, :128], w1, w2, ids, ids, ids, out, 1, "", None, None, 32, sw, 3, 0)
            other = "no error"
        except Exception as e:
            other = type(e).__name__ + ": " + str(e)
        done(planned=planned, other=other)
    """)
    assert r["planned"]["md_name"] == f"{STOCK}_{r['status']['suffix']}"
    assert "inter_dim=256" in r["other"] and r["other"].startswith("AiterHookError")


# --- (c) a mismatched dispatch signature / generator failure stops with jitkiln's reason -------------------

def _copy_tree(dst: Path) -> Path:
    """A develop-layout AITER tree (csrc/ beside aiter/jit/utils, which the generator imports chip_info from)."""
    for sub in ("csrc/ck_gemm_moe_2stages_codegen", "csrc/include", "csrc/pybind"):
        shutil.copytree(META / sub, dst / sub)
    shutil.copytree(AITER_PKG / "jit" / "utils", dst / "aiter" / "jit" / "utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_mismatched_dispatch_signature_is_refused_before_any_compile(tmp_path):
    root = _copy_tree(tmp_path / "aiter_tree")
    cu = root / "csrc" / "ck_gemm_moe_2stages_codegen" / "gemm_moe_ck2stages.cu"
    text = cu.read_text()
    # what a newer caller does: pass one more argument (is_shuffled) than this generator's dispatch takes
    cu.write_text(text.replace("quant_type, mul_routed_weight);", "quant_type, mul_routed_weight, is_shuffled);"))
    with pytest.raises(AiterHookError) as ei:
        check_tree(root, "a4w4", "gfx950")
    msg = str(ei.value)
    assert "\n" not in msg and "dispatch takes" in msg and "passes" in msg


def test_tree_mismatch_at_enable_stops_before_aiter_builds(tmp_path, aiter_env):
    root = _copy_tree(tmp_path / "aiter_tree")
    cu = root / "csrc" / "ck_gemm_moe_2stages_codegen" / "gemm_moe_ck2stages.cu"
    cu.write_text(cu.read_text().replace("quant_type, mul_routed_weight);",
                                         "quant_type, mul_routed_weight, is_shuffled);"))
    r = run_driver(tmp_path, aiter_env, f"""
        import jitkiln.aiter as ja
        core.AITER_META_DIR = {str(root)!r}          # AITER running from a tree jitkiln does not match
        try:
            ja.enable(shapes=["inter_dim=1024,block_m=128"], arch="gfx950")
            e = "enabled"
        except Exception as ex:
            e = type(ex).__name__ + ": " + str(ex)
        done(e=e, s=call(1, 1024, 128) if e == "enabled" else "")
    """)
    assert r["e"].startswith("AiterHookError: AITER tree ") and "\n" not in r["e"]
    assert compiles(aiter_env) == []


GEN_FAIL_DRIVER = """
import jitkiln.aiter as ja
root = {root!r}
core.AITER_META_DIR, core.AITER_CSRC_DIR, moe_op.AITER_CSRC_DIR = root, root + "/csrc", root + "/csrc"
ja.enable(shapes=["inter_dim=1024,block_m=128"], arch="gfx950")
open({victim!r}, "w").write("raise SystemExit('generator exploded')\\n")   # the tree breaks under the process
done(s=call(1, 1024, 128))
"""


@pytest.mark.parametrize("victim", ["generator", "helper"])
def test_generator_failure_stops_the_build_with_one_line(tmp_path, aiter_env, victim):
    root = _copy_tree(tmp_path / "aiter_tree")
    if victim == "generator":  # the generator itself changed: the build guard's preflight refuses it
        path = root / "csrc" / "ck_gemm_moe_2stages_codegen" / "gen_instances.py"
        expect = "now gives module key"
    else:  # a module the generator imports breaks: only AITER's os.system blob step fails (exit status ignored)
        path = root / "aiter" / "jit" / "utils" / "chip_info.py"
        expect = "AITER's generator failed"
    r = run_driver(tmp_path, aiter_env, GEN_FAIL_DRIVER.format(root=str(root), victim=str(path)))
    assert r["s"].startswith("AiterHookError: ") and expect in r["s"] and "\n" not in r["s"], r["s"]
    assert compiles(aiter_env) == []  # nothing compiled: no silently empty module
    md = f"{STOCK}_{r['status']['suffix']}"
    assert not (Path(aiter_env["AITER_JIT_DIR"]) / f"{md}.so").exists()
    # the preflight refuses before AITER's build_module runs; a blob-step failure stops it inside
    assert [x["md_name"] for x in r["record"]] == ([] if victim == "generator" else [md])


def test_blob_command_failure_leaves_no_blob_and_one_line(tmp_path):
    out = tmp_path / "blob"
    (out / "instances").mkdir(parents=True)
    (out / "instances" / "stale.cu").write_text("x")
    p = subprocess.run([sys.executable, "-m", "jitkiln.aiter.blobcmd", "--spec", str(tmp_path / "nope.json"),
                        "-w", str(out)], capture_output=True, text=True)
    assert p.returncode != 0
    assert p.stderr.splitlines()[0].startswith("jitkiln: cannot read jitkiln AITER spec")
    assert not list(out.rglob("*.cu")) and (out / "jitkiln_blob_error.txt").is_file()


# --- (d) GPU_ARCHS=native -------------------------------------------------------------------------------------

def test_native_arch_without_gpu_needs_an_explicit_arch(monkeypatch, tmp_path):
    monkeypatch.delenv("JITKILN_ARCH", raising=False)
    monkeypatch.setenv("GPU_ARCHS", "native")
    monkeypatch.setenv("PATH", str(tmp_path))  # no rocminfo
    monkeypatch.setenv("ROCM_PATH", str(tmp_path))
    monkeypatch.setattr("jitkiln.aiter.tree.glob.glob", lambda pat: [])  # no KFD GPU node
    with pytest.raises(AiterHookError) as ei:
        resolve_arch()
    assert "native" in str(ei.value) and "JITKILN_ARCH" in ei.value.hint
    monkeypatch.delenv("GPU_ARCHS")  # unset is AITER's default 'native' too
    with pytest.raises(AiterHookError):
        resolve_arch()
    assert resolve_arch("gfx942") == "gfx942"
    monkeypatch.setenv("JITKILN_ARCH", "gfx950")
    assert resolve_arch() == "gfx950"


def test_native_arch_is_resolved_from_the_gpu(monkeypatch, tmp_path):
    ri = tmp_path / "rocminfo"
    ri.write_text("#!/bin/sh\necho '  Name:                    AMD EPYC'\necho '  Name:                    gfx950'\n")
    ri.chmod(0o755)
    monkeypatch.delenv("JITKILN_ARCH", raising=False)
    monkeypatch.setenv("GPU_ARCHS", "native")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert resolve_arch() == "gfx950"
    monkeypatch.setenv("GPU_ARCHS", "gfx942;gfx950")  # AITER's rule: the last entry
    assert resolve_arch() == "gfx950"
    monkeypatch.setenv("GPU_ARCHS", "gfx1100")
    with pytest.raises(AiterHookError):
        resolve_arch()


# --- (e) tuned rows naming non-CK kernels -------------------------------------------------------------------

def _kimi_rows(tmp_path, rows):
    from jitkiln.families.ck2stages import fmoe
    from jitkiln.families.ck2stages.variants import VARIANTS
    dims = fmoe.model_shapes("kimi-k2", 4, 1)
    key = VARIANTS["a4w4"].csv_key("gfx950")
    cols = list(fmoe.KEY_COLS) + ["block_m", "ksplit", "kernelName1", "kernelName2", "run_1stage", "us"]
    lines = [",".join(cols)]
    for token, bm, k1, k2 in rows:
        vals = {"cu_num": 256, "token": token, **dims, **key, "use_g1u1": 1, "block_m": bm, "ksplit": 0,
                "kernelName1": k1, "kernelName2": k2, "run_1stage": 0, "us": 1.0}
        lines.append(",".join(str(vals[c]) for c in cols))
    p = tmp_path / "tuned_fmoe.csv"
    p.write_text("\n".join(lines) + "\n")
    return p, dims


def test_tuned_rows_with_flydsl_and_cktile_kernels_plan_without_error(tmp_path, monkeypatch):
    from jitkiln.aiter.planner import AiterCK2Stages, make_spec
    from jitkiln.families.ck2stages.family import CK2Stages
    g2 = ("moe_ck2stages_gemm2_256x64x128x128_1x4_MulABScaleExpertWeight_v3_Nswizzle0_Quant3_MulRoutedWeight1_"
          "FP4X2_FP4X2_B16")
    csv, dims = _kimi_rows(tmp_path, [
        (16, 16, "flydsl_moe1_afp4_wfp4_bf16_t16x128x256_w2_fp4", "cktile_moe2_16x128"),
        (32, 16, "flydsl_mxmoe_g1_BM16_fake", "flydsl_mxmoe_g2_BM16_fake"),
        (512, 64, "flydsl_moe1_afp4_wfp4_bf16_t64x128x256_w3_fp4", g2),
    ])
    monkeypatch.setenv("AITER_CONFIG_FMOE", str(csv))
    monkeypatch.setenv("CU_NUM", "256")
    plan = {"model": "kimi-k2", "tp": 4, "tokens": "16,32,512"}
    base = CK2Stages(arch="gfx950")  # the family alone takes the FlyDSL names for missing CK names
    with pytest.raises(JitkilnError, match="block_m=16"):
        for p in base.problems("a4w4", model="kimi-k2", tp=4, tokens=[16, 32, 512]):
            base.select("a4w4", p)
    fam = AiterCK2Stages(arch="gfx950")
    spec = make_spec(fam, "a4w4", plan)
    # token 16: FlyDSL stage 1 + ck-tile stage 2; token 32: the MXFP4 port: no ck2stages at all;
    # token 512: FlyDSL stage 1, AITER's CK stage 2 named by the row
    assert spec.instances == [g2]
    res = fam._resolve("a4w4", {"token": 16, **dims})
    assert res.stages == () and "ck-tile" in res.why and "FlyDSL" in res.why


# --- prebuild -> signed bundle -> seed on another machine ------------------------------------------------

def test_prebuild_bundle_and_seed(tmp_path, aiter_env):
    from jitkiln.fleet.signing import generate_keypair
    key = tmp_path / "builder.key"
    generate_keypair(key)
    bundle = tmp_path / "kimi.jkab"
    r = run_driver(tmp_path, aiter_env, f"""
        from jitkiln.aiter.prebuild import prebuild
        try:
            out = prebuild({{"shapes": ["inter_dim=1024,block_m=128"]}}, arch="gfx950", out={str(bundle)!r},
                           key={str(key)!r})
        except Exception as e:
            out = {{"error": type(e).__name__ + ": " + str(e)}}
        done(out=out)
    """)
    out = r["out"]
    assert "error" not in out, out
    md = out["md_name"]
    assert md.startswith(STOCK + "_jk") and Path(out["so"]).is_file()
    assert [x["md_name"] for x in r["record"]] == [md]
    # seed into another machine's AITER JIT folder (same AITER wheel, trusted key)
    from jitkiln.aiter.prebuild import BundleRefused, seed
    dest = tmp_path / "other_jit"
    with pytest.raises(BundleRefused, match="trusted"):
        seed(str(bundle), arch="gfx950", dest_dir=str(dest))
    got = seed(str(bundle), trust_paths=[str(key) + ".pub"], arch="gfx950", dest_dir=str(dest))
    assert Path(got["installed"]).read_bytes() == Path(out["so"]).read_bytes()
    assert Path(got["installed"]).name == f"{md}.so"
    assert json.loads(Path(got["plan"]).read_text())["arch"] == "gfx950"
    with pytest.raises(BundleRefused, match="gfx950"):
        seed(str(bundle), trust_paths=[str(key) + ".pub"], arch="gfx942", dest_dir=str(dest))
    # a tampered bundle is refused before anything is written
    import tarfile
    bad = tmp_path / "bad.jkab"
    with tarfile.open(bundle) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".so"):
                data = data + b"x"
                m.size = len(data)
            import io
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(BundleRefused, match="digest"):
        seed(str(bad), trust_paths=[str(key) + ".pub"], arch="gfx950", dest_dir=str(tmp_path / "third"))
    assert not (tmp_path / "third").exists()


def test_add_cli_registers_the_aiter_subcommands():
    import argparse

    from jitkiln.aiter.cli import add_cli
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers(dest="cmd"))
    a = ap.parse_args(["aiter", "prebuild", "--model", "kimi-k2", "--tp", "4", "--arch", "gfx950", "-o", "b"])
    assert a.fn.__name__ == "cmd_prebuild" and a.tp == 4 and a.out == "b"
    a = ap.parse_args(["aiter", "seed", "b.jkab", "--arch", "gfx950"])
    assert a.fn.__name__ == "cmd_seed"
