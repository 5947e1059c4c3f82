#!/usr/bin/env python3
"""AITER issue #3566 side by side: stock AITER JIT build of the a4w4 ck2stages module vs jitkiln.aiter.

    python bench/aiter_coldstart.py [--tag 2cores] [--only a,b,c,d,t,e] [--work DIR]

One process runs every scenario in fresh interpreters, back to back, with the SAME compiler for both sides:
Debian ROCm 7.2 ``hipcc`` in the chroot ``/opt/jitkiln-rocm`` (bwrap), reached through a plain wrapper at
``$ROCM_HOME/bin/hipcc`` (this script, ``--hipcc-wrapper``: maps paths, runs the command once, caches nothing).
AITER's real Python build code runs (``aiter.jit.core.build_module``, its ``cpp_extension`` ninja writer; only
the package ``__init__`` is skipped, as in tests/test_aiter_frontend.py).

* (a) ``stock``: AITER's ``build_module`` of ``module_moe_ck2stages_fp4x2_fp4x2_preshuffle_on_b16_silu_per_1x32_
  mulWeightStage2`` for gfx950 (every instance AITER's generator writes, AITER's ninja, MAX_JOBS = cores).
* (b) ``cold``: ``jitkiln.aiter.enable(shapes=["inter_dim=1024,block_m=128"])`` then the same ``build_module``
  call AITER's ``compile_ops`` makes (``jitkiln.aiter.prebuild.build``), empty jitkiln cache, empty AITER JIT dir;
  (t) the same for ``--model kimi-k2 --tp 2 --tokens 1-8192``.
* (c) ``warm``: a fresh process, warm cache: (c1) a second rank (the ``.so`` is in AITER's JIT dir) and (c2) a
  second machine (empty AITER JIT dir, shared jitkiln cache), with where the time goes.
* (d) ``seeded``: ``prebuild`` to a signed bundle, then ``jitkiln aiter seed BUNDLE --trust K.pub`` (timed CLI).
* (e) the critical instance ``gemm1_256x128x128x128`` alone: one-shot ``hipcc -shared`` vs jitkiln's split mode
  (device half beside host half), AITER's flags, .so sha256 compared.

AITER's dispatch unit ``gemm_moe_ck2stages.cu`` cannot compile here (it includes ``ATen/hip/HIPContext.h``, only
in a ROCm build of PyTorch): it is removed from BOTH ``build.ninja`` files (its compile edge and its object in
the link) by the same wrapper of ``_run_ninja_build``, before AITER's ninja / jitkiln's object cache runs them.
Writes ``bench/results/aiter-coldstart-<tag>.json`` after every scenario (a partial file survives a timeout).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROOT = os.environ.get("JITKILN_ROCM_CHROOT", "/opt/jitkiln-rocm")
STOCK_MD = "module_moe_ck2stages_fp4x2_fp4x2_preshuffle_on_b16_silu_per_1x32_mulWeightStage2"
DISPATCH = "gemm_moe_ck2stages"
CRITICAL = "moe_ck2stages_gemm1_256x128x128x128"
SHAPE = "inter_dim=1024,block_m=128"


# --- the plain hipcc wrapper: the chroot hipcc, path-mapped, run once (no cache) ---------------------------

def hipcc_wrapper(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from jitkiln.compilers.hipcc import ChrootRunner
    r = ChrootRunner(CHROOT, shutil.which("bwrap") or "/usr/bin/bwrap")

    def inside(p: str) -> str:
        return p if p.startswith("/dev/") else r.inside(p)

    cwd = os.getcwd()
    if os.environ.get("BENCH_DRY") and "-c" in argv:  # pipeline check only: compile an empty unit instead
        empty = os.path.join(cwd, "bench_dry_empty.cu")
        Path(empty).write_text("")
        argv = [empty if a.endswith(".cu") else a for a in argv]
    ro, rw, out = [], [cwd], ["/usr/bin/hipcc"]
    prev = ""
    for a in argv:
        if prev in ("-o", "-MF"):
            d = os.path.dirname(os.path.abspath(a))
            if not d.startswith("/dev"):
                rw.append(d)
            out.append(inside(os.path.abspath(a)))
        elif prev in ("-isystem", "-I", "-L"):
            ro.append(a)
            out.append(inside(a))
        elif a[:2] in ("-I", "-L") and len(a) > 2 and a[2] == "/":
            ro.append(a[2:])
            out.append(a[:2] + inside(a[2:]))
        elif a.startswith("/") and not a.startswith("/dev/"):
            if os.path.exists(a):
                ro.append(a if os.path.isdir(a) else os.path.dirname(a))
            out.append(inside(a))
        elif a.startswith("-Wl,-rpath,"):
            out.append(a)
        else:
            out.append(a)
        prev = a
    full = r.wrap(out, rw=rw, ro=ro, cwd=cwd)
    return subprocess.run(full, cwd=cwd).returncode


# --- helpers -------------------------------------------------------------------------------------------------

def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def ninja_log(build_dir: Path) -> list[dict]:
    rows = []
    f = build_dir / ".ninja_log"
    if not f.is_file():
        return rows
    for line in f.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        p = line.split("\t")
        rows.append({"out": p[3], "start_s": int(p[0]) / 1000, "end_s": int(p[1]) / 1000,
                     "duration_s": round((int(p[1]) - int(p[0])) / 1000, 3)})
    return sorted(rows, key=lambda r: -r["duration_s"])


AITER_IMPORT = r'''
import enum, hashlib, importlib.util, json, os, sys, time, types
T_START = time.perf_counter()
import torch
if getattr(torch.version, "hip", None) is None:
    torch.version.hip = "7.2.41134"   # optCompilerConfig.json evaluates torch.version.hip for ck2stages flags
spec = importlib.util.find_spec("aiter")
pkg = types.ModuleType("aiter")
pkg.__path__, pkg.__file__, pkg.__spec__ = list(spec.submodule_search_locations), spec.origin, spec
sys.modules["aiter"] = pkg            # AITER's package __init__ is skipped; its modules below are real
class ActivationType(enum.Enum):
    No = -1; Silu = 0; Gelu = 1; Swiglu = 2
class QuantType(enum.Enum):
    No = 0; per_Tensor = 1; per_Token = 2; per_1x32 = 3; per_1x128 = 4; per_128x128 = 5
en = types.ModuleType("aiter.ops.enum")
en.ActivationType, en.QuantType, en.Enum = ActivationType, QuantType, int
import aiter.ops
sys.modules["aiter.ops.enum"] = en
import aiter.jit.core as core
import aiter.ops.moe_op as moe_op
cpp_ext = sys.modules[core._jit_compile.__module__]
T_IMPORTED = time.perf_counter()
OUT = {"aiter_import_s": round(T_IMPORTED - T_START, 3)}

# time AITER's own per-build Python work (flag probes run hipcc once per flag)
_fc = core.hip_flag_checker
FLAGS = {"n": 0, "s": 0.0, "dropped": []}
def hip_flag_checker(flag):
    t = time.perf_counter(); ok = _fc(flag)
    FLAGS["n"] += 1; FLAGS["s"] += time.perf_counter() - t
    if not ok: FLAGS["dropped"].append(flag)
    return ok
core.hip_flag_checker = hip_flag_checker

# AITER's check_and_set_ninja_worker caps MAX_JOBS at int(0.8 * cores) (= 1 on 2 cores); the benchmark runs
# both sides with MAX_JOBS = cores (jitkiln's object cache reads the same MAX_JOBS)
_cs = core.check_and_set_ninja_worker
def check_and_set_ninja_worker():
    _cs(); OUT["aiter_max_jobs_clamp"] = os.environ.get("MAX_JOBS"); os.environ["MAX_JOBS"] = str(os.cpu_count())
core.check_and_set_ninja_worker = check_and_set_ninja_worker
_gw = cpp_ext._get_num_workers       # the same cap again where AITER's cpp_extension picks ninja's -j
cpp_ext._get_num_workers = lambda verbose: os.cpu_count()

EXCLUDED = []
def exclude_dispatch_unit():
    """Wrap (outermost) _run_ninja_build: remove gemm_moe_ck2stages.cu's compile edge and object from build.ninja."""
    inner = cpp_ext._run_ninja_build
    def _run_ninja_build(build_directory, verbose, error_prefix):
        p = os.path.join(build_directory, "build.ninja")
        lines = open(p).read().splitlines()
        keep = []
        for ln in lines:
            if ln.startswith("build ") and ln.split(":")[0].strip().endswith("DISPATCH.cuda.o"):
                EXCLUDED.append(ln[:200]); continue
            keep.append(ln.replace(" DISPATCH.cuda.o", ""))
        open(p, "w").write("\n".join(keep) + "\n")
        NINJA["t0"] = time.perf_counter()
        try:
            return inner(build_directory, verbose, error_prefix)
        finally:
            NINJA["s"] = time.perf_counter() - NINJA["t0"]
    cpp_ext._run_ninja_build = _run_ninja_build
