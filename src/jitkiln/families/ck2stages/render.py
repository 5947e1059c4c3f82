"""Translation units and compile flags for ck2stages instances.

A unit is AITER's own generated instance file (byte for byte, as its generator wrote it for this tree, variant
and arch: it includes AITER's CK headers and explicitly instantiates the template) followed by a small
``extern "C"`` launcher that calls that instantiation, and a name function the runtime checks after loading.
AITER's ``gemm_moe_ck2stages.h`` includes torch headers, so units need PyTorch's include folders (ROCm build).
"""
from __future__ import annotations

import os
import re

from pathlib import Path

from ...compilers.hipcc import python_include
from ...errors import ToolchainNotFound
from ...family import CompileSpec
from .module import AiterModule, CK2Instance

# AITER's module flags for module_moe_ck2stages (aiter/jit/core.py build_module + optCompilerConfig.json +
# aiter/jit/utils/cpp_extension.py COMMON_HIP(CC)_FLAGS), for a HIP >= 7 compiler. Dropped:
# ``-mllvm -amdgpu-coerce-illegal-types=1`` (AMD's LLVM fork only; upstream clang rejects it), the
# ``-D__HIP_NO_HALF_*__=1`` pair (AITER -U's them afterwards), ``-DMOE_STAGE2_ASM_DIR`` (pybind unit only),
# ``-DTORCH_EXTENSION_NAME`` / ``-DPYBIND11_*`` (python module glue; instance units define no module).
AITER_HIP_FLAGS = (
    "-O3", "-std=c++20", "-fPIC",
    "-DLEGACY_HIPBLAS_DIRECT", "-DUSE_PROF_API=1", "-D__HIP_PLATFORM_HCC__=1", "-D__HIP_PLATFORM_AMD__=1",
    "-DUSE_ROCM=1", "-DHIPBLAS_V2", "-DCUDA_HAS_FP16=1",
    "-U__HIP_NO_HALF_CONVERSIONS__", "-U__HIP_NO_HALF_OPERATORS__",
    "-mllvm", "--amdgpu-kernarg-preload-count=16",
    "-Wno-unused-result", "-Wno-switch-bool", "-Wno-vla-cxx-extension", "-Wno-undefined-func-template",
    "-Wno-macro-redefined", "-Wno-missing-template-arg-list-after-template-kw",
    "-fgpu-flush-denormals-to-zero",
    "-mllvm", "--lsr-drop-solution=1", "-fno-offload-uniform-block", "-mllvm", "-enable-post-misched=0",
    "-mllvm", "-amdgpu-early-inline-all=true", "-mllvm", "-amdgpu-function-calls=false",
    # module_moe_ck2stages' flags_extra_hip
    "-mllvm", "-greedy-reverse-local-assignment=1", "-mllvm", "--amdgpu-use-amdgpu-trackers=1",
    "-mllvm", "--slp-threshold=-32", "-mllvm", "--misched-prera-direction=bottomup",
    # cpp_extension's COMMON_HIPCC_FLAGS (visibility: the jitkiln launcher is exported explicitly)
    "-mcmodel=large", "-fno-unique-section-names", "-ffunction-sections", "-fdata-sections",
    "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-fno-gpu-rdc",
    "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=1",
)
AITER_DROPPED_FLAGS = ("-mllvm -amdgpu-coerce-illegal-types=1",)


def aiter_flags(arch: str, torch_has_fp4: bool = True) -> tuple[str, ...]:
    """AITER's module_moe_ck2stages flags for ``arch`` (gfx950 adds the fp4x2 defines, as AITER does)."""
    extra: list[str] = []
    if arch.startswith("gfx950"):
        extra.append("-D__Float4_e2m1fn_x2")
    if torch_has_fp4:
        extra.append("-DTORCH_Float4_e2m1fn_x2")
    return AITER_HIP_FLAGS + tuple(extra)


