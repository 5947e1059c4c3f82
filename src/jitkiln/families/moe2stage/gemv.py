"""moe2stage's weight-stream ("GEMV") instances: decode and small batches, where a GEMM tile is mostly padding.

At decode a token's top-k experts each see one or two rows, so the grouped GEMM's 64-row wgmma tiles are >95 %
padding and the time is the weight stream plus launches: the CUTLASS path pays routing with setup, gather, GEMM,
activation, setup, GEMM and combine -- five launches besides the GEMMs (eight when these units were measured against
it: routing was count and scan, setup its own launch) -- and reads weights through few large tiles.
These two units do the same two stages in one launch each, with the same C ABI and the same outputs, so either
may pair with the other stage's CUTLASS unit:

Stage 1 (``gemv1``): one CTA per (token-expert pair, a few blocks of 8 rows of I). The CTA of the first pair
    routed to an expert (its "leader") serves every pair routed to that expert (the expert's weights are read
    once), the others exit. Routing is computed in the CTA (the ids staged in shared memory and counted: the
    pair's sorted row = local pairs routed to a lower expert + earlier pairs routed to the same one), so there is
    no routing launch; CTA (0, 0) also writes ``expert_offsets``. The product uses the tensor cores with the
    *weights* as the MMA's M side (``mma.sync`` m16n8k16 bf16 / m16n8k32 e4m3: gate rows i..i+7 are M rows 0-7 and
    up rows I+i..I+i+7 are M rows 8-15, so each thread ends holding gate and up of the same (row, pair) and applies
    act(gate)*up*w in registers) and up to 8 pairs as N: each 16-byte weight load feeds two MMAs directly from
    registers (a fixed permutation of K, applied to both operands, lets every lane load 16 contiguous bytes).
    Warps of one block of rows split K (the hidden size) when there are few pairs -- the split is chosen at
    launch from the experts the pairs are expected to reach -- and reduce through shared memory; the next chunks'
    loads are in flight while the current ones feed the MMAs. Groups larger than 8 pairs take further passes.
    fp8: x is quantized with the static ``a_scale`` as it is loaded (as the CUTLASS gather does), h = acc *
    a_scale * w_scale[e] is kept in bf16 and the routed, weighted activation is rounded to e4m3 with a2_scale.
Stage 2 (``gemv2``): one CTA per (token, a few output rows); a warp (or, when tokens x rows are few, several
    warps splitting the work) streams those rows of the k experts' W2 (16-byte loads, 4 (expert, K step) items in
    flight) against the token's k activation rows and writes the combined, finished bf16 output -- the combine
    is the sum in registers, no second launch. A weight row shared by two tokens is read per token (the second
    read from L2): the heuristic takes this unit only where an expert sees about one or two rows.

Both read weights with ``ld.global.nc.L1::no_allocate`` (streamed past L1, predicated inside the asm so that no
masked-off load is ever issued) and accumulate in float32.

Longer than 400 lines: it is mostly the CUDA text of the two units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...family import CAbi, Instance
from .instances import STAGE1_ABI, STAGE2_ABI
from .templates import STAGE1_SIGNATURE, STAGE2_SIGNATURE


@dataclass(frozen=True)
class MoEGemv(Instance):
    """One weight-stream unit of one stage (plain CUDA: no CUTLASS, a few seconds to compile)."""

    family: ClassVar[str] = "moe2stage"
    stage: ClassVar[int] = 0
    kind: ClassVar[str] = "gemv"

    dtype: str  # bf16 | fp8 (e4m3 weights, per-expert scales; per-tensor activation scales)
    warps: int  # warps per CTA (the K split and the row blocks of a CTA; per-token stage 2: row groups)
    unroll: int  # K chunks in flight per warp (per-token stage 2: output rows per warp)
    n: int = 1  # routed rows per pass, in MMA columns of 8 (1, 2, 4); 0: stage 2's per-token unit

    N_CHOICES: ClassVar[tuple] = (1, 2, 4)
    N_DEFAULT: ClassVar[int] = 1

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp8"):
            raise ValueError(f"the weight-stream units are bf16 or fp8 (per-tensor), not {self.dtype!r}")
        if not 1 <= self.warps <= 16 or not 1 <= self.unroll <= 8:
            raise ValueError(f"warps {self.warps} (1..16) / unroll {self.unroll} (1..8) out of range")
        if self.n not in self.N_CHOICES:
            raise ValueError(f"n {self.n}: stage {self.stage} takes {', '.join(map(str, self.N_CHOICES))}")

    @property
    def name(self) -> str:
        tail = "" if self.n == self.N_DEFAULT else f"n{self.n}"
        return f"moe2stage_s{self.stage}_{self.dtype}_gemv_w{self.warps}u{self.unroll}{tail}"

    def params(self):
        d = super().params()
        d["stage"] = self.stage
        d["kind"] = self.kind
        return d

    @property
    def tile(self) -> str:
        rows = "per token" if self.n == 0 else f"{8 * self.n} rows a pass"
        return f"weight stream, {self.warps} warps, unroll {self.unroll}, {rows}"


@dataclass(frozen=True)
class MoEGemv1(MoEGemv):
    """Routing + x.W13^T + act(gate)*up*w in one launch; slot ``stage1``."""

    stage: ClassVar[int] = 1
    abi: ClassVar[CAbi] = STAGE1_ABI
    N_CHOICES: ClassVar[tuple] = (1,)  # 16- and 32-row passes measured slower than the 64x128 tiles (see heuristic)


@dataclass(frozen=True)
class MoEGemv2(MoEGemv):
    """act.W2^T + top-k combine in one launch; slot ``stage2``."""

    stage: ClassVar[int] = 2
    abi: ClassVar[CAbi] = STAGE2_ABI
    n: int = 0  # 0: per token (weights re-read per token, combine in registers); 1/2/4: grouped by expert
    N_CHOICES: ClassVar[tuple] = (0, 1, 2, 4)
    N_DEFAULT: ClassVar[int] = 0


def is_gemv(inst) -> bool:
    return getattr(inst, "kind", "") == "gemv"


_COMMON = r"""// jitkiln moe2stage instance: @@name@@
// generated by jitkiln.families.moe2stage.gemv (weight-stream unit); C ABI only (no torch headers)
#include <cstdint>
#include <cstddef>
#include <cmath>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <type_traits>

