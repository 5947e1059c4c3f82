"""FlashInfer front end: planning from FlashInfer's own files, the per-file content-addressed compile (shared with
the ``jitkiln flashinfer cc`` launcher), stubs for what a trimmed module does not build, and bad input."""
from __future__ import annotations

import ctypes
import json
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jitkiln.errors import UsageError
from jitkiln.flashinfer import link, objcache, planner
from jitkiln.store import Store

HAVE_FI = importlib.util.find_spec("flashinfer") is not None
CXX = shutil.which("c++") or shutil.which("g++")

GEN_BF16 = """#include "x.inl"
        INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16,
        void, EpilogueOpDefault, NONE, 128, 16, 64, 1, 1, 1, false, false, false, true);
"""
GEN_FP8 = """
        INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, __nv_fp8_e4m3, __nv_fp8_e4m3, __nv_bfloat16,
        void, EpilogueOpDefault, NONE, 128, 16, 64, 1, 1, 1, false, false, false, true);
"""
GEN_SM80 = """
            template void sm80_generic_fused_moe_gemm_kernelLauncher<cutlass::bfloat16_t, cutlass::bfloat16_t, 16, 128, 64, 2,
             tensorrt_llm::cutlass_extensions::EpilogueOpDefaultSilu>(int);
"""
GEN_ODD = "template void some_new_launcher<__nv_bfloat16>(int);\n"


def _tree(tmp_path: Path) -> tuple[list[str], Path, Path]:
    csrc, gen = tmp_path / "csrc", tmp_path / "gen"
    files = {
        csrc / "moe_gemm_kernels_bf16_bf16.cu": "template class MoeGemmRunner<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>;\n",
        csrc / "moe_gemm_kernels_fp8_fp8.cu": "template class MoeGemmRunner<__nv_fp8_e4m3, __nv_fp8_e4m3, __nv_bfloat16>;\n",
        csrc / "fp8_blockscale_gemm.cu": "// block scale\n",
        csrc / "binding.cu": "// binding\n",
        gen / "a.generated.cu": GEN_BF16,
        gen / "b.generated.cu": GEN_FP8,
        gen / "c.generated.cu": GEN_SM80,
        gen / "d.generated.cu": GEN_ODD,
    }
    for p, t in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(t)
    return [str(p) for p in files], csrc, gen


def _plan(tmp_path, dtype):
    srcs, csrc, gen = _tree(tmp_path)
    return planner.plan_files(srcs, lambda s: os.path.relpath(s, tmp_path),
                              lambda s: s.startswith(str(gen)), planner.parse_dtype(dtype), "m", "v")


def test_plan_bf16_keeps_bf16_files_and_says_why_for_the_rest(tmp_path):
    p = _plan(tmp_path, "bf16")
    need = {f.name for f in p.needed}
    assert need == {"csrc/moe_gemm_kernels_bf16_bf16.cu", "csrc/binding.cu", "gen/a.generated.cu",
                    "gen/c.generated.cu", "gen/d.generated.cu"}
    why = {f.name: f.reason for f in p.files}
    assert "cannot read" in why["gen/d.generated.cu"]  # an unreadable file is kept, never dropped
    assert "fp8xfp8->bf16" in why["gen/b.generated.cu"]
    assert "block-scaled" in why["csrc/fp8_blockscale_gemm.cu"]
    assert all(f.reason for f in p.left_out)


def test_plan_fp8_block_needs_no_generated_kernels(tmp_path):
    p = _plan(tmp_path, "fp8-block")
    need = {f.name for f in p.needed}
    assert "csrc/fp8_blockscale_gemm.cu" in need and "csrc/moe_gemm_kernels_fp8_fp8.cu" in need
    assert not any(n.startswith("gen/") and n != "gen/d.generated.cu" for n in need)


def test_plan_refuses_a_pair_flashinfer_lacks(tmp_path):
    with pytest.raises(UsageError, match="no sm90 fused-MoE kernels for activation fp16"):
        _plan(tmp_path, "act=fp16,weight=fp8,out=fp16")


@pytest.mark.parametrize("bad", ["bf17", "act=bf16,wieght=bf16", "act=int9", "act=bf16,quant=awq"])
def test_bad_dtype_is_one_line(bad):
    with pytest.raises(UsageError) as e:
        planner.parse_dtype(bad)
    assert "\n" not in e.value.reason