NINJA = {}

def stock_args(md=None, blob_cmd=None):
    orig = getattr(moe_op.get_moe_stage_module, "_jitkiln_original", moe_op.get_moe_stage_module)
    orig = getattr(orig, "__wrapped__", orig)
    md0, cmd = orig(torch.float4_e2m1fn_x2, torch.float4_e2m1fn_x2, torch.bfloat16, ActivationType.Silu,
                    QuantType.per_1x32, 2, True)
    d = core.get_args_of_build("module_moe_ck2stages")
    d.update(md_name=md or md0, blob_gen_cmd=blob_cmd or cmd)
    return d

def run_build_module(d):
    core.build_module(d["md_name"], d["srcs"], d["flags_extra_cc"], d["flags_extra_hip"], d["blob_gen_cmd"],
                      d["extra_include"], d["extra_ldflags"], False, d["is_python_module"], d["is_standalone"],
                      d["torch_exclude"])

def done():
    OUT.update(flag_checks=FLAGS["n"], flag_checks_s=round(FLAGS["s"], 3), flags_dropped=FLAGS["dropped"],
               excluded_edges=EXCLUDED, ninja_or_objcache_s=round(NINJA.get("s", 0), 3),
               jit_dir=core.get_user_jit_dir(), bd_dir=core.bd_dir)
    print("RESULT " + json.dumps(OUT, default=str))