#if !defined(NDEBUG)
#error "jitkiln moe2stage units must be built with -DNDEBUG"
#endif

namespace {
namespace jk {

constexpr int kWarps = @@warps@@;
constexpr int kUnroll = @@unroll@@;
constexpr int kN = @@n@@ > 0 ? @@n@@ : 1;  // MMA column blocks (8 routed rows each) per pass
constexpr bool kFp8 = @@fp8@@;  // e4m3 weights (per-expert scales), e4m3 activations (per-tensor static scales)
using WT = std::conditional_t<kFp8, uint8_t, __nv_bfloat16>;  // weight (and stage 2 activation) element
constexpr int kLaneK = 16 / int(sizeof(WT));  // elements of one 16-byte load

// 16 bytes, or zeros where !ok: weights streamed past L1 (each is read once per CTA), activations through L1
// (other warps re-read them). The predicate is inside the asm: the compiler cannot turn a guarded load into an
// unconditional (speculated) one.
#define JK_LOAD16(NAME, QUALIFIERS)                                                                       \
  __device__ __forceinline__ uint4 NAME(const void* p, bool ok) {                                        \
    uint4 v;                                                                                             \
    asm("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n mov.u32 %0, 0;\n mov.u32 %1, 0;\n mov.u32 %2, 0;\n" \
        " mov.u32 %3, 0;\n @q ld.global." QUALIFIERS ".v4.u32 {%0, %1, %2, %3}, [%4];\n}"                   \
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "r"(int(ok)));                            \
    return v;                                                                                            \
  }
JK_LOAD16(ld_stream, "nc.L1::no_allocate")
JK_LOAD16(ld_act, "nc")

// four floats -> four e4m3 (saturating, round to nearest even), low byte first
[[maybe_unused]] __device__ __forceinline__ uint32_t e4m3x4(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}
// D[16x8] += A[16xK] B[Kx8], float32 accumulate: K = 16 bf16 (m16n8k16) or 32 e4m3 (m16n8k32). Both keep
// the same register roles: a0/a2 row g, a1/a3 row g+8, b0/b1 column g, each register 4 bytes of K.
[[maybe_unused]] __device__ __forceinline__ void mma_step(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (kFp8)
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}


// One K chunk of one warp (32 bf16 or 64 e4m3 elements: 16 bytes per lane and row): 16 weight rows (rows "lo" 0-7,
// rows "hi" 8-15 of the MMA's M) and kN x 8 routed rows (the MMA's N columns, B). B is read as WT, except in
// stage 1's fp8 unit, where it is bf16 x (32 bytes per lane) rounded to e4m3 with 1/a_scale when used.
[[maybe_unused]] constexpr int kChunkK = 4 * kLaneK;
template <bool Q> struct BReg { uint4 b[kN], b2[Q ? kN : 1]; };  // b2: the second 16 bytes of bf16 x (Q only)
template <bool Q> struct Chunk { uint4 a, u; BReg<Q> x; };

template <bool Q>
__device__ __forceinline__ uint4 b_operand(const BReg<Q>& r, int j, float inv_a) {
  if constexpr (Q) {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&r.b[j]);
    const __nv_bfloat16* h2 = reinterpret_cast<const __nv_bfloat16*>(&r.b2[j]);
    auto f = [&](int i) { return __bfloat162float(i < 8 ? h[i] : h2[i - 8]) * inv_a; };
    return make_uint4(e4m3x4(f(0), f(1), f(2), f(3)), e4m3x4(f(4), f(5), f(6), f(7)),
                      e4m3x4(f(8), f(9), f(10), f(11)), e4m3x4(f(12), f(13), f(14), f(15)));
  } else {
    return r.b[j];
  }
}

// d[j] += W[lo rows; hi rows] . B_j over K chunks [ch0, ch1) of a K-long dot product (K % kLaneK == 0: a lane's
// 16 bytes are whole or absent). brow[j]: the B row of MMA column g of block j, or NULL (a zero column).
// Register double buffering: the next kUnroll chunks are in flight while this batch feeds the MMAs.
// K permutation shared by both operands: lane (g, c) owns 4 bytes of K at a0/b0 and 4 at a2/b1 of each MMA step
// and loads 16 contiguous bytes of the chunk (elements c * kLaneK ..): the first 8 bytes feed step 0, the rest
// step 1.
template <typename BT>
__device__ __forceinline__ void mma_stream(float (&d)[kN][4], const WT* lo, const WT* hi, const BT* const (&brow)[kN],
                                           int K, int ch0, int ch1, float inv_a) {
  constexpr bool Q = kFp8 && std::is_same_v<BT, __nv_bfloat16>;
  const int c = threadIdx.x & 3;
  auto load = [&](Chunk<Q>& t, int ch) {
    const int k = ch * kChunkK + c * kLaneK;
    const bool ok = ch < ch1 && k < K;
    t.a = ld_stream(lo + k, ok);
    t.u = ld_stream(hi + k, ok);
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      t.x.b[j] = ld_act(brow[j] + k, ok && brow[j] != nullptr);
      if constexpr (Q) t.x.b2[j] = ld_act(brow[j] + k + 8, ok && brow[j] != nullptr);
    }
  };
  Chunk<Q> cur[kUnroll], nxt[kUnroll];
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) load(cur[r], ch0 + r);
  for (int ch = ch0; ch < ch1; ch += kUnroll) {
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) load(nxt[r], ch + kUnroll + r);
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const uint4 b = b_operand<Q>(cur[r].x, j, inv_a);
        mma_step(d[j], cur[r].a.x, cur[r].u.x, cur[r].a.y, cur[r].u.y, b.x, b.y);
        mma_step(d[j], cur[r].a.z, cur[r].u.z, cur[r].a.w, cur[r].u.w, b.z, b.w);
      }
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) cur[r] = nxt[r];
  }
}