def test_model_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", '
                   '"weight_block_size": [128, 128]}}')
    d, why = planner.deployment_from_model(str(tmp_path))
    assert d.quant == "fp8-block" and d.act == "bf16"
    assert planner.deployment_from_model("Qwen/Qwen3-30B-A3B")[0] == planner.parse_dtype("bf16")
    with pytest.raises(UsageError, match="nor a known name") as e:
        planner.deployment_from_model("no-such-model")
    assert "kimi-k2" in e.value.hint


# --- the content-addressed compile ---------------------------------------------------------------------------
needs_cxx = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (c++/g++)")


def _project(root: Path) -> Path:
    (root / "inc").mkdir(parents=True, exist_ok=True)
    (root / "inc" / "h.h").write_text("inline int h() { return 41; }\n")
    (root / "a.cpp").write_text('#include "h.h"\nint f() { return h() + 1; }\n')
    return root


def _argv(root: Path, out: Path) -> list[str]:
    return [CXX, "-MMD", "-MF", str(out) + ".d", f"-I{root / 'inc'}", "-O2", "-fPIC", "-c", str(root / "a.cpp"),
            "-o", str(out)]


@needs_cxx
def test_same_command_compiles_once_and_survives_moves_and_mtimes(tmp_path):
    store = Store(tmp_path / "cache")
    a = _project(tmp_path / "one")
    o1 = objcache.compile_cached(_argv(a, tmp_path / "o1.o"), store)
    assert o1.status == "compiled" and (tmp_path / "o1.o").exists()
    assert "h.h" in (tmp_path / "o1.o.d").read_text()  # ninja's depfile written
    b = tmp_path / "elsewhere" / "two"
    shutil.copytree(a, b)
    os.utime(b / "inc" / "h.h", (1, 1))
    o2 = objcache.compile_cached(_argv(b, tmp_path / "o2.o"), store)
    assert o2.status == "hit" and o2.key == o1.key
    assert (tmp_path / "o2.o").read_bytes() == (tmp_path / "o1.o").read_bytes()
    (b / "inc" / "h.h").write_text("inline int h() { return 7; }\n")  # a header's content changes: a new entry
    o3 = objcache.compile_cached(_argv(b, tmp_path / "o3.o"), store)
    assert o3.status == "compiled" and o3.key != o1.key
    argv = _argv(b, tmp_path / "o4.o")
    argv.insert(-4, "-DX=1")  # a flag changes: a new unit
    assert objcache.compile_cached(argv, store).status == "compiled"


@needs_cxx
def test_a_second_machine_takes_each_file_from_the_shared_dir(tmp_path):
    """What `jitkiln flashinfer build` does on a seeded machine: every object from the fleet's shared directory
    (signed by the builder, checked here), none compiled; a tampered shared entry costs one compile."""
    pytest.importorskip("cryptography")
    from jitkiln.fleet.config import store_from_env
    from jitkiln.fleet.signing import generate_keypair
    key, pub, _ = generate_keypair(tmp_path / "k")
    env = {"JITKILN_SHARED_DIR": str(tmp_path / "shared"), "JITKILN_SIGNING_KEY": str(key),
           "JITKILN_TRUST_KEYS": str(pub)}
    a = _project(tmp_path / "src")
    o1 = objcache.compile_cached(_argv(a, tmp_path / "o1.o"), store_from_env(tmp_path / "m1", env))
    assert o1.status == "compiled"
    reader = dict(env)
    del reader["JITKILN_SIGNING_KEY"]  # the second machine only reads
    o2 = objcache.compile_cached(_argv(a, tmp_path / "o2.o"), store_from_env(tmp_path / "m2", reader))
    assert o2.status == "hit" and o2.key == o1.key
    assert (tmp_path / "o2.o").read_bytes() == (tmp_path / "o1.o").read_bytes()
    for f in (tmp_path / "shared").rglob("*"):  # flip a byte of every artifact in the shared dir
        if f.is_file() and f.stat().st_size > 64 and f.suffix not in (".json", ".sig"):
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0xFF
            f.write_bytes(bytes(b))
    o3 = objcache.compile_cached(_argv(a, tmp_path / "o3.o"), store_from_env(tmp_path / "m3", reader))
    assert o3.status == "compiled"
    assert (tmp_path / "o3.o").read_bytes() == (tmp_path / "o1.o").read_bytes()


