"""Unit text of a moe2stage instance whose grouped GEMM is the CuTe DSL kernel (:mod:`.dsl_gemm`), built by
the ``cutedsl`` compiler (:mod:`jitkiln.compilers.cutedsl`: a JSON header line, then files).

Same C ABI as the CUTLASS units (:mod:`.templates`: stage 1 and stage 2 launchers, workspace protocol, error
codes, no host synchronisation); bf16 only. The routing kernels are the CUTLASS units' own text
(:data:`.templates.BLOCK_SCAN`, :data:`.templates.COUNT_SCAN`); gather, activation and combine are their bf16
forms; all compiled by nvcc without CUTLASS (``glue.cu``); ``tile_offsets`` numbers each expert's M tiles for
the DSL kernel (padded to the cluster's M size). ``bridge.c`` calls the exported DSL kernel through the header
``export_to_c`` writes (the module is loaded once per process, on first use).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .templates import BLOCK_SCAN, COUNT_SCAN, STAGE1_SIGNATURE, STAGE2_SIGNATURE

KERNEL_MODULE = "jitkiln.families.moe2stage.dsl_gemm"
KERNEL_FILE = Path(__file__).with_name("dsl_gemm.py")


def kernel_sha256() -> str:
    return hashlib.sha256(KERNEL_FILE.read_bytes()).hexdigest()


_COMMON = r"""#if !defined(NDEBUG)
#error "jitkiln moe2stage units must be built with -DNDEBUG"
#endif
#include <cstdint>
#include <cstddef>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

namespace {
constexpr int kTileM = @@tile_m@@;
constexpr int kClusterM = @@cluster_m@@;
struct Bump {
  char* base; size_t off;
  template <class T> T* take(size_t n) {
    off = (off + 255) & ~size_t(255);
    T* p = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += n * sizeof(T);
    return p;
  }
};
""" + BLOCK_SCAN + r"""__device__ __forceinline__ int padded_tiles(int m) {
  return ((m + kTileM - 1) / kTileM + kClusterM - 1) / kClusterM * kClusterM;
}

// tile_off[e] = sum over experts j < e of padded_tiles(M_j) (the counts in offsets), one block of 1024
__global__ void __launch_bounds__(1024) tile_offsets(const int32_t* __restrict__ offsets, int E,
                                                     int32_t* __restrict__ tile_off) {
  __shared__ int32_t part[1024];
  const int per = (E + 1023) / 1024;
  const int lo = min(E, int(threadIdx.x) * per), hi = min(E, lo + per);
  int s = 0;
  for (int e = lo; e < hi; ++e) s += padded_tiles(offsets[e + 1] - offsets[e]);
  const int2 t = block_scan(s, part);
  int run = t.x;
  for (int e = lo; e < hi; ++e) { tile_off[e] = run; run += padded_tiles(offsets[e + 1] - offsets[e]); }
  if (threadIdx.x == 0) tile_off[E] = t.y;
}

}  // namespace
extern "C" int @@prefix@@_gemm(const void* A, const void* B, void* D, const int32_t* offsets, const int32_t* tile_off,
                              int rows, int N, int K, int E, void* stream);