static int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0 && cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return cached[dev] > 0 ? cached[dev] : 132;
}

// K split of the expert-grouped units: warps per block of rows, enough for every SM to stream (~24 warps each)
// from the row blocks that work -- those of the experts P uniform picks over E are expected to reach.
[[maybe_unused]] static int k_split(int E, int64_t P, int64_t blocks) {
  const double active = double(E) * (1.0 - pow(1.0 - 1.0 / double(E), double(P)));
  const int64_t target = int64_t(sm_count()) * 24;
  int split = 1;
  while (split < kWarps && active * double(blocks * split) < double(target)) split *= 2;
  return split;
}

}  // namespace jk
}  // namespace

extern "C" __attribute__((visibility("default"))) const char* jk_name_@@digest16@@(void) { return "@@name@@"; }
"""

_STAGE1 = r"""
namespace {
namespace jk {

__device__ __forceinline__ float act_fn(float g, int activation) {
  if (activation == 1) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
  return g / (1.0f + __expf(-g));
}

__device__ __forceinline__ bool is_local(int id, int E) { return id >= 0 && id < E; }

// expert_offsets[e] = local pairs routed to experts < e (e = 0..E); one CTA. hist: E + 1 ints of shared memory
// (or NULL: counted per expert over all pairs, for very large E).
__device__ void write_offsets(const int32_t* __restrict__ ids, int P, int E, int32_t* __restrict__ offsets,
                              int* hist) {
  if (hist) {
    for (int e = threadIdx.x; e <= E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    for (int q = threadIdx.x; q < P; q += blockDim.x) {
      int id = ids[q];
      if (is_local(id, E)) atomicAdd(hist + id, 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // exclusive scan by one warp, 32 experts a step
      int lane = threadIdx.x, carry = 0;
      for (int e0 = 0; e0 <= E; e0 += 32) {
        int e = e0 + lane;
        int v = (e < E) ? hist[e] : 0;
        int s = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          int n = __shfl_up_sync(0xffffffffu, s, o);
          if (lane >= o) s += n;
        }
        if (e <= E) offsets[e] = carry + s - v;
        carry += __shfl_sync(0xffffffffu, s, 31);
      }
    }
  } else {
    for (int e = threadIdx.x; e <= E; e += blockDim.x) {
      int n = 0;
      for (int q = 0; q < P; ++q) {
        int id = ids[q];
        n += (id >= 0 && id < e);
      }
      offsets[e] = n;
    }
  }
}

constexpr int kIdsCap = 4096;  // pairs whose expert ids are staged in shared memory (the rest are read from global)

// grid (P = T * topk pairs, ceil(I / 8 / (kWarps / split))); block kWarps * 32. Warp w serves rows
// i0 .. i0 + 7 (i-block w / split of this CTA) over K slice w % split; the split warps of an i-block reduce through
// shared memory. Dynamic shared memory: min(P, kIdsCap) ids + (E + 1) ints of CTA (0, 0)'s histogram (or 0).
__global__ void __launch_bounds__(kWarps * 32) gemv_stage1(
    const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ ids, const float* __restrict__ tw,
    const WT* __restrict__ w13, WT* __restrict__ act_out, int32_t* __restrict__ offsets,
    int32_t* __restrict__ sorted_pos, int P, int topk, int E, int H, int I, int activation, int hist_ok,
    int split, const float* __restrict__ a_scale, const float* __restrict__ w_scale,
    const float* __restrict__ a2_scale) {
  extern __shared__ int s_dyn[];
  int* s_ids = s_dyn;
  __shared__ int s_member[8];
  __shared__ int s_cnt[2];  // pairs routed to lower local experts, pairs routed to this expert
  __shared__ float s_red[kWarps][32][4];
  const int p = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cap = min(P, kIdsCap);
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    write_offsets(ids, P, E, offsets, hist_ok ? s_dyn + cap : nullptr);
    __syncthreads();
  }
  const int e = ids[p];
  if (!is_local(e, E)) {
    if (blockIdx.y == 0 && threadIdx.x == 0) sorted_pos[p] = -1;
    return;
  }
  // routing, in parallel: stage the ids, count lower-expert pairs and this expert's pairs, find an earlier pair of
  // this expert (then that pair's CTA serves it)
  if (threadIdx.x == 0) s_cnt[0] = s_cnt[1] = 0;
  __syncthreads();
  int less = 0, same = 0, dup = 0;
  for (int q = threadIdx.x; q < P; q += blockDim.x) {
    const int id = ids[q];
    if (q < cap) s_ids[q] = id;
    less += is_local(id, E) && id < e;
    same += id == e;
    dup |= id == e && q < p;
  }
  if (less) atomicAdd(&s_cnt[0], less);
  if (same) atomicAdd(&s_cnt[1], same);
  if (__syncthreads_or(dup)) return;
  const int base = s_cnt[0], group = s_cnt[1];

  const int g = lane >> 2, c = lane & 3;
  const int ib = warp / split, ks = warp % split;
  const int i0 = (blockIdx.y * (kWarps / split) + ib) * 8;
  const bool rows_ok = i0 < I;  // I % 8 == 0: an i-block is whole or absent
  const WT* gate = w13 + (int64_t(e) * 2 * I + (rows_ok ? i0 : 0) + g) * H;
  const WT* up = gate + int64_t(I) * H;
  const int nch = (H + kChunkK - 1) / kChunkK;  // K chunks
  const float inv_a = kFp8 ? 1.0f / a_scale[0] : 1.0f;
  const int per = (nch + split - 1) / split;
  const int ch0 = ks * per, ch1 = rows_ok ? min(nch, ch0 + per) : ch0;
  for (int m0 = 0; m0 < group; m0 += 8) {  // members m0..m0+7 (by pair index) of this expert's group
    if (warp == 0) {
      int seen = 0;
      for (int q0 = 0; q0 < P && seen < m0 + 8; q0 += 32) {
        const int q = q0 + lane;
        const bool hit = q < P && (q < cap ? s_ids[q] : ids[q]) == e;
        const unsigned m = __ballot_sync(0xffffffffu, hit);
        const int r = seen + __popc(m & ((1u << lane) - 1u));
        if (hit && r >= m0 && r < m0 + 8) s_member[r - m0] = q;
        seen += __popc(m);
      }
    }
    __syncthreads();
    const int gc = min(8, group - m0);
    const __nv_bfloat16* xr[1] = {g < gc ? x + int64_t(s_member[g] / topk) * H : nullptr};
    float d[1][4] = {};
    mma_stream(d, gate, up, xr, H, ch0, ch1, inv_a);
    // d[0][0], d[0][1]: gate of row i0+g for members 2c, 2c+1; d[0][2], d[0][3]: up of the same
#pragma unroll
    for (int j = 0; j < 4; ++j) s_red[warp][lane][j] = d[0][j];
    __syncthreads();
    if (ks == 0 && rows_ok) {
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      for (int w = warp; w < warp + split; ++w) {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] += s_red[w][lane][j];
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = 2 * c + h;
        if (m < gc) {
          const int q = s_member[m];
          const int row = base + m0 + m;
          if constexpr (kFp8) {  // as the CUTLASS units: h = acc * a_scale * w_scale[e] kept in bf16, then the
            // routed, weighted activation quantized with a2_scale
            const float alpha = a_scale[0] * w_scale[e];
            const float gv = __bfloat162float(__float2bfloat16(v[h] * alpha));
            const float uv = __bfloat162float(__float2bfloat16(v[2 + h] * alpha));
            const float y = act_fn(gv, activation) * uv * (tw[q] / a2_scale[0]);
            act_out[int64_t(row) * I + i0 + g] =
                uint8_t(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3));
          } else {
            const float y = act_fn(v[h], activation) * v[2 + h] * tw[q];
            act_out[int64_t(row) * I + i0 + g] = __float2bfloat16(y);
          }
          if (blockIdx.y == 0 && i0 == 0 && g == 0) sorted_pos[q] = row;
        }
      }
    }
    __syncthreads();
  }
}

}  // namespace jk
}  // namespace