@needs_cxx
def test_normalized_command_has_no_paths(tmp_path):
    a = _project(tmp_path / "p")
    cmd = objcache.Command.parse(_argv(a, tmp_path / "x.o"))
    norm = objcache.Command.normalized(cmd, None)
    assert not any(str(tmp_path) in x for x in norm)
    assert "-I<inc0>" in norm and "-O2" in norm


@needs_cxx
def test_launcher_hit_and_passthrough(tmp_path, capsys):
    from jitkiln.flashinfer import cc
    store = Store(tmp_path / "cache")
    a = _project(tmp_path / "p")
    assert cc.run(_argv(a, tmp_path / "x.o"), store=store, out=sys.stderr) == 0
    assert cc.run(_argv(a, tmp_path / "y.o"), store=store, out=sys.stderr) == 0
    err = capsys.readouterr().err
    assert "compiled" in err and "hit" in err
    assert (tmp_path / "x.o").read_bytes() == (tmp_path / "y.o").read_bytes()


@needs_cxx
def test_concurrent_processes_compile_once(tmp_path):
    a = _project(tmp_path / "p")
    env = dict(os.environ, JITKILN_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "jitkiln.flashinfer.cc", *_argv(a, tmp_path / f"o{i}.o")],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(" compiled " in o for o in outs) == 1, outs


# --- stubs --------------------------------------------------------------------------------------------------
@needs_cxx
def test_stubs_make_a_trimmed_library_load_now_and_throw(tmp_path):
    (tmp_path / "use.cpp").write_text(
        "#include <stdexcept>\n#include <cstring>\n#include <string>\n"
        "namespace tensorrt_llm { namespace kernels { struct Runner { virtual int go(); virtual ~Runner(); };\n"
        "int missing(int); } }\n"
        'extern "C" int call_missing(char* msg, int n) { try { return tensorrt_llm::kernels::missing(3); }\n'
        "  catch (std::exception const& e) { std::strncpy(msg, e.what(), n); return -1; } }\n"
        'extern "C" int make_runner() { auto* r = new tensorrt_llm::kernels::Runner(); (void)r; return 0; }\n'
        "int tensorrt_llm::kernels::Runner::go() { return 1; }\n")
    obj = tmp_path / "use.o"
    subprocess.run([CXX, "-fPIC", "-c", str(tmp_path / "use.cpp"), "-o", str(obj)], check=True)
    dest = tmp_path / "aot" / "m" / "m.so"
    info = link.link_module([str(obj)], [CXX, "-shared", "-o", "ignored.so"], str(dest), "m", "bf16",
                            workdir=str(tmp_path / "w"))
    assert info["stubbed"] >= 1 and not info["undefined_after"]
    assert not any("St" in s[:5] for s in info["stubbed_symbols"])  # never a libstdc++ symbol
    assert not [p for p in dest.parent.iterdir() if p.name.endswith(".tmp")]
    lib = ctypes.CDLL(str(dest), mode=os.RTLD_NOW | os.RTLD_LOCAL)
    buf = ctypes.create_string_buffer(512)
    assert lib.call_missing(buf, 511) == -1
    assert b"not built for this deployment" in buf.value and b"missing" in buf.value


def test_is_own_symbols():
    assert link.is_own("_ZN12tensorrt_llm7kernels15cutlass_kernels13MoeGemmRunnerIffffLb0EEC1Ev")
    assert not link.is_own("_ZNSt6thread6_StateD2Ev")
    assert not link.is_own("cudaMalloc")


# --- the installed FlashInfer ---------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_FI, reason="needs flashinfer-python 0.7.2.post1 (pip install --no-deps "
                                        "flashinfer-python==0.7.2.post1 apache-tvm-ffi)")
def test_installed_flashinfer_counts():
    from jitkiln.flashinfer import source
    src = source.load_module_source()
    assert src.name == "fused_moe_90" and len(src.sources) == 248
    bf16 = planner.plan_module(src, planner.parse_dtype("bf16")).to_json()["counts"]
    assert (bf16["needed"], bf16["generated_needed"], bf16["generated_total"]) == (31, 17, 220)
    assert planner.plan_module(src, planner.parse_dtype("fp8-block")).to_json()["counts"]["needed"] == 15