'''.replace("DISPATCH", DISPATCH)

DRIVERS = {
    "stock": r'''
exclude_dispatch_unit()
d = stock_args()
t0 = time.perf_counter()
run_build_module(d)
OUT.update(build_s=round(time.perf_counter() - t0, 3), md_name=d["md_name"])
done()
''',
    "jitkiln": r'''
import jitkiln.aiter as ja
from jitkiln.aiter.prebuild import build
PLAN = json.loads(os.environ["BENCH_PLAN"])
t0 = time.perf_counter()
st = ja.enable(arch="gfx950", **PLAN)
t1 = time.perf_counter()
exclude_dispatch_unit()     # outermost: the same edit of build.ninja as the stock side
so = build(st)              # AITER's build_module, called as compile_ops calls it (hooked)
t2 = time.perf_counter()
bd = os.path.join(core.bd_dir, so.stem, "build")
jb = json.load(open(os.path.join(bd, "jitkiln_build.json")))
OUT.update(enable_s=round(t1 - t0, 3), build_s=round(t2 - t1, 3), total_s=round(t2 - t0, 3), md_name=so.stem,
           so=str(so), so_sha256=hashlib.sha256(so.read_bytes()).hexdigest(), instances=st.spec.instances,
           unused=st.spec.unused, jitkiln_build=jb, status_suffix=st.spec.suffix)
done()
''',
    "rank2": r'''
# a second rank on the same machine: the .so is in AITER's JIT dir; what AITER does next is import it
import jitkiln.aiter as ja
PLAN = json.loads(os.environ["BENCH_PLAN"])
t0 = time.perf_counter()
st = ja.enable(arch="gfx950", **PLAN)
t1 = time.perf_counter()
from jitkiln.aiter.prebuild import _stock_module
md = st.spec.md_name(_stock_module(st)[0])
found = importlib.util.find_spec(md) if core.get_user_jit_dir() in sys.path else None
so = os.path.join(core.get_user_jit_dir(), md + ".so")
ready = os.path.isfile(so)
t2 = time.perf_counter()
OUT.update(enable_s=round(t1 - t0, 3), lookup_s=round(t2 - t1, 3), total_s=round(t2 - t0, 3), md_name=md,
           so_ready=ready)