""" + STAGE1_SIGNATURE + r"""  using namespace jk;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % 16) || (I % 16)) return int(cudaErrorInvalidValue);
  if (kFp8 ? !(a_scale && w_scale && a2_scale) : (a_scale || w_scale || a2_scale)) return int(cudaErrorInvalidValue);
  if (!workspace) {  // no workspace is used; a non-empty size keeps the caller's buffer non-NULL
    if (workspace_bytes) *workspace_bytes = 256;
    return 0;
  }
  if (T == 0) return 0;
  const int64_t P = int64_t(T) * topk;
  if (P > 0x7fffffff) return int(cudaErrorInvalidValue);
  const int cap = int(P < kIdsCap ? P : kIdsCap);
  const int hist_ok = (E + 1) * int(sizeof(int)) <= 16 * 1024;
  // K split (longer-lived warps when pairs are many); only the first pair of each expert works
  const int64_t blocks8 = I / 8;
  const int split = k_split(E, P, blocks8);
  const int per_cta = kWarps / split;
  dim3 grid(unsigned(P), unsigned((blocks8 + per_cta - 1) / per_cta));
  const size_t smem = sizeof(int) * (size_t(cap) + (hist_ok ? size_t(E) + 1 : 0));
  gemv_stage1<<<grid, kWarps * 32, smem, stream>>>(
      static_cast<const __nv_bfloat16*>(x), topk_ids, topk_w, static_cast<const WT*>(w13),
      static_cast<WT*>(act_out), expert_offsets, sorted_pos, int(P), topk, E, H, I, activation, hist_ok,
      split, a_scale, w_scale, a2_scale);
  return int(cudaGetLastError());
}
"""

_STAGE2 = r"""
namespace {
namespace jk {

// two e4m3 (low half of v) -> two floats
__device__ __forceinline__ float2 e4m3x2_f(uint32_t v) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(v & 0xffffu), __NV_E4M3);
  return __half22float2(*reinterpret_cast<__half2*>(&h));
}