extern "C" __attribute__((visibility("default"))) const char* jk_name_@@digest16@@(void) { return "@@name@@"; }
"""

_STAGE1 = r"""
namespace {
""" + COUNT_SCAN + r"""
// Stage 1's routing (route_block) and tile_off from its counts in one launch of one block of 1024 -- what the
// memset, count_rows, scan_counts and tile_offsets launches do otherwise.
__global__ void __launch_bounds__(1024) route_tiles(const int32_t* __restrict__ ids, int n, int E,
                                                    int32_t* __restrict__ rank, int32_t* __restrict__ offsets,
                                                    int32_t* __restrict__ tile_off) {
  __shared__ int32_t cnt[kRouteE];
  __shared__ int32_t part[1024];
  route_block(ids, n, E, rank, offsets, cnt, part);
  const int per = (E + 1023) / 1024;
  const int lo = min(E, int(threadIdx.x) * per), hi = min(E, lo + per);
  int s = 0;
  for (int e = lo; e < hi; ++e) s += padded_tiles(cnt[e]);
  const int2 t = block_scan(s, part);
  int run = t.x;
  for (int e = lo; e < hi; ++e) { tile_off[e] = run; run += padded_tiles(cnt[e]); }
  if (threadIdx.x == 0) tile_off[E] = t.y;
}
__global__ void gather_rows(const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ ids,
                            const float* __restrict__ topk_w, const int32_t* __restrict__ rank,
                            const int32_t* __restrict__ offsets, int topk, int H, int32_t* __restrict__ sorted_pos,
                            float* __restrict__ w_sorted, __nv_bfloat16* __restrict__ xs) {
  int i = blockIdx.x;
  int r = rank[i];
  if (r < 0) { if (threadIdx.x == 0) sorted_pos[i] = -1; return; }
  int pos = offsets[ids[i]] + r;
  if (threadIdx.x == 0) { sorted_pos[i] = pos; w_sorted[pos] = topk_w[i]; }
  const uint4* s4 = reinterpret_cast<const uint4*>(x + int64_t(i / topk) * H);
  uint4* d4 = reinterpret_cast<uint4*>(xs + int64_t(pos) * H);
  for (int j = threadIdx.x; j < H / 8; j += blockDim.x) d4[j] = s4[j];
}
__device__ __forceinline__ float act_fn(float g, int activation) {
  if (activation == 1) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
  return g / (1.0f + __expf(-g));
}
__global__ void activate_rows(const __nv_bfloat16* __restrict__ h, const int32_t* __restrict__ offsets, int E, int I,
                              const float* __restrict__ w_sorted, int activation, __nv_bfloat16* __restrict__ out) {
  int pos = blockIdx.x;
  if (pos >= offsets[E]) return;
  float w = w_sorted[pos];
  const __nv_bfloat16* row = h + int64_t(pos) * 2 * I;
  __nv_bfloat16* dst = out + int64_t(pos) * I;
  for (int j = threadIdx.x; j < I / 8; j += blockDim.x) {
    uint4 gv = reinterpret_cast<const uint4*>(row)[j];
    uint4 uv = reinterpret_cast<const uint4*>(row + I)[j];
    const __nv_bfloat16* g = reinterpret_cast<const __nv_bfloat16*>(&gv);
    const __nv_bfloat16* u = reinterpret_cast<const __nv_bfloat16*>(&uv);
    alignas(16) __nv_bfloat16 o[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
      o[q] = __float2bfloat16(act_fn(__bfloat162float(g[q]), activation) * __bfloat162float(u[q]) * w);
    reinterpret_cast<uint4*>(dst)[j] = *reinterpret_cast<const uint4*>(o);
  }
}
}  // namespace
""" + STAGE1_SIGNATURE + r"""  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % 16) || (I % 16)) return int(cudaErrorInvalidValue);
  if (E >= (1 << 17)) return int(cudaErrorInvalidValue);  // the GEMM's expert search covers 2^17 - 1 experts
  const int64_t rows = int64_t(T) * topk;
  Bump b{static_cast<char*>(workspace), 0};
  int32_t* counts = b.take<int32_t>(E);
  int32_t* rank = b.take<int32_t>(rows);
  float* w_sorted = b.take<float>(rows);
  __nv_bfloat16* xs = b.take<__nv_bfloat16>(rows * H);
  __nv_bfloat16* h = b.take<__nv_bfloat16>(rows * 2 * I);
  int32_t* tile_off = b.take<int32_t>(E + 1);
  if (!workspace) {
    if (workspace_bytes) *workspace_bytes = b.off + 256;
    return 0;
  }
  if (workspace_bytes && *workspace_bytes < b.off) return int(cudaErrorInvalidValue);
  if (T == 0) return 0;
  cudaError_t err;
  int n = int(rows);
  const bool one = E <= kRouteE && n <= kRouteN;  // routing in one launch (route_tiles), else four
  if (one) {
    route_tiles<<<1, 1024, 0, stream>>>(topk_ids, n, E, rank, expert_offsets, tile_off);
  } else {
    if ((err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * E, stream)) != cudaSuccess) return int(err);
    count_rows<<<(n + 255) / 256, 256, 0, stream>>>(topk_ids, n, E, counts, rank);
    scan_counts<<<1, 1024, 0, stream>>>(counts, E, expert_offsets);
  }
  gather_rows<<<n, 128, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), topk_ids, topk_w, rank, expert_offsets,
                                     topk, H, sorted_pos, w_sorted, xs);
  if (!one) tile_offsets<<<1, 1024, 0, stream>>>(expert_offsets, E, tile_off);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
  int st = @@prefix@@_gemm(xs, w13, h, expert_offsets, tile_off, n, 2 * I, H, E, stream_);
  if (st != 0) return st;
  activate_rows<<<n, 128, 0, stream>>>(h, expert_offsets, E, I, w_sorted, activation,
                                       static_cast<__nv_bfloat16*>(act_out));
  return int(cudaGetLastError());
}
"""

_STAGE2 = r"""
namespace {
__global__ void combine_rows(const __nv_bfloat16* __restrict__ y, const int32_t* __restrict__ sorted_pos,
                             int topk, int H, __nv_bfloat16* __restrict__ out) {
  int t = blockIdx.x;
  const int32_t* sp = sorted_pos + int64_t(t) * topk;
  for (int j = threadIdx.x; j < H / 8; j += blockDim.x) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < topk; ++k) {
      int p = sp[k];
      if (p < 0) continue;
      uint4 v = reinterpret_cast<const uint4*>(y + int64_t(p) * H)[j];
      const __nv_bfloat16* hv = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] += __bfloat162float(hv[q]);
    }
    alignas(16) __nv_bfloat16 o[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) o[q] = __float2bfloat16(acc[q]);
    reinterpret_cast<uint4*>(out + int64_t(t) * H)[j] = *reinterpret_cast<const uint4*>(o);
  }
}
}  // namespace
""" + STAGE2_SIGNATURE + r"""  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % 16) || (I % 16)) return int(cudaErrorInvalidValue);
  if (E >= (1 << 17)) return int(cudaErrorInvalidValue);  // the GEMM's expert search covers 2^17 - 1 experts
  const int64_t rows = int64_t(T) * topk;
  Bump b{static_cast<char*>(workspace), 0};
  __nv_bfloat16* y = b.take<__nv_bfloat16>(rows * H);
  int32_t* tile_off = b.take<int32_t>(E + 1);
  if (!workspace) {
    if (workspace_bytes) *workspace_bytes = b.off + 256;
    return 0;
  }
  if (workspace_bytes && *workspace_bytes < b.off) return int(cudaErrorInvalidValue);
  if (T == 0) return 0;
  cudaError_t err;
  tile_offsets<<<1, 1024, 0, stream>>>(expert_offsets, E, tile_off);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
  int st = @@prefix@@_gemm(act, w2, y, expert_offsets, tile_off, int(rows), H, I, E, stream_);
  if (st != 0) return st;
  int threads = H / 8 >= 256 ? 256 : 128;
  combine_rows<<<T, threads, 0, stream>>>(y, sorted_pos, topk, H, static_cast<__nv_bfloat16*>(out));
  return int(cudaGetLastError());
}
"""

_BRIDGE = r"""#include <pthread.h>
#include "dsl/@@prefix@@.h"
static @@prefix@@_Kernel_Module_t jk_module;
static pthread_once_t jk_once = PTHREAD_ONCE_INIT;
static void jk_load(void) { @@prefix@@_Kernel_Module_Load(&jk_module); }
/* D[rows, N] = A[rows, K] . B[e, N, K]^T per expert (offsets, tile_off: device int32 [E+1]) */
int @@prefix@@_gemm(const void* A, const void* B, void* D, const int* offsets, const int* tile_off,
                    int rows, int N, int K, int E, void* stream) {
  pthread_once(&jk_once, jk_load);
  @@prefix@@_Tensor_a_t a = {(void*)A, {rows, K}, {K}};
  @@prefix@@_Tensor_b_t b = {(void*)B, {N, K, E}, {K, (long long)N * K}};
  @@prefix@@_Tensor_d_t d = {D, {rows, N}, {N}};
  @@prefix@@_Tensor_offsets_t o = {(void*)offsets, {E + 1}};
  @@prefix@@_Tensor_tile_off_t t = {(void*)tile_off, {E + 1}};
  int32_t ret = cute_dsl_@@prefix@@_wrapper(&jk_module, &a, &b, &d, &o, &t, (cudaStream_t)stream);
  if (ret != 0) return ret;
  return (int)cudaGetLastError();
}
"""


def render_cuda_unit(name: str, cuda: str) -> str:
    """A cutedsl unit without a DSL kernel: one CUDA file (the variant's plain CUDA units)."""
    spec = {"kernel": None, "params": {"unit": name}}
    return "// jitkiln-cutedsl " + json.dumps(spec, sort_keys=True) + "\n//@@file unit.cu\n" + cuda


def render_dsl_unit(inst) -> str:
    """The cutedsl unit text of ``inst`` (a bf16 :class:`~.instances.MoEGemm` with ``backend == "dsl"``)."""
    if inst.dtype != "bf16":
        raise ValueError(f"the CuTe DSL back end supports bf16 only, not {inst.dtype!r}")
    prefix = f"jkg_{inst.digest[:12]}"
    spec = {"kernel": KERNEL_MODULE, "kernel_sha256": kernel_sha256(), "entry": "compile_for", "prefix": prefix,
            "params": {"dtype": inst.dtype, "tile_m": inst.tile_m, "tile_n": inst.tile_n, "tile_k": inst.tile_k,
                       "cluster_m": inst.cluster_m, "cluster_n": inst.cluster_n, "schedule": inst.schedule}}
    if getattr(inst, "occupancy", 1) != 1:  # absent at 1: the 1-CTA units' text (and keys) unchanged
        spec["params"]["occupancy"] = inst.occupancy
    if getattr(inst, "consumers", 1) != 1:  # likewise
        spec["params"]["consumers"] = inst.consumers
    fields = dict(name=inst.name, symbol=inst.symbol, digest16=inst.digest[:16], prefix=prefix,
                  tile_m=inst.tile_m, cluster_m=inst.cluster_m)
    glue = (f"// jitkiln moe2stage instance (CuTe DSL GEMM): {inst.name}\n" + _COMMON
            + (_STAGE1 if inst.stage == 1 else _STAGE2))
    text = ("// jitkiln-cutedsl " + json.dumps(spec, sort_keys=True) + "\n//@@file glue.cu\n" + glue
            + "//@@file bridge.c\n" + _BRIDGE)
    for k, v in fields.items():
        text = text.replace(f"@@{k}@@", str(v))
    assert "@@" not in text.replace("//@@file", ""), "a template field without a value"
    return text
