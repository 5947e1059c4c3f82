"""NVRTC with a precompiled header for one heavy moe2stage instance (issue 5, direction c): how far below a stock
compile can the device code alone get, and is its machine code the same?

One job, one machine, sequential:
  stock      nvcc -c of the instance's unit (object with host code, the ninja way)
  cubin      nvcc -cubin of the same unit (device only: the floor of any host/device split with nvcc)
  nvrtc      NVRTC in process, a device-only source: the same includes and types, one explicit instantiation
             of the GEMM kernel, no host code (NVRTC compiles none: ``-default-device``)
  nvrtc_pch  the same after NVRTC's automatic PCH (``-pch``) was created by compiling another instance
             (the header prefix is shared by every instance of the family)

The GEMM kernel's SASS is compared with the stock object's (scripts/sass_diff.py --subset).

    python bench/nvrtc_cost.py --tag 2cores            # libnvrtc: $NVRTC, the nvidia-cuda-nvrtc wheel or CUDA_HOME
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

from jitkiln.family import get_family  # noqa: E402
from jitkiln.compilers.nvcc import Nvcc  # noqa: E402

import instance_cost  # noqa: E402
import sass_diff  # noqa: E402

OTHER = "moe2stage_s1_bf16_128x128x64_cooperative_c1x1"  # creates the PCH


def find_nvrtc() -> str:
    cands = [os.environ.get("NVRTC", "")]
    for sp in sys.path:
        cands += sorted(glob.glob(os.path.join(sp, "nvidia/cu*/lib/libnvrtc.so.*")))
        cands += sorted(glob.glob(os.path.join(sp, "nvidia/cuda_nvrtc/lib/libnvrtc.so.*")))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands += sorted(glob.glob(os.path.join(os.environ[var], "lib64", "libnvrtc.so.*")))
    cands += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so.*"))
    for c in cands:
        if c and os.path.isfile(c) and "builtins" not in c and ".alt." not in c:
            return c
    raise SystemExit("libnvrtc not found: pip install nvidia-cuda-nvrtc, or set NVRTC=/path/to/libnvrtc.so.13")


def device_only(unit: str) -> str:
    """The unit's includes and types, then one explicit instantiation of the GEMM kernel; no host code."""
    head = unit[:unit.index("using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;")]
    for drop in ("#include <cstdint>\n", "#include <cstddef>\n", "#include <cuda_runtime.h>\n",
                 '#include "cutlass/gemm/device/gemm_universal_adapter.h"\n'):
        head = head.replace(drop, "")
    # NVRTC's std:: lacks two C++17 traits some CUTLASS headers use: the libcu++ ones, by name
    shim = ("#include <cuda/std/type_traits>\n"
            "namespace std { using cuda::std::is_pointer_v; using cuda::std::void_t; }\n")
    i = head.index("#include")
    return (head[:i] + shim + head[i:] + "}  // namespace jk\n}  // namespace\n"
            "template __global__ void cutlass::device_kernel<jk::GemmKernel>("
            "CUTLASS_GRID_CONSTANT typename jk::GemmKernel::Params const);\n")