__device__ __forceinline__ float lo_f(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi_f(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// the activations of one 16-byte load as floats (8 bf16 or 16 e4m3)
struct ActF { float v[kLaneK]; };
__device__ __forceinline__ ActF act_floats(const uint4& a) {
  ActF f;
  const uint32_t r[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kFp8) {
      const float2 p = e4m3x2_f(r[i]), q = e4m3x2_f(r[i] >> 16);
      f.v[4 * i] = p.x; f.v[4 * i + 1] = p.y; f.v[4 * i + 2] = q.x; f.v[4 * i + 3] = q.y;
    } else {
      f.v[2 * i] = lo_f(r[i]); f.v[2 * i + 1] = hi_f(r[i]);
    }
  }
  return f;
}

// 16 bytes of one weight row against the activations of the same K positions
__device__ __forceinline__ float dot16b(const uint4& w, const ActF& a) {
  const ActF wf = act_floats(w);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kLaneK; ++i) s += wf.v[i] * a.v[i];
  return s;
}

// the expert of sorted row pos: the largest e with off[e] <= pos (off[E] > pos)
__device__ __forceinline__ int expert_of(const int32_t* off, int E, int pos) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (off[mid] <= pos) lo = mid; else hi = mid - 1;
  }
  return lo;
}

constexpr int kRows = kUnroll;  // output rows per row group (one warp, or `split` warps sharing the items)
constexpr int kJ = 4;  // (routed row, K step) items in flight per warp
constexpr int kOffCap = 8192;   // experts whose offsets are staged in shared memory for the lookup