done()
''',
    "rank2prof": r'''
# the same as rank2 under cProfile: where enable() spends its time
import cProfile, pstats, io
import jitkiln.aiter as ja
PLAN = json.loads(os.environ["BENCH_PLAN"])
pr = cProfile.Profile(); pr.enable()
st = ja.enable(arch="gfx950", **PLAN)
pr.disable()
buf = io.StringIO(); pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(25)
OUT.update(profile_top=buf.getvalue()[-6000:])
done()
''',
    "prebuild": r'''
from jitkiln.aiter.prebuild import prebuild
PLAN = json.loads(os.environ["BENCH_PLAN"])
import jitkiln.aiter.hook as hook
_enable = hook.enable
def enable_then_exclude(*a, **k):   # prebuild() enables the hook itself: the exclusion goes outside it after
    st = _enable(*a, **k)
    exclude_dispatch_unit()
    return st
hook.enable = enable_then_exclude
t0 = time.perf_counter()
r = prebuild(PLAN, arch="gfx950", out=os.environ["BENCH_BUNDLE"], key=os.environ["BENCH_KEY"])
OUT.update(prebuild_s=round(time.perf_counter() - t0, 3), result=r)
done()
''',
}


def make_toolroot(work: Path) -> Path:
    """Fake ROCM_HOME whose bin/hipcc is the plain chroot wrapper (and hipconfig the chroot's)."""
    rocm = work / "rocm"
    (rocm / "bin").mkdir(parents=True, exist_ok=True)
    (rocm / "lib").mkdir(exist_ok=True)
    (rocm / "include").mkdir(exist_ok=True)
    w = rocm / "bin" / "hipcc"
    w.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "
                 f"--hipcc-wrapper \"$@\"\n")
    hc = rocm / "bin" / "hipconfig"
    hc.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "
                  f"--hipconfig \"$@\"\n")
    for f in (w, hc):
        f.chmod(0o755)
    # CPU torch has no libc10_hip / libtorch_hip, and the link names them (and libamdhip64): empty stub libraries,
    # made once with the same hipcc, serve the link of both sides (the .so is never imported here)
    (rocm / "lib" / "stub.c").write_text("")
    for lib in ("c10_hip", "torch_hip", "amdhip64"):
        so = rocm / "lib" / f"lib{lib}.so"
        if not so.exists():
            subprocess.run([str(w), "-x", "c", "-shared", "-fPIC", str(rocm / "lib" / "stub.c"), "-o", str(so)],
                           check=True, cwd=str(rocm / "lib"))
    return rocm


def base_env(rocm: Path, jit: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AITER_", "JITKILN_", "GPU_ARCHS"))}
    env.update(PATH=f"{rocm / 'bin'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
               ROCM_HOME=str(rocm), ROCM_PATH=str(rocm), GPU_ARCHS="gfx950", AITER_JIT_DIR=str(jit),
               JITKILN_CACHE_DIR=str(cache), MAX_JOBS=str(os.cpu_count()), CXX=str(rocm / "bin" / "hipcc"),
               PYTHONPATH=str(ROOT / "src"), JITKILN_ROCM_CHROOT=CHROOT)
    return env


def drive(work: Path, name: str, env: dict, tag: str) -> dict:
    script = work / f"driver_{tag}.py"
    script.write_text(AITER_IMPORT + "\n" + DRIVERS[name])
    la0 = load()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, cwd=str(work))
    wall = time.perf_counter() - t0
    (work / f"driver_{tag}.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"driver {tag} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    r = json.loads(lines[-1][7:])
    r.update(process_wall_s=round(wall, 3), loadavg_before=la0, loadavg_after=load())
    return r


def units_of(bd: Path) -> list[dict]:
    return [{"unit": r["out"], "duration_s": r["duration_s"]} for r in ninja_log(bd)]


# --- (e) the critical instance --------------------------------------------------------------------------------

def critical(work: Path, stock_bd: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from jitkiln.compilers.base import CompileJob
    from jitkiln.compilers.hipcc import ChrootRunner, Hipcc
    from jitkiln.family import CompileSpec
    sys.path.insert(0, str(ROOT / "src"))
    text = (stock_bd / "build.ninja").read_text()
    vars_ = {}
    for ln in text.splitlines():
        if " = " in ln and not ln.startswith((" ", "build", "rule")):
            k, v = ln.split(" = ", 1)
            vars_[k.strip()] = v.strip()
    srcs = sorted((stock_bd.parent / "blob" / "instances").glob(CRITICAL + "*.cu"))
    src = srcs[0]
    toks = shlex.split(vars_.get("cuda_cflags", "")) + shlex.split(vars_.get("cuda_post_cflags", ""))
    flags, inc, arch, i = [], [], "gfx950", 0
    while i < len(toks):
        a = toks[i]
        if a in ("-isystem", "-I"):
            inc.append(toks[i + 1]); i += 2; continue
        if a.startswith("-I"):
            inc.append(a[2:])
        elif a.startswith("--offload-arch="):
            arch = a.split("=", 1)[1]
        elif a in ("-fPIC", "-c") or a.startswith("-DTORCH_EXTENSION_NAME"):
            pass
        else:
            flags.append(a)
        i += 1
    spec = CompileSpec(toolchain="hip", arch=arch, flags=tuple(flags), include_dirs=tuple(inc))
    h = Hipcc("/usr/bin/hipcc", runner=ChrootRunner(CHROOT, shutil.which("bwrap")), origin=f"chroot {CHROOT}")
    out: dict = {"unit": src.name, "flags": flags, "include_dirs": inc}
    for mode in ("one-shot", "split"):
        wd = Path(tempfile.mkdtemp(prefix=f"crit-{mode}-", dir=work))
        shutil.copy(src, wd / src.name)
        os.environ["JITKILN_HIP_MODE"] = mode
        la0 = load()
        t0 = time.perf_counter()
        res = h.compile(CompileJob(str(wd / src.name), str(wd / "unit.so"), spec, str(wd),
                                   log_path=str(wd / "log.txt")))
        wall = time.perf_counter() - t0
        out[mode] = {"wall_s": round(wall, 3), "compiler_s": round(res.seconds, 3), "cpu_s": round(res.cpu_s, 2),
                     "peak_rss_gb": round(res.peak_rss / 2**30, 2), "phases": res.phases,
                     "so_sha256": sha(wd / "unit.so"), "so_bytes": (wd / "unit.so").stat().st_size,
                     "loadavg_before": la0, "loadavg_after": load(), "command": shlex.join(res.command)[:3000]}
    os.environ.pop("JITKILN_HIP_MODE", None)
    out["identical_so"] = out["one-shot"]["so_sha256"] == out["split"]["so_sha256"]
    return out


# --- main --------------------------------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--hipcc-wrapper":
        return hipcc_wrapper(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--hipconfig":
        sys.path.insert(0, str(ROOT / "src"))
        from jitkiln.compilers.hipcc import ChrootRunner
        r = ChrootRunner(CHROOT, shutil.which("bwrap"))
        return subprocess.run(r.wrap(["/usr/bin/hipconfig", *sys.argv[2:]], rw=[], ro=[])).returncode
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default=f"{os.cpu_count()}cores")
    ap.add_argument("--only", default="a,b,c,d,t,e")
    ap.add_argument("--work", default=None)
    ap.add_argument("--merge", action="store_true", help="update the existing result file (re-run scenarios)")
    ap.add_argument("--tokens-plan", default='{"model": "kimi-k2", "tp": 2, "tokens": "1-8192"}')
    a = ap.parse_args()
    only = set(a.only.split(","))
    work = Path(a.work or tempfile.mkdtemp(prefix="aiter-coldstart-"))
    work.mkdir(parents=True, exist_ok=True)
    rocm = make_toolroot(work)
    resdir = ROOT / "bench" / "results"
    resdir.mkdir(parents=True, exist_ok=True)
    outp = resdir / f"aiter-coldstart-{a.tag}.json"
    sys.path.insert(0, str(ROOT / "src"))
    from jitkiln.compilers.hipcc import ChrootRunner, Hipcc
    h = Hipcc("/usr/bin/hipcc", runner=ChrootRunner(CHROOT, shutil.which("bwrap")), origin=f"chroot {CHROOT}")
    R: dict = {
        "bench": "bench/aiter_coldstart.py", "issue": "ROCm/aiter#3566 (Kimi-K2.5-MXFP4, a4w4 ck2stages, gfx950)",
        "cores": os.cpu_count(), "machine": platform.platform(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE")
                                                                                 * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "uptime_at_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "loadavg_start": load(), "argv": sys.argv, "work": str(work),
        "compiler": {"hipcc": "Debian ROCm 7.2 hipcc in the chroot " + CHROOT + " (bwrap), both sides",
                     "version": h.version, "fingerprint": h.fingerprint,
                     "wrapper": f"{rocm}/bin/hipcc -> {Path(__file__).name} --hipcc-wrapper (path mapping + one "
                                "bwrap run of /usr/bin/hipcc; no cache)"},
        "aiter": None, "max_jobs": os.cpu_count(),
        "dispatch_unit_exclusion": (f"{DISPATCH}.cu (needs ATen/hip/HIPContext.h from a ROCm PyTorch; CPU torch "
                                    "here) is removed from BOTH build.ninja files by one wrapper of AITER's "
                                    "cpp_extension._run_ninja_build, applied outermost on both sides: its compile "
                                    f"edge is dropped and {DISPATCH}.cuda.o is dropped from the link inputs; the "
                                    ".so links with its symbols undefined (never imported here)"),
        "link_stubs": ("CPU torch ships no libc10_hip/libtorch_hip: empty stub libc10_hip.so, libtorch_hip.so, "
                       "libamdhip64.so in $ROCM_HOME/lib (made once with the same hipcc) serve both sides' link"),
        "max_jobs_note": ("AITER's check_and_set_ninja_worker would cap MAX_JOBS at int(0.8*cores) = 1 here; it is "
                          "wrapped (and cpp_extension._get_num_workers, which caps again) to keep MAX_JOBS = cores for both "
                          "sides (ninja -j2 / object cache 2 workers)"),
        "commands": {}, "scenarios": {},
    }
    try:
        import importlib.metadata as md
        R["aiter"] = md.version("amd-aiter")
    except Exception:  # noqa: BLE001
        pass
    try:
        R["compiler"]["describe"] = {k: v for k, v in h.describe().items() if k != "binaries"}
    except Exception as e:  # noqa: BLE001
        R["compiler"]["describe_error"] = str(e)

    if a.merge and outp.is_file():
        old = json.loads(outp.read_text())
        old["scenarios"].update(R.pop("scenarios"))
        old["commands"].update(R.pop("commands"))
        old.setdefault("reruns", []).append({"argv": sys.argv, "loadavg_start": R["loadavg_start"],
                                             "uptime": R["uptime_at_start"]})
        R = old

    def save():
        outp.write_text(json.dumps(R, indent=2, default=str) + "\n")

    S = R["scenarios"]
    shape_plan = json.dumps({"shapes": [SHAPE]})
    jit_a, cache_b, jit_b = work / "jit_stock", work / "cache_b", work / "jit_b"
    R["commands"]["hipcc_wrapper"] = (rocm / "bin" / "hipcc").read_text().strip().splitlines()[-1]
    save()

    if "a" in only:
        env = base_env(rocm, jit_a, work / "cache_unused")
        print("[a] stock AITER build_module, all instances ...", flush=True)
        r = drive(work, "stock", env, "a_stock")
        bd = Path(r["bd_dir"]) / r["md_name"] / "build"
        r["units"] = units_of(bd)
        r["instances_compiled"] = sorted(u["unit"] for u in r["units"] if "gemm" in u["unit"] and ".so" not in u["unit"])
        r["jitkiln_cache_used"] = (work / "cache_unused").exists()
        S["a_stock"] = r
        R["stock_s"] = r["build_s"]
        R["commands"]["a_stock"] = ("AITER core.build_module(<stock md_name>, get_args_of_build('module_moe_ck2stages'), "
                                    "blob_gen_cmd=AITER's get_moe_stage_module(fp4x2, fp4x2, bf16, Silu, per_1x32, 2, "
                                    "preshuffle)) with GPU_ARCHS=gfx950 MAX_JOBS=%d; timed around build_module" % os.cpu_count())
        save()
        print(f"    stock {r['build_s']} s", flush=True)

    if "b" in only:
        env = base_env(rocm, jit_b, cache_b)
        env["BENCH_PLAN"] = shape_plan
        print("[b] jitkiln cold, shape plan ...", flush=True)
        r = drive(work, "jitkiln", env, "b_cold_shape")
        bd = Path(r["bd_dir"]) / r["md_name"] / "build"
        r["units"] = r["jitkiln_build"]
        S["b_cold_shape"] = r
        R["jitkiln_cold_s"] = r["total_s"]
        R["commands"]["b_cold_shape"] = (f"jitkiln.aiter.enable(shapes=['{SHAPE}'], arch='gfx950'); "
                                         "jitkiln.aiter.prebuild.build(st) (AITER's build_module, hooked); empty "
                                         "JITKILN_CACHE_DIR and AITER_JIT_DIR; timed from enable()")
        if "stock_s" in R:
            R["cold_over_stock"] = round(R["jitkiln_cold_s"] / R["stock_s"], 3)
            a_, b_ = S["a_stock"], r
            R["build_phase_over_stock"] = round(b_["ninja_or_objcache_s"] / a_["ninja_or_objcache_s"], 3)
            R["build_phase_note"] = ("compile+link only (AITER's ninja vs jitkiln's object cache), without AITER's "
                                     "per-build Python work common to both (hip_flag_checker: one hipcc run per "
                                     "flag, blob generation)")
        save()
        print(f"    cold {r['total_s']} s", flush=True)

    if "c" in only and (cache_b / "").exists():
        env = base_env(rocm, jit_b, cache_b)
        env["BENCH_PLAN"] = shape_plan
        print("[c] warm ...", flush=True)
        r1 = drive(work, "rank2", env, "c1_rank2")
        env2 = base_env(rocm, work / "jit_c2", cache_b)
        env2["BENCH_PLAN"] = shape_plan
        r2 = drive(work, "jitkiln", env2, "c2_new_machine")
        try:
            r1["profile"] = drive(work, "rank2prof", env, "c1_rank2_profile")["profile_top"]
        except Exception as e:  # noqa: BLE001
            r1["profile"] = f"failed: {e}"
        S["c1_second_rank"] = r1
        S["c2_second_machine_shared_cache"] = r2
        R["warm_s"] = r1["total_s"]
        R["warm_second_machine_s"] = r2["total_s"]
        R["warm_breakdown"] = {
            "second_rank (.so in AITER_JIT_DIR)": {"enable_s": r1["enable_s"], "lookup_s": r1["lookup_s"],
                                                   "process_start+torch+aiter import_s": r1["aiter_import_s"]},
            "second_machine (empty AITER_JIT_DIR, warm jitkiln cache)": {
                "enable_s": r2["enable_s"], "aiter build_module_s": r2["build_s"],
                "of which AITER hip_flag_checker (one hipcc run per flag)_s": r2["flag_checks_s"],
                "flag_checks": r2["flag_checks"],
                "of which objcache run_build (hits + link)_s": r2["ninja_or_objcache_s"],
                "cache_hits": len(r2["jitkiln_build"]["cache_hits"]), "compiled": r2["jitkiln_build"]["compiled"]}}
        save()
        print(f"    warm {r1['total_s']} s / second machine {r2['total_s']} s", flush=True)

    if "d" in only and (cache_b / "").exists():
        print("[d] prebuild + seed ...", flush=True)
        key = work / "builder.key"
        jk = str(Path(sys.executable).parent / "jitkiln")
        subprocess.run([jk, "keygen", "-o", str(key), "--force"], check=True, capture_output=True)
        bundle = work / "kimi-gfx950.jkab"
        env = base_env(rocm, work / "jit_d_builder", cache_b)
        env.update(BENCH_PLAN=shape_plan, BENCH_BUNDLE=str(bundle), BENCH_KEY=str(key))
        rp = drive(work, "prebuild", env, "d_prebuild")
        dest = work / "jit_d_server"
        senv = base_env(rocm, dest, work / "cache_d_server")
        cmd = [jk, "aiter", "seed", str(bundle), "--trust", str(key) + ".pub", "--arch", "gfx950",
               "--jit-dir", str(dest)]
        la0 = load()
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=senv, capture_output=True, text=True)
        ts = time.perf_counter() - t0
        inst = list(dest.glob("*.so"))
        S["d_seed"] = {"prebuild": rp, "seed_cmd": shlex.join(cmd), "seed_rc": p.returncode,
                       "seed_out": (p.stdout + p.stderr)[-1500:], "seed_wall_s": round(ts, 3),
                       "installed": [x.name for x in inst],
                       "installed_sha_matches_bundle": bool(inst) and sha(inst[0]) == sha(rp["result"]["so"]),
                       "bundle_bytes": bundle.stat().st_size, "loadavg_before": la0, "loadavg_after": load()}
        R["seeded_s"] = round(ts, 3)
        R["commands"]["d"] = ("prebuild({'shapes': [...]}, arch='gfx950', out=BUNDLE, key=K) (== `jitkiln aiter "
                              "prebuild --shape ... -o BUNDLE --key K`, run in-process because AITER's package "
                              "__init__ cannot import here); then: " + shlex.join(cmd))
        save()
        print(f"    seed {ts:.2f} s rc {p.returncode}", flush=True)

    if "e" in only and "a_stock" in S:
        print("[e] critical instance ...", flush=True)
        bd = Path(S["a_stock"]["bd_dir"]) / S["a_stock"]["md_name"] / "build"
        c = critical(work, bd)
        S["e_critical"] = c
        R["critical_stock_s"] = c["one-shot"]["wall_s"]
        R["critical_ours_s"] = c["split"]["wall_s"]
        R["critical_ratio"] = round(c["split"]["wall_s"] / c["one-shot"]["wall_s"], 3)
        R["critical_identical_so"] = c["identical_so"]
        R["critical_in_stock_ninja_log_s"] = next((u["duration_s"] for u in S["a_stock"]["units"]
                                                   if u["unit"].startswith(CRITICAL)), None)
        R["critical_in_stock_ninja_log_note"] = "under ninja's -j2 with another instance beside it"
        save()
        print(f"    critical {c['one-shot']['wall_s']} vs {c['split']['wall_s']} identical={c['identical_so']}",
              flush=True)

    if "t" in only:
        env = base_env(rocm, work / "jit_t", work / "cache_t")
        env["BENCH_PLAN"] = a.tokens_plan
        print("[t] jitkiln cold, token-range plan ...", flush=True)
        r = drive(work, "jitkiln", env, "t_cold_tokens")
        S["t_cold_tokens"] = r
        R["jitkiln_cold_tokens_s"] = r["total_s"]
        R["tokens_plan"] = json.loads(a.tokens_plan)
        R["tokens_plan_instances"] = r["instances"]
        if "stock_s" in R:
            R["cold_tokens_over_stock"] = round(r["total_s"] / R["stock_s"], 3)
        save()
        print(f"    cold tokens {r['total_s']} s: {r['instances']}", flush=True)

    R["loadavg_end"] = load()
    R["uptime_at_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    R["targets"] = {
        "cold_over_stock<=0.3": R.get("cold_over_stock") is not None and R["cold_over_stock"] <= 0.3,
        "warm_s<=0.2": R.get("warm_s") is not None and R["warm_s"] <= 0.2,
        "seeded_s<=2": R.get("seeded_s") is not None and R["seeded_s"] <= 2,
        "critical<=0.8x identical": R.get("critical_ratio") is not None and R["critical_ratio"] <= 0.8
        and bool(R.get("critical_identical_so")),
    }
    save()
    print(json.dumps({k: R.get(k) for k in ("cores", "stock_s", "jitkiln_cold_s", "cold_over_stock", "warm_s",
                                            "warm_second_machine_s", "seeded_s", "critical_stock_s",
                                            "critical_ours_s", "targets")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