def nvrtc_compile(lib, src: str, name: str, opts: list[str]) -> tuple[float, bytes, str]:
    prog = ctypes.c_void_p()
    t0 = time.monotonic()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None) != 0:
        raise SystemExit("nvrtcCreateProgram failed")
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    dt = time.monotonic() - t0
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace")
    if rc != 0:
        raise SystemExit(f"NVRTC failed ({rc}) on {name}:\n{text[-3000:]}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return dt, buf.raw, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instance", default=instance_cost.DEFAULT)
    ap.add_argument("--tag", default=f"{os.cpu_count()}cores")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--pch-heap-gib", type=int, default=8, help="nvrtcSetPCHHeapSize")
    args = ap.parse_args()
    fam = get_family("moe2stage")
    cands = {i.name: i for i in fam.candidates("bf16")}
    inst, other = cands[args.instance], cands[OTHER]
    spec, tc = fam.compile_spec("bf16"), Nvcc.find()
    unit = fam.render(inst)
    path = find_nvrtc()
    for b in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*")):
        if ".alt." not in b:  # NVRTC dlopens it by name: loaded first, that name resolves to it
            ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    cuda_inc = os.path.join(tc.root, "include")
    base = ["-arch=sm_90a", "-std=c++17", "-default-device", *[f for f in spec.flags if f.startswith("-D")],
            *[f"-I{d}" for d in spec.include_dirs], f"-I{cuda_inc}", f"-I{cuda_inc}/cccl"]
    work = Path(tempfile.mkdtemp(prefix="nvrtc-cost-"))
    res: dict = {"command": "python bench/nvrtc_cost.py " + " ".join(sys.argv[1:]), "instance": inst.name,
                 "cores": os.cpu_count(), "host": platform.node(), "nvcc": tc.version, "nvrtc": path,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("stock: nvcc -c ...", flush=True)
    stock = instance_cost.run_stock(tc, spec, inst.name, unit, work)
    print(f"  {stock['s']} s; nvcc -cubin ...", flush=True)
    cubin = instance_cost.run_stock(tc, spec, inst.name, unit, work, mode="-cubin")
    print(f"  {cubin['s']} s; NVRTC, no PCH ...", flush=True)
    t_plain, bin_plain, _ = nvrtc_compile(lib, device_only(unit), inst.name + ".cu", base)
    print(f"  {t_plain:.1f} s; NVRTC -pch: create with {other.name} ...", flush=True)
    (work / "nvrtc.cubin").write_bytes(bin_plain)
    s = stock["s"]
    res.update(stock_s=s, cubin_s=cubin["s"], nvrtc_s=round(t_plain, 2), cubin_ratio=round(cubin["s"] / s, 3),
               nvrtc_ratio=round(t_plain / s, 3), stock=stock, cubin=cubin)
    sd = {"nvrtc": sass_diff.sass_identical(str(work / "nvrtc.cubin"), stock["artifact"], subset=True)}
    pch_dir = work / "pch"
    pch_dir.mkdir()
    pch = ["-pch", f"--pch-dir={pch_dir}", "--pch-verbose=true"]
    if hasattr(lib, "nvrtcSetPCHHeapSize"):  # the default heap is too small for CUTLASS ("unable to obtain mapped memory")
        lib.nvrtcSetPCHHeapSize(ctypes.c_size_t(args.pch_heap_gib << 30))
    try:
        t_create, _, log_create = nvrtc_compile(lib, device_only(fam.render(other)), other.name + ".cu", pch + base)
        print(f"  {t_create:.1f} s; NVRTC with the PCH ...", flush=True)
        t_pch, bin_pch, log_use = nvrtc_compile(lib, device_only(unit), inst.name + ".cu", pch + base)
        print(f"  {t_pch:.1f} s", flush=True)
        (work / "nvrtc_pch.cubin").write_bytes(bin_pch)
        sd["nvrtc_pch"] = sass_diff.sass_identical(str(work / "nvrtc_pch.cubin"), stock["artifact"], subset=True)
        res.update(nvrtc_pch_create_s=round(t_create, 2), nvrtc_pch_s=round(t_pch, 2),
                   nvrtc_pch_ratio=round(t_pch / s, 3), pch_log_create=log_create[-1500:],
                   pch_log_use=log_use[-1500:])
    except SystemExit as e:  # keep what was measured; say why the PCH step failed
        res["nvrtc_pch_error"] = str(e)[-2000:]
        print(f"  PCH step failed: {str(e)[-300:]}", flush=True)
    res.update(sass_identical={k: v["identical"] for k, v in sd.items()}, sass=sd)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"nvrtc-cost-{args.tag}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res.get(k) for k in ("stock_s", "cubin_s", "nvrtc_s", "nvrtc_pch_create_s", "nvrtc_pch_s",
                                              "cubin_ratio", "nvrtc_ratio", "nvrtc_pch_ratio", "sass_identical")},
                     indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