// grid (T, ceil(H / (kWarps / split * kRows))); block kWarps * 32; dynamic shared memory: E + 1 ints (or 0: E >
// kOffCap). Warp w serves rows group w / split and every split-th (row, K step) item from w % split; the split
// warps of a group add their sums through shared memory.
__global__ void __launch_bounds__(kWarps * 32) gemv_stage2(
    const WT* __restrict__ act, const WT* __restrict__ w2, __nv_bfloat16* __restrict__ out,
    const int32_t* __restrict__ offsets, const int32_t* __restrict__ sorted_pos, int topk, int E, int H, int I,
    int split, const float* __restrict__ a2_scale, const float* __restrict__ w2_scale) {
  extern __shared__ int s_off[];
  __shared__ int s_pos[32], s_e[32], s_n;
  __shared__ float s_red[kWarps][kRows];
  const int t = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sp = warp % split;
  const int h0 = (blockIdx.y * (kWarps / split) + warp / split) * kRows;
  const bool staged = E < kOffCap;
  if (staged)
    for (int e = threadIdx.x; e <= E; e += blockDim.x) s_off[e] = offsets[e];
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  constexpr int kStep = 32 * kLaneK;  // K elements of one item: 16 bytes per lane
  const int kit = (I + kStep - 1) / kStep;
  for (int j0 = 0; j0 < topk; j0 += 32) {
    __syncthreads();
    if (warp == 0) {  // this token's routed rows among pairs j0..j0+31, compacted (skipped pairs dropped)
      const int j = j0 + lane;
      const int pos = j < topk ? sorted_pos[int64_t(t) * topk + j] : -1;
      const unsigned m = __ballot_sync(0xffffffffu, pos >= 0);
      if (pos >= 0) {
        const int r = __popc(m & ((1u << lane) - 1u));
        s_pos[r] = pos;
        s_e[r] = expert_of(staged ? s_off : offsets, E, pos);
      }
      if (lane == 0) s_n = __popc(m);
    }
    __syncthreads();
    // (row, K step) items, kJ in flight per warp: every load of a step is independent of the others
    const int items = s_n * kit;
    for (int it0 = sp * kJ; it0 < items; it0 += kJ * split) {
      uint4 a[kJ], w[kJ][kRows];
      float sc[kJ];  // fp8: a2_scale * w2_scale[e] of each item
#pragma unroll
      for (int q = 0; q < kJ; ++q) {
        const int it = it0 + q;
        const int j = it / kit;
        const int k = (it - j * kit) * kStep + lane * kLaneK;
        const bool ok = it < items && k < I;
        const int pos = ok ? s_pos[j] : 0, e = ok ? s_e[j] : 0;
        a[q] = ld_act(act + int64_t(pos) * I + k, ok);
        sc[q] = kFp8 && ok ? a2_scale[0] * w2_scale[e] : 1.0f;
        const WT* wr = w2 + (int64_t(e) * H + h0) * I + k;
#pragma unroll
        for (int r = 0; r < kRows; ++r) w[q][r] = ld_stream(wr + int64_t(r) * I, ok && h0 + r < H);
      }
#pragma unroll
      for (int q = 0; q < kJ; ++q) {
        const ActF af = act_floats(a[q]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += (kFp8 ? sc[q] : 1.0f) * dot16b(w[q][r], af);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    acc[r] = v;
  }
  if (split > 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) s_red[warp][r] = acc[r];
    }
    __syncthreads();
    if (sp == 0 && lane == 0) {
      for (int w = warp + 1; w < warp + split; ++w) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += s_red[w][r];
      }
    }
  }
  if (sp == 0 && lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (h0 + r < H) out[int64_t(t) * H + h0 + r] = __float2bfloat16(acc[r]);
  }
}

}  // namespace jk
}  // namespace