def test_unknown_version_and_missing_flashinfer(monkeypatch):
    from jitkiln.flashinfer import source
    with pytest.raises(UsageError, match="knows: 0.7.2.post1"):
        source.check_version("0.1.0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UsageError, match="not installed") as e:
        source.flashinfer_version()
    assert "pip install flashinfer-python" in e.value.hint


def test_cli_errors_are_one_line():
    from jitkiln.cli import main
    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = main(["flashinfer", "plan", "--dtype", "bf16", "--arch", "sm_100a"])
    assert rc == 2
    first = buf.getvalue().splitlines()[0]
    assert first.startswith("jitkiln: error: ") and "Traceback" not in buf.getvalue()


# --- signed module bundle: prebuild here, seed there ------------------------------------------------------------
def _fake_package(tmp_path: Path) -> Path:
    pkg = tmp_path / "site" / "flashinfer"
    (pkg / "data" / "csrc").mkdir(parents=True)
    (pkg / "data" / "csrc" / "binding.cu").write_text("// the binding\n")
    return pkg


def test_seed_checks_everything_before_installing(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    import hashlib
    from jitkiln.fleet import modbundle
    from jitkiln.fleet.signing import generate_keypair
    from jitkiln.flashinfer import bundle, source
    key, pub, _ = generate_keypair(tmp_path / "k")
    other, other_pub, _ = generate_keypair(tmp_path / "other")
    pkg = _fake_package(tmp_path)
    monkeypatch.setattr(source, "package_dir", lambda: pkg)
    monkeypatch.setattr(source, "flashinfer_version", lambda: "0.7.2.post1")
    monkeypatch.delenv("JITKILN_TRUST_KEYS", raising=False)
    so = b"\x7fELF" + os.urandom(4096)

    def make(name="b", version="0.7.2.post1", binding=None, signer=key, so_bytes=so):
        man = {"format": bundle.FORMAT, "version": bundle.VERSION, "module": "fused_moe_90", "flashinfer": version,
               "arch": "sm_90a", "deployment": {"act": "bf16"}, "side": {"files": 31},
               "sources": {"data/csrc/binding.cu": binding or hashlib.sha256(b"// the binding\n").hexdigest()}}
        return modbundle.write(tmp_path / name, man, "fused_moe_90.so", so_bytes, str(signer))

    target = pkg / "data" / "aot" / "fused_moe_90" / "fused_moe_90.so"
    good = make()
    with pytest.raises(modbundle.BundleRefused, match="no trusted keys"):
        bundle.seed(good)
    with pytest.raises(modbundle.BundleRefused, match="signature|trusted"):
        bundle.seed(make("signed-by-other", signer=other), [str(pub)])
    with pytest.raises(modbundle.BundleRefused, match="built for FlashInfer 0.6.0"):
        bundle.seed(make("old", version="0.6.0"), [str(pub)])
    with pytest.raises(modbundle.BundleRefused, match="binding.cu has other content"):
        bundle.seed(make("src", binding="0" * 64), [str(pub)])
    raw = bytearray(Path(good).read_bytes())  # flip a byte inside the module's tar member
    i = raw.index(so[100:132])
    raw[i] ^= 0xFF
    (tmp_path / "tampered").write_bytes(bytes(raw))
    with pytest.raises(modbundle.BundleRefused, match="signed digest"):
        bundle.seed(str(tmp_path / "tampered"), [str(pub)])
    assert not target.exists()  # nothing refused was written
    r = bundle.seed(good, [str(pub), str(other_pub)])
    assert r["installed"] == str(target) and target.read_bytes() == so
    assert json.loads(target.with_suffix(".jitkiln.json").read_text())["files"] == 31
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_seed_cli_is_one_line(tmp_path):
    from jitkiln.cli import main
    import io
    import contextlib
    (tmp_path / "junk").write_bytes(b"not a tar")
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = main(["flashinfer", "seed", str(tmp_path / "junk")])
    assert rc == 8
    assert buf.getvalue().startswith("jitkiln: error: ") and "Traceback" not in buf.getvalue()
