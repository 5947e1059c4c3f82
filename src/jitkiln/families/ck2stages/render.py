"""Translation units and compile flags for ck2stages instances.

A unit is AITER's own generated instance file (byte for byte, as its generator wrote it for this tree, variant
and arch: it includes AITER's CK headers and explicitly instantiates the template) followed by a small
``extern "C"`` launcher that calls that instantiation, and a name function the runtime checks after loading.
AITER's ``gemm_moe_ck2stages.h`` includes torch headers, so units need PyTorch's include folders (ROCm build).
"""
from __future__ import annotations

import os
import re

from ...errors import ToolchainNotFound
from ...family import CompileSpec
from .module import CK2Instance, AiterModule

BASE_FLAGS = ("-O3", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-D__HIP_PLATFORM_AMD__=1",
              "-D__HIP_PLATFORM_HCC__=1", "-DUSE_ROCM=1", "-DCK_ENABLE_FP8=1", "-DCK_ENABLE_BF16=1",
              "-mllvm", "--amdgpu-kernarg-preload-count=16", "-fno-gpu-rdc")

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


def torch_include_dirs() -> tuple[str, ...]:
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import include_paths
    except Exception:  # noqa: BLE001 - torch missing or broken: reported at compile time
        return ()
    return tuple(include_paths())


def require_torch_headers() -> None:
    if not torch_include_dirs():
        raise ToolchainNotFound(
            "ck2stages units need PyTorch's C++ headers (AITER's gemm_moe_ck2stages.h includes torch/extension.h)",
            hint="install a ROCm build of PyTorch (pip install torch --index-url "
                 "https://download.pytorch.org/whl/rocm6.4) in this environment")


def compile_spec(mod: AiterModule, arch: str) -> CompileSpec:
    flags = list(BASE_FLAGS)
    extra = os.environ.get("JITKILN_HIP_FLAGS")
    if extra:
        flags += extra.split()
    return CompileSpec(toolchain="hip", arch=arch, flags=tuple(flags),
                       include_dirs=mod.tree.include_dirs + torch_include_dirs())