""" + STAGE2_SIGNATURE + r"""  using namespace jk;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % 16) || (I % 16)) return int(cudaErrorInvalidValue);
  if (kFp8 ? !(a2_scale && w2_scale) : (a2_scale || w2_scale)) return int(cudaErrorInvalidValue);
  if (!workspace) {
    if (workspace_bytes) *workspace_bytes = 256;
    return 0;
  }
  if (T == 0) return 0;
  // warps per row group: enough warps to keep every SM streaming (~24 each) when tokens x rows are few
  const int64_t groups = int64_t(T) * ((H + kRows - 1) / kRows);
  const int64_t target = int64_t(sm_count()) * 24;
  int split = 1;
  while (split < kWarps && groups * split < target) split *= 2;
  const int rows_per_cta = kWarps / split * kRows;
  dim3 grid(unsigned(T), unsigned((H + rows_per_cta - 1) / rows_per_cta));
  const size_t smem = E < kOffCap ? sizeof(int) * (size_t(E) + 1) : 0;
  gemv_stage2<<<grid, kWarps * 32, smem, stream>>>(
      static_cast<const WT*>(act), static_cast<const WT*>(w2),
      static_cast<__nv_bfloat16*>(out), expert_offsets, sorted_pos, topk, E, H, I, split, a2_scale, w2_scale);
  return int(cudaGetLastError());
}
"""


_STAGE2_GROUPED = r"""
namespace {
namespace jk {

// grid (E, ceil(H / 16 / (kWarps / split))); block kWarps * 32. The CTA of expert e streams 16 rows of W2[e] per
// warp group (rows h0 .. h0 + 7 are the MMA's M rows 0-7, h0 + 8 .. h0 + 15 rows 8-15) against the expert's routed
// activation rows (contiguous: sorted rows offsets[e] ..), kN x 8 of them a pass, and writes float32 partial rows
// y[sorted row][h]. Warp w serves row block w / split over K slice w % split; split warps reduce through shared
// memory (kWarps x 32 x 4 kN floats, dynamic, when split > 1).
__global__ void __launch_bounds__(kWarps * 32) gemv_stage2g(
    const WT* __restrict__ act, const WT* __restrict__ w2, float* __restrict__ y,
    const int32_t* __restrict__ offsets, int E, int H, int I, int split, const float* __restrict__ a2_scale,
    const float* __restrict__ w2_scale) {
  extern __shared__ float s_red2[];
  const int e = blockIdx.x;
  const int base = offsets[e], group = offsets[e + 1] - base;
  if (group <= 0) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int ib = warp / split, ks = warp % split;
  const int h0 = (blockIdx.y * (kWarps / split) + ib) * 16;
  const bool rows_ok = h0 < H;  // H % 16 == 0: a row block is whole or absent
  const WT* lo = w2 + (int64_t(e) * H + (rows_ok ? h0 : 0) + g) * I;
  const WT* hi = lo + int64_t(8) * I;
  const int nch = (I + kChunkK - 1) / kChunkK;
  const int per = (nch + split - 1) / split;
  const int ch0 = ks * per, ch1 = rows_ok ? min(nch, ch0 + per) : ch0;
  const float scale = kFp8 ? a2_scale[0] * w2_scale[e] : 1.0f;
  constexpr int kPass = 8 * kN;
  for (int m0 = 0; m0 < group; m0 += kPass) {
    const int gc = min(kPass, group - m0);
    const WT* ar[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) ar[j] = 8 * j + g < gc ? act + int64_t(base + m0 + 8 * j + g) * I : nullptr;
    float d[kN][4] = {};
    mma_stream(d, lo, hi, ar, I, ch0, ch1, 1.0f);
    if (split > 1) {
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kN; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) s_red2[(warp * 32 + lane) * 4 * kN + 4 * j + v] = d[j][v];
      __syncthreads();
      if (ks == 0) {
        for (int w = warp + 1; w < warp + split; ++w)
#pragma unroll
          for (int j = 0; j < kN; ++j)
#pragma unroll
            for (int v = 0; v < 4; ++v) d[j][v] += s_red2[(w * 32 + lane) * 4 * kN + 4 * j + v];
      }
    }
    if (ks == 0 && rows_ok) {
      // d[j][0], d[j][1]: row h0+g for rows 8j+2c, 8j+2c+1 of the pass; d[j][2], d[j][3]: row h0+8+g of the same
#pragma unroll
      for (int j = 0; j < kN; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = 8 * j + 2 * c + h;
          if (m < gc) {
            float* yr = y + int64_t(base + m0 + m) * H + h0 + g;
            yr[0] = d[j][h] * scale;
            yr[8] = d[j][2 + h] * scale;
          }
        }
    }
  }
}

// out[t] = sum of y over token t's routed rows (float32, rounded once); block: 4 columns per thread
__global__ void combine_y(const float* __restrict__ y, const int32_t* __restrict__ sorted_pos, int topk, int H,
                          __nv_bfloat16* __restrict__ out) {
  const int t = blockIdx.x;
  for (int h = threadIdx.x * 4; h < H; h += blockDim.x * 4) {
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < topk; ++j) {
      const int pos = sorted_pos[int64_t(t) * topk + j];
      if (pos < 0) continue;
      const float4 v = *reinterpret_cast<const float4*>(y + int64_t(pos) * H + h);
      s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
    }
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out + int64_t(t) * H + h);
    o[0] = __floats2bfloat162_rn(s.x, s.y);
    o[1] = __floats2bfloat162_rn(s.z, s.w);
  }
}

}  // namespace jk
}  // namespace