_LAUNCHER = """
// ---- jitkiln C ABI launcher (not part of AITER's generated file) ----
#include <optional>
extern "C" __attribute__((visibility("default"))) int {symbol}(
    void* stream, int tokens, int sorted_size, int N, int K, int topk,
    void* a, void* w1, void* w2, void* sorted_token_ids, void* sorted_expert_ids, void* sorted_weights,
    void* num_valid_ids, void* out, void* w_scale, void* a_scale)
{{
    try
    {{
        const hipStream_t s = reinterpret_cast<hipStream_t>(stream);
        std::optional<void*> ws = w_scale ? std::optional<void*>(w_scale) : std::nullopt;
        std::optional<void*> as = a_scale ? std::optional<void*>(a_scale) : std::nullopt;
        {call}(s, tokens, sorted_size, N, K, topk, a, w1, w2, sorted_token_ids, sorted_expert_ids,
            sorted_weights, num_valid_ids, out, ws, as);
        return static_cast<int>(hipGetLastError());
    }}
    catch (...)
    {{
        return -1;
    }}
}}
extern "C" __attribute__((visibility("default"))) const char* {name_symbol}(void) {{ return "{name}"; }}
"""


def template_call_text(mod: AiterModule, inst: CK2Instance) -> str:
    """``ck_moe_stageN_gemm<...>`` exactly as AITER's lookup table spells it for this instance."""
    text = mod.blob.lookup.replace("\\\n", " ")
    m = re.search(r'\{\s*"' + re.escape(inst.kernel) + r'"\s*,\s*(ck_moe_stage\d_gemm<.*?>)\s*\}', text, re.S)
    if not m:
        raise KeyError(f"{inst.kernel} is not in AITER's lookup table")
    return " ".join(m.group(1).split())


def render_unit(mod: AiterModule, inst: CK2Instance) -> str:
    body = mod.blob.instances[inst.kernel]
    head = (f"// jitkiln ck2stages unit: {inst.kernel}\n// variant {inst.variant}, arch {inst.arch}, "
            f"AITER {mod.tree.version} ({mod.tree.origin}); below: AITER's generated instance file\n")
    return head + body + _LAUNCHER.format(symbol=inst.symbol, name_symbol=f"jk_name_{inst.digest[:16]}",
                                          name=inst.kernel, call=template_call_text(mod, inst))


def aiter_include_dirs(aiter_meta: str | os.PathLike, codegen: str | None = None) -> tuple[str, ...]:
    """AITER's include order: ck_helper (its generated ck/config.h), CK include + library/include, csrc/include,
    the codegen folder, csrc/include/torch; then PyTorch's and Python's headers (torch/extension.h needs them)."""
    m = Path(aiter_meta)
    ck = m / "3rdparty" / "composable_kernel"
    dirs = [m / "3rdparty" / "ck_helper", ck / "include", ck / "library" / "include", m / "csrc" / "include",
            Path(codegen) if codegen else m / "csrc" / "ck_gemm_moe_2stages_codegen", m / "csrc" / "include" / "torch"]
    return tuple(str(d) for d in dirs) + torch_include_dirs() + (python_include(),)


def torch_include_dirs() -> tuple[str, ...]:
    try:
        from torch.utils.cpp_extension import include_paths
    except Exception:  # noqa: BLE001 - torch missing or broken: check_buildable says so
        return ()
    return tuple(include_paths())


def check_buildable(spec: CompileSpec) -> None:
    if not any(os.path.isfile(os.path.join(d, "torch", "extension.h")) for d in spec.include_dirs):
        raise ToolchainNotFound(
            "ck2stages units need PyTorch's C++ headers (AITER's gemm_moe_ck2stages.h includes torch/extension.h)",
            hint="pip install torch (any build: only its headers are read; e.g. the CPU wheel)")


def compile_spec(mod: AiterModule, arch: str) -> CompileSpec:
    """AITER's own module flags and include folders for this tree and arch (what AITER's JIT compiles with),
    plus ``JITKILN_HIP_FLAGS``."""
    try:
        import torch
        fp4 = hasattr(torch, "float4_e2m1fn_x2")
    except Exception:  # noqa: BLE001 - no torch: the compile says which header is missing
        fp4 = False
    flags = list(aiter_flags(arch, fp4))
    extra = os.environ.get("JITKILN_HIP_FLAGS")
    if extra:
        flags += extra.split()
    return CompileSpec(toolchain="hip", arch=arch, flags=tuple(flags),
                       include_dirs=aiter_include_dirs(mod.tree.root, str(mod.tree.codegen)))