""" + STAGE2_SIGNATURE + r"""  using namespace jk;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % 16) || (I % 16)) return int(cudaErrorInvalidValue);
  if (kFp8 ? !(a2_scale && w2_scale) : (a2_scale || w2_scale)) return int(cudaErrorInvalidValue);
  const int64_t P = int64_t(T) * topk;
  const size_t need = size_t(P > 0 ? P : 1) * size_t(H) * sizeof(float);  // y: float32 rows, in sorted order
  if (!workspace) {
    if (workspace_bytes) *workspace_bytes = need;
    return 0;
  }
  if (!workspace_bytes || *workspace_bytes < need) return int(cudaErrorInvalidValue);
  if (T == 0) return 0;
  if (P > 0x7fffffff || E > 0x7fffffff - 1) return int(cudaErrorInvalidValue);
  const int64_t blocks16 = H / 16;
  const int split = k_split(E, P, blocks16);
  const int per_cta = kWarps / split;
  dim3 grid(unsigned(E), unsigned((blocks16 + per_cta - 1) / per_cta));
  const size_t smem = split > 1 ? sizeof(float) * size_t(kWarps) * 32 * 4 * kN : 0;
  float* y = static_cast<float*>(workspace);
  gemv_stage2g<<<grid, kWarps * 32, smem, stream>>>(
      static_cast<const WT*>(act), static_cast<const WT*>(w2), y, expert_offsets, E, H, I, split, a2_scale,
      w2_scale);
  const int threads = H / 4 >= 256 ? 256 : ((H / 4 + 31) / 32) * 32;
  combine_y<<<unsigned(T), threads, 0, stream>>>(y, sorted_pos, topk, H, static_cast<__nv_bfloat16*>(out));
  return int(cudaGetLastError());
}
"""

def render_gemv(inst: MoEGemv) -> str:
    text = _COMMON + (_STAGE1 if inst.stage == 1 else _STAGE2 if inst.n == 0 else _STAGE2_GROUPED)
    for k, v in dict(name=inst.name, symbol=inst.symbol, digest16=inst.digest[:16], warps=inst.warps,
                     unroll=inst.unroll, n=inst.n, fp8="true" if inst.dtype == "fp8" else "false").items():
        text = text.replace(f"@@{k}@@", str(v))
    assert "@@" not in text, "a template field without a value"
    return text
