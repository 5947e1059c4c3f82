"""Translation-unit text of a moe2stage instance.

Every unit is self-contained apart from the CUTLASS headers (found at build time under the PyPI package
``nvidia-cutlass``): the routing / gather / activation / combine kernels are written out in the unit, so the
unit's text is the whole cache key. No torch header is included anywhere; the launcher is ``extern "C"``,
takes raw device pointers and a ``cudaStream_t`` (as ``void*``) and returns 0 or an error code:

* a CUDA error code (``cudaError_t``, < 10000) from the first launch that failed, or
* ``10000 + cutlass::Status`` when CUTLASS refused the arguments (``can_implement`` / ``initialize``).

Workspace protocol (both stages): call with ``workspace == NULL`` and a non-NULL ``workspace_bytes``: the
launcher writes the bytes it needs for this problem and returns 0 without launching anything (host only, no
CUDA call but the cached device query). Call again with a device buffer of at least that size to run.

Stage 1 (``jk_launch_<d>``, :data:`STAGE1_ARGS`)::

    x            [T, H]        bf16 hidden states (row-major)
    topk_ids     [T, topk]     int32 expert ids; ids outside [0, E) are skipped (expert parallel: not local)
    topk_w       [T, topk]     float32 routing weights
    w13          [E, 2I, H]    gate rows 0..I-1, up rows I..2I-1 (K = H contiguous), element = variant dtype
    act_out      [T*topk, I]   out: routed, weighted activation act(gate)*up*w, rows sorted by expert
    expert_offsets [E+1]       out: int32 prefix sums of rows per expert (device)
    sorted_pos   [T*topk]      out: int32 row of (t, k) in act_out, -1 if skipped
    T, topk, E, H, I, activation (0 silu, 1 gelu-erf), a_scale, w_scale (fp8: float32 device pointers,
    a_scale [1], w_scale [E]; bf16: NULL), a2_scale (fp8: scale act_out is quantized with; bf16: NULL),
    workspace, workspace_bytes, stream

Stage 2 (:data:`STAGE2_ARGS`)::

    act          [T*topk, I]   stage 1's act_out
    w2           [E, H, I]     (K = I contiguous)
    out          [T, H]        bf16: out[t] = sum_k y[sorted_pos[t, k]] (skipped rows add nothing)
    expert_offsets, sorted_pos from stage 1; T, topk, E, H, I, a2_scale, w2_scale, workspace, workspace_bytes,
    stream

fp8b128 (e4m3, 128-block scales; H and I multiples of 128) keeps both ABIs, with these argument meanings:
stage 1 ``x`` is bf16 (``a_scale`` NULL: quantized in the gather per token per 128 channels, scale = amax/448)
or e4m3 with ``a_scale`` [T, H/128] float32; ``w_scale`` is [E, 2I/128, H/128] float32 (128x128 blocks of
w13); ``a2_scale`` is an *output*, float32 [T*topk*I/128]: the 1x128 scales of ``act_out`` (e4m3), written in
the grouped layout stage 2's GEMM reads (per expert e, [I/128][M_e] at offset off_e * I/128). Stage 2 takes
that buffer as ``a2_scale`` and ``w2_scale`` [E, H/128, I/128]. The GEMMs are CUTLASS's blockwise-scaling
ptr-array kernels (``KernelPtrArrayTmaWarpSpecialized{Pingpong,Cooperative}FP8Blockwise``): scales are applied
per 128-deep k-tile in float32, the epilogue's alpha is 1.

No host synchronisation happens inside either launcher: the per-expert row counts live on the device only,
the grouped GEMM reads its problem shapes from device memory (CUTLASS ptr-array, no host problem shapes) and
the persistent grid is sized by the SM count, so both stages can be captured in a CUDA graph.

Swapped-operand instances (``swap``, bf16 / fp8) give the weights to the GEMM's A and the expert's rows to its
B (problem (N, M_e, K) per expert) and write D column-major, which is the same [rows, N] memory: only the
problem shape, the pointers and strides and D's layout differ from the plain unit (:data:`SETUP_PTRS`).

Longer than 400 lines: it is mostly the CUDA/CUTLASS text of the units.
"""
from __future__ import annotations


# The launchers' C signatures as every unit kind writes them (CUTLASS, CuTe DSL glue, weight-stream): one text, so
# the ABIs above and the units cannot drift apart.
STAGE1_SIGNATURE = r"""extern "C" __attribute__((visibility("default"))) int @@symbol@@(const void* x, const int32_t* topk_ids, const float* topk_w, const void* w13,
                        void* act_out, int32_t* expert_offsets, int32_t* sorted_pos,
                        int T, int topk, int E, int H, int I, int activation,
                        const float* a_scale, const float* w_scale, const float* a2_scale,
                        void* workspace, size_t* workspace_bytes, void* stream_) {
"""
STAGE2_SIGNATURE = r"""extern "C" __attribute__((visibility("default"))) int @@symbol@@(const void* act, const void* w2, void* out, const int32_t* expert_offsets,
                        const int32_t* sorted_pos, int T, int topk, int E, int H, int I,
                        const float* a2_scale, const float* w2_scale,
                        void* workspace, size_t* workspace_bytes, void* stream_) {
"""

ELEMENT = {
    "bf16": "cutlass::bfloat16_t",
    "fp8": "cutlass::float_e4m3_t",
}

SCHEDULE = {
    # (kernel schedule, epilogue schedule) per (dtype, schedule)
    ("bf16", "pingpong"): ("cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong",
                           "cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong"),
    ("bf16", "cooperative"): ("cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative",
                              "cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative"),
    ("fp8", "pingpong"): ("cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum",
                          "cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong"),
    ("fp8", "cooperative"): ("cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum",
                             "cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative"),
}

# --------------------------------------------------------------------------------------------------------------
# fp8b128: e4m3 with 128-block scales (DeepSeek-V3 style), CUTLASS's blockwise-scaling ptr-array mainloop.
#
# Scale layouts the grouped GEMM reads, per expert e with M_e rows starting at sorted row off_e (offsets from
# the routing):
#   SFA (activations, 1x128): M-major per expert, [K/128][M_e] floats at sfa + off_e * K/128 (CUTLASS's
#        Sm90BlockwiseScaleConfig<1, 128, 128, MN, K>, the layout of example 68's sparse-groups variant);
#        written by the gather (stage 1) and the activation kernel (stage 2 input) -- never by the caller.
#   SFB (weights, 128x128): K-major, [N/128][K/128] floats at w_scale + e * N/128 * K/128, i.e. the caller's
#        [E, N/128, K/128] row-major tensor as is.
# --------------------------------------------------------------------------------------------------------------

B128_SCHEDULE = {
    "pingpong": ("cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise",
                 "cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong"),
    "cooperative": ("cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise",
                    "cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative"),
}


# --------------------------------------------------------------------------------------------------------------
# The unit text, one for every variant: the parts every variant shares are written once; where fp8b128 differs
# an alternative pair stands, (bf16 / fp8 text, fp8b128 text). Fields are substituted as @@name@@ (C++ braces
# stay as they are). The rendered text of every instance is the cache key: a change here rebuilds every unit.
# --------------------------------------------------------------------------------------------------------------

# The operand roles: the plain text (activations are the GEMM's A, weights its B, the output row-major) and the
# swapped one (``swap`` instances, bf16 / fp8: weights are A and activations B, so the problem per expert is
# (N, M_e, K), a tile's M covers output columns and its N routed rows, and the output is written column-major,
# which is the same [rows, N] row-major memory). A and B are one element type there, so only pointers, strides,
# the problem shape and D's layout change.
LAYOUT_D = ("using LayoutD = cutlass::layout::RowMajor;     // output [rows, N]\n",
            "using LayoutD = cutlass::layout::ColumnMajor;  // output [rows, N] seen as (N, rows): swapped operands\n")
SETUP_PTRS = (r"""  g.shapes[e] = Shape3(m, N, K);
  g.pA[e] = A + int64_t(off) * K;
  g.pB[e] = B + int64_t(e) * N * K;
  g.pD[e] = D + int64_t(off) * N;
  StrideA sa{}; cute::get<0>(sa) = K; g.sA[e] = sa;
  StrideB sb{}; cute::get<0>(sb) = K; g.sB[e] = sb;
  StrideD sd{}; cute::get<0>(sd) = N; g.sD[e] = sd;
""", r"""  g.shapes[e] = Shape3(N, m, K);  // swapped: weights are A (N x K), the expert's rows B (m x K)
  g.pA[e] = reinterpret_cast<const ElementA*>(B + int64_t(e) * N * K);
  g.pB[e] = reinterpret_cast<const ElementB*>(A + int64_t(off) * K);
  g.pD[e] = D + int64_t(off) * N;
  StrideA sa{}; cute::get<0>(sa) = K; g.sA[e] = sa;
  StrideB sb{}; cute::get<0>(sb) = K; g.sB[e] = sb;
  StrideD sd{}; cute::get<1>(sd) = N; g.sD[e] = sd;  // column-major (N, m): column j is row off + j of D
""")

# includes, types, the CUTLASS kernel, host helpers
_PRELUDE = (
    (  # bf16 / fp8 | fp8b128
        r"""// jitkiln moe2stage instance: @@name@@
// generated by jitkiln.families.moe2stage.templates; C ABI only (no torch headers)
""",
        r"""// jitkiln moe2stage instance: @@name@@
// generated by jitkiln.families.moe2stage.templates (fp8b128: e4m3, 128-block scales); C ABI only (no torch headers)
""",
    ),
    r"""#include <cstdint>
#include <cstddef>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
""",
    (  # bf16 / fp8 | fp8b128
        r"""""",
        r"""#include "cutlass/detail/blockwise_scale_layout.hpp"
""",
    ),
    r"""#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#if !defined(NDEBUG)
#error "jitkiln moe2stage units must be built with -DNDEBUG (device asserts serialize the wgmma pipeline, C7510)"
#endif

namespace {
namespace jk {
using namespace cute;

""",
    (  # bf16 / fp8 | fp8b128
        r"""using ElementA = @@element@@;
using ElementB = @@element@@;
""",
        r"""using ElementA = cutlass::float_e4m3_t;
using ElementB = cutlass::float_e4m3_t;
""",
    ),
    r"""using ElementD = cutlass::bfloat16_t;
using ElementAcc = float;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // per expert (M_e, N, K)
using LayoutA = cutlass::layout::RowMajor;     // activations [rows, K], K contiguous
using LayoutB = cutlass::layout::ColumnMajor;  // weights [E][N, K], K contiguous ("TN")
@@layout_d@@constexpr int kAlignA = 128 / cutlass::sizeof_bits<ElementA>::value;
constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
""",
    (  # bf16 / fp8 | fp8b128
        r"""constexpr bool kFp8 = @@is_fp8@@;
""",
        r"""constexpr int kBlock = 128;  // scale block: activations 1 x 128 (per token), weights 128 x 128
constexpr float kFp8Max = 448.0f;

// SFA M-major (per row, per 128 K), SFB K-major (the caller's [E, N/128, K/128] weight scales)
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::MN,
                                                              cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
""",
    ),
    r"""
using TileShape = Shape<_@@tile_m@@, _@@tile_n@@, _@@tile_k@@>;
using ClusterShape = Shape<_@@cluster_m@@, _@@cluster_n@@, _1>;
using KernelSchedule = @@kernel_schedule@@;
using EpilogueSchedule = @@epilogue_schedule@@;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
    void, LayoutD*, kAlignD, ElementD, LayoutD*, kAlignD, EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAcc, void, ElementAcc>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
""",
    (  # bf16 / fp8 | fp8b128
        r"""    ElementA, LayoutA*, kAlignA, ElementB, LayoutB*, kAlignB, ElementAcc, TileShape, ClusterShape,
""",
        r"""    ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignA, ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignB,
    ElementAcc, TileShape, ClusterShape,
""",
    ),
    r"""    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
using StrideA = typename GemmKernel::InternalStrideA;
using StrideB = typename GemmKernel::InternalStrideB;
using StrideC = typename GemmKernel::InternalStrideC;
using StrideD = typename GemmKernel::InternalStrideD;
using Shape3 = typename ProblemShape::UnderlyingProblemShape;

constexpr int kStatusBase = 10000;  // returned as kStatusBase + cutlass::Status

static int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (cached[dev] == 0) cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev);
  return cached[dev];
}

// bump allocator over the caller's workspace (256-byte aligned pieces)
struct Bump {
  char* base; size_t off;
  template <class T> T* take(size_t n) {
    off = (off + 255) & ~size_t(255);
    T* p = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += n * sizeof(T);
    return p;
  }
};

struct GemmArrays {
  Shape3* shapes; const ElementA** pA; const ElementB** pB; ElementD** pD;
""",
    (  # bf16 / fp8 | fp8b128
        r"""  StrideA* sA; StrideB* sB; StrideD* sD; float* alpha; float** alpha_ptr;
""",
        r"""  StrideA* sA; StrideB* sB; StrideD* sD;
  const float** pSFA; const float** pSFB; LayoutSFA* lSFA; LayoutSFB* lSFB;
""",
    ),
    r"""};

static GemmArrays take_arrays(Bump& b, int E) {
  GemmArrays g;
  g.shapes = b.take<Shape3>(E); g.pA = b.take<const ElementA*>(E); g.pB = b.take<const ElementB*>(E);
  g.pD = b.take<ElementD*>(E); g.sA = b.take<StrideA>(E); g.sB = b.take<StrideB>(E); g.sD = b.take<StrideD>(E);
""",
    (  # bf16 / fp8 | fp8b128
        r"""  g.alpha = b.take<float>(E); g.alpha_ptr = b.take<float*>(E);
  return g;
}

// Expert e's grouped-GEMM problem shape, pointers and strides, from device offsets.
__device__ void setup_one(const GemmArrays& g, const int32_t* __restrict__ offsets, int e, int N, int K,
                          const ElementA* A, const ElementB* B, ElementD* D,
                          const float* a_scale, const float* w_scale) {
""",
        r"""  g.pSFA = b.take<const float*>(E); g.pSFB = b.take<const float*>(E);
  g.lSFA = b.take<LayoutSFA>(E); g.lSFB = b.take<LayoutSFB>(E);
  return g;
}

// Expert e's problem shape, operand and scale pointers, strides and scale layouts, from the device offsets (no
// host sync). sfa: the M-major-per-expert activation scales; sfb: [E, N/128, K/128].
__device__ void setup_one(const GemmArrays& g, const int32_t* __restrict__ offsets, int e, int N, int K,
                          const ElementA* A, const ElementB* B, ElementD* D,
                          const float* sfa, const float* sfb) {
""",
    ),
    r"""  int off = offsets[e];
  int m = offsets[e + 1] - off;
@@setup_ptrs@@""",
    (  # bf16 / fp8 | fp8b128
        r"""  float alpha = 1.0f;
  if (a_scale) alpha *= a_scale[0];
  if (w_scale) alpha *= w_scale[e];
  g.alpha[e] = alpha;
  g.alpha_ptr[e] = g.alpha + e;
""",
        r"""  g.pSFA[e] = sfa + int64_t(off) * (K / kBlock);
  g.pSFB[e] = sfb + int64_t(e) * (N / kBlock) * (K / kBlock);
  g.lSFA[e] = ScaleConfig::tile_atom_to_shape_SFA(make_shape(m, N, K, 1));
  g.lSFB[e] = ScaleConfig::tile_atom_to_shape_SFB(make_shape(m, N, K, 1));
""",
    ),
    r"""}

// One thread per expert: setup_one for every expert (stage 2; stage 1 past route_groups' limits).
__global__ void setup_groups(GemmArrays g, const int32_t* __restrict__ offsets, int E, int N, int K,
                             const ElementA* A, const ElementB* B, ElementD* D, const float* s1, const float* s2) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e < E) setup_one(g, offsets, e, N, K, A, B, D, s1, s2);
}

static typename Gemm::Arguments gemm_args(const GemmArrays& g, int E) {
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm_count();
  typename Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion{};
""",
    (  # bf16 / fp8 | fp8b128
        r"""  fusion.beta = 0.0f;
  fusion.beta_ptr = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dBeta = {cute::_0{}, cute::_0{}, 0};
  if (kFp8) {  // per-expert alpha = a_scale * w_scale[e]
    fusion.alpha = 0.0f;
    fusion.alpha_ptr = nullptr;
    fusion.alpha_ptr_array = g.alpha_ptr;
    fusion.dAlpha = {cute::_0{}, cute::_0{}, 1};
  } else {
    fusion.alpha = 1.0f;
    fusion.alpha_ptr = nullptr;
    fusion.alpha_ptr_array = nullptr;
    fusion.dAlpha = {cute::_0{}, cute::_0{}, 0};
  }
  args = typename Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {E, g.shapes, nullptr},
      {g.pA, g.sA, g.pB, g.sB},
""",
        r"""  fusion.alpha = 1.0f;  // every scale is applied in the mainloop, per 128-block
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dAlpha = {cute::_0{}, cute::_0{}, 0};
  fusion.dBeta = {cute::_0{}, cute::_0{}, 0};
  args = typename Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {E, g.shapes, nullptr},
      {g.pA, g.sA, g.pB, g.sB, g.pSFA, g.lSFA, g.pSFB, g.lSFB},
""",
    ),
    r"""      {fusion, nullptr, reinterpret_cast<StrideC*>(g.sD), g.pD, g.sD},
      hw};
  return args;
}

""",
    (  # bf16 / fp8 | fp8b128
        r"""__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ cutlass::bfloat16_t from_f<cutlass::bfloat16_t>(float v) {
  return cutlass::bfloat16_t(v);
}
template <> __device__ __forceinline__ cutlass::float_e4m3_t from_f<cutlass::float_e4m3_t>(float v) {
  v = fminf(fmaxf(v, -448.0f), 448.0f);
  return cutlass::float_e4m3_t(v);
""",
        r"""__device__ __forceinline__ ElementA to_e4m3(float v) {
  return ElementA(fminf(fmaxf(v, -kFp8Max), kFp8Max));
}

// One warp quantizes one 128-value block held as 4 values per lane: scale = amax / 448 (1 if the block is
// zero), q = v * (1 / scale) saturated to +-448. Writes the lane's 4 bytes; returns the scale.
__device__ __forceinline__ float quant_block4(const float (&v)[4], ElementA* dst4) {
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  float s = amax > 0.0f ? amax / kFp8Max : 1.0f;
  float inv = 1.0f / s;
  alignas(4) ElementA q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = to_e4m3(v[i] * inv);
  *reinterpret_cast<uint32_t*>(dst4) = *reinterpret_cast<const uint32_t*>(q);
  return s;
""",
    ),
    r"""}

}  // namespace jk
}  // namespace
""",
)


# the block-wide exclusive scan the routing kernels use (the CuTe DSL glue includes it too)
BLOCK_SCAN = r"""// Exclusive scan of one value per thread over a block of 1024: (this thread's prefix, the block's total).
__device__ __forceinline__ int2 block_scan(int v, int32_t* part) {
  const int tid = threadIdx.x;
  __syncthreads();  // part may still be read by an earlier scan
  part[tid] = v;
  __syncthreads();
  for (int d = 1; d < 1024; d <<= 1) {
    int u = tid >= d ? part[tid - d] : 0;
    __syncthreads();
    part[tid] += u;
    __syncthreads();
  }
  return make_int2(part[tid] - v, part[1023]);
}
"""


# routing kernels every moe2stage unit shares (the CuTe DSL glue's stage 1 includes the same text; both after
# BLOCK_SCAN): (t, k) -> rank inside its expert and per-expert counts; the exclusive scan of the counts into row
# offsets; both in one block (route_block) while the counts fit in shared memory
COUNT_SCAN = r"""// (t, k) -> rank of this row inside its expert; counts per expert.
__global__ void count_rows(const int32_t* __restrict__ ids, int n, int E, int32_t* __restrict__ counts,
                           int32_t* __restrict__ rank) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int e = ids[i];
  rank[i] = (e >= 0 && e < E) ? atomicAdd(&counts[e], 1) : -1;
}

// Exclusive scan of E counts in one block of 1024 threads (E is small: local experts).
__global__ void __launch_bounds__(1024) scan_counts(const int32_t* __restrict__ counts, int E,
                                                    int32_t* __restrict__ offsets) {
  __shared__ int32_t part[1024];
  const int per = (E + 1023) / 1024;
  const int lo = min(E, int(threadIdx.x) * per), hi = min(E, lo + per);
  int s = 0;
  for (int e = lo; e < hi; ++e) s += counts[e];
  const int2 r = block_scan(s, part);
  int run = r.x;
  for (int e = lo; e < hi; ++e) { offsets[e] = run; run += counts[e]; }
  if (threadIdx.x == 0) offsets[E] = r.y;
}

// Routing by one block of 1024 while the counts fit in shared memory (E <= kRouteE) and one block's pass over
// the pairs is short (n <= kRouteN): each (t, k) pair's rank inside its expert (shared-memory atomics) and the
// experts' row offsets -- what the memset, count_rows and scan_counts launches do otherwise. The counts stay in
// cnt [kRouteE] (shared) for the caller; part [1024] is block_scan's scratch.
constexpr int kRouteE = 8192;
constexpr int kRouteN = 16384;
__device__ __forceinline__ void route_block(const int32_t* __restrict__ ids, int n, int E,
                                            int32_t* __restrict__ rank, int32_t* __restrict__ offsets,
                                            int32_t* cnt, int32_t* part) {
  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += 1024) cnt[e] = 0;
  __syncthreads();
  for (int i = tid; i < n; i += 1024) {
    int e = ids[i];
    rank[i] = (e >= 0 && e < E) ? atomicAdd(&cnt[e], 1) : -1;
  }
  __syncthreads();
  const int per = (E + 1023) / 1024;
  const int lo = min(E, tid * per), hi = min(E, lo + per);
  int rows = 0;
  for (int e = lo; e < hi; ++e) rows += cnt[e];
  const int2 r = block_scan(rows, part);
  int run = r.x;
  for (int e = lo; e < hi; ++e) { offsets[e] = run; run += cnt[e]; }
  if (tid == 0) offsets[E] = r.y;
}
"""


# stage 1: routing, gather, grouped GEMM, activation
_STAGE1 = (
    r"""
namespace {
namespace jk {

""" + BLOCK_SCAN + COUNT_SCAN + r"""
// Stage 1's routing (route_block) and the grouped GEMM's setup (setup_one per expert) in one launch of one
// block of 1024 threads.
__global__ void __launch_bounds__(1024) route_groups(const int32_t* __restrict__ ids, int n, int E,
                                                     int32_t* __restrict__ rank, int32_t* __restrict__ offsets,
                                                     GemmArrays g, int N, int K, const ElementA* A,
                                                     const ElementB* B, ElementD* D, const float* s1,
                                                     const float* s2) {
  __shared__ int32_t cnt[kRouteE];
  __shared__ int32_t part[1024];
  route_block(ids, n, E, rank, offsets, cnt, part);
  __syncthreads();  // every expert's offsets written
  for (int e = threadIdx.x; e < E; e += 1024) setup_one(g, offsets, e, N, K, A, B, D, s1, s2);
}
""",
    (  # bf16 / fp8 | fp8b128
        r"""// One block per (t, k): its sorted row, its routing weight, and the (quantized) copy of x[t].
__global__ void gather_rows(const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ ids,
                            const float* __restrict__ topk_w, const int32_t* __restrict__ rank,
                            const int32_t* __restrict__ offsets, int topk, int H,
                            const float* __restrict__ a_scale, int32_t* __restrict__ sorted_pos,
                            float* __restrict__ w_sorted, ElementA* __restrict__ xs) {
  int i = blockIdx.x;
  int r = rank[i];
  if (r < 0) { if (threadIdx.x == 0) sorted_pos[i] = -1; return; }
  int pos = offsets[ids[i]] + r;
  if (threadIdx.x == 0) { sorted_pos[i] = pos; w_sorted[pos] = topk_w[i]; }
  const __nv_bfloat16* src = x + int64_t(i / topk) * H;
  ElementA* dst = xs + int64_t(pos) * H;
  if constexpr (!kFp8) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int j = threadIdx.x; j < H / 8; j += blockDim.x) d4[j] = s4[j];
  } else {
    float inv = 1.0f / a_scale[0];
    for (int j = threadIdx.x; j < H / 8; j += blockDim.x) {
      uint4 v = reinterpret_cast<const uint4*>(src)[j];
      const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
      alignas(8) ElementA o[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) o[q] = from_f<ElementA>(to_f(h[q]) * inv);
      reinterpret_cast<uint2*>(dst)[j] = *reinterpret_cast<const uint2*>(o);
    }
""",
        r"""// One block (4 warps) per (t, k): its sorted row, weight and expert, and x[t] quantized per 128 channels
// (bf16 input: amax per block on the fly; e4m3 input with x_scale [T, H/128]: copied with its scales). The
// scales go to the M-major-per-expert SFA layout: xs_scale[off_e * H/128 + kb * M_e + rank].
__global__ void gather_rows(const void* __restrict__ x, const float* __restrict__ x_scale,
                            const int32_t* __restrict__ ids, const float* __restrict__ topk_w,
                            const int32_t* __restrict__ rank, const int32_t* __restrict__ offsets, int topk, int H,
                            int32_t* __restrict__ sorted_pos, float* __restrict__ w_sorted,
                            int32_t* __restrict__ e_sorted, ElementA* __restrict__ xs,
                            float* __restrict__ xs_scale) {
  int i = blockIdx.x;
  int r = rank[i];
  if (r < 0) { if (threadIdx.x == 0) sorted_pos[i] = -1; return; }
  int e = ids[i];
  int off = offsets[e];
  int me = offsets[e + 1] - off;
  int pos = off + r;
  if (threadIdx.x == 0) { sorted_pos[i] = pos; w_sorted[pos] = topk_w[i]; e_sorted[pos] = e; }
  int64_t t = i / topk;
  int KB = H / kBlock;
  float* sdst = xs_scale + int64_t(off) * KB + r;
  ElementA* dst = xs + int64_t(pos) * H;
  if (x_scale) {  // already e4m3 with per-token 1x128 scales
    const uint4* s4 = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(x) + t * H);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int j = threadIdx.x; j < H / 16; j += blockDim.x) d4[j] = s4[j];
    for (int kb = threadIdx.x; kb < KB; kb += blockDim.x) sdst[int64_t(kb) * me] = x_scale[t * KB + kb];
    return;
  }
  const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(x) + t * H;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int kb = warp; kb < KB; kb += warps) {
    uint2 raw = reinterpret_cast<const uint2*>(src + kb * kBlock)[lane];
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
    float v[4] = {__bfloat162float(h[0]), __bfloat162float(h[1]), __bfloat162float(h[2]), __bfloat162float(h[3])};
    float s = quant_block4(v, dst + kb * kBlock + lane * 4);
    if (lane == 0) sdst[int64_t(kb) * me] = s;
""",
    ),
    r"""  }
}

__device__ __forceinline__ float act_fn(float g, int activation) {
  if (activation == 1) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
  return g / (1.0f + __expf(-g));
}

""",
    (  # bf16 / fp8 | fp8b128
        r"""// act[pos, j] = act_fn(h[pos, j]) * h[pos, I + j] * w_sorted[pos]  (quantized with a2_scale for fp8)
__global__ void activate_rows(const cutlass::bfloat16_t* __restrict__ h, const int32_t* __restrict__ offsets,
                              int E, int I, const float* __restrict__ w_sorted, int activation,
                              const float* __restrict__ a2_scale, ElementA* __restrict__ out) {
  int pos = blockIdx.x;
  if (pos >= offsets[E]) return;
  float w = w_sorted[pos];
  if (a2_scale) w /= a2_scale[0];
  const __nv_bfloat16* row = reinterpret_cast<const __nv_bfloat16*>(h) + int64_t(pos) * 2 * I;
  ElementA* dst = out + int64_t(pos) * I;
  for (int j = threadIdx.x; j < I / 8; j += blockDim.x) {
    uint4 gv = reinterpret_cast<const uint4*>(row)[j];
    uint4 uv = reinterpret_cast<const uint4*>(row + I)[j];
    const __nv_bfloat16* g = reinterpret_cast<const __nv_bfloat16*>(&gv);
    const __nv_bfloat16* u = reinterpret_cast<const __nv_bfloat16*>(&uv);
    alignas(16) ElementA o[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) o[q] = from_f<ElementA>(act_fn(to_f(g[q]), activation) * to_f(u[q]) * w);
    if constexpr (kFp8) reinterpret_cast<uint2*>(dst)[j] = *reinterpret_cast<const uint2*>(o);
    else reinterpret_cast<uint4*>(dst)[j] = *reinterpret_cast<const uint4*>(o);
""",
        r"""// One block (4 warps) per sorted row: v = act(h[pos, j]) * h[pos, I + j] * w_sorted[pos], quantized per 128
// channels into out (e4m3) and out_scale (stage 2's SFA: out_scale[off_e * I/128 + kb * M_e + pos - off_e]).
__global__ void activate_rows(const cutlass::bfloat16_t* __restrict__ h, const int32_t* __restrict__ offsets,
                              int E, int I, const float* __restrict__ w_sorted, const int32_t* __restrict__ e_sorted,
                              int activation, ElementA* __restrict__ out, float* __restrict__ out_scale) {
  int pos = blockIdx.x;
  if (pos >= offsets[E]) return;
  int e = e_sorted[pos];
  int off = offsets[e];
  int me = offsets[e + 1] - off;
  float w = w_sorted[pos];
  int KB = I / kBlock;
  const __nv_bfloat16* row = reinterpret_cast<const __nv_bfloat16*>(h) + int64_t(pos) * 2 * I;
  ElementA* dst = out + int64_t(pos) * I;
  float* sdst = out_scale + int64_t(off) * KB + (pos - off);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int kb = warp; kb < KB; kb += warps) {
    int j = kb * kBlock + lane * 4;
    uint2 graw = *reinterpret_cast<const uint2*>(row + j);
    uint2 uraw = *reinterpret_cast<const uint2*>(row + I + j);
    const __nv_bfloat16* g = reinterpret_cast<const __nv_bfloat16*>(&graw);
    const __nv_bfloat16* u = reinterpret_cast<const __nv_bfloat16*>(&uraw);
    float v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = act_fn(__bfloat162float(g[q]), activation) * __bfloat162float(u[q]) * w;
    float s = quant_block4(v, dst + j);
    if (lane == 0) sdst[int64_t(kb) * me] = s;
""",
    ),
    r"""  }
}

}  // namespace jk
}  // namespace

extern "C" __attribute__((visibility("default"))) const char* jk_name_@@digest16@@(void) { return "@@name@@"; }

""",
    (  # bf16 / fp8 | fp8b128
        r"""""",
        r"""// fp8b128 stage 1. x: bf16 [T, H] (a_scale NULL: quantized here per token per 128 channels) or e4m3 [T, H]
// with a_scale [T, H/128] float32; w_scale: [E, 2I/128, H/128] float32; a2_scale: OUT, float32
// [T*topk*I/128], the 1x128 scales of act_out (stage 2's input), written in the grouped M-major layout
// stage 2 reads. Everything else as the bf16 / fp8 stage 1.
""",
    ),
    STAGE1_SIGNATURE + r"""  using namespace jk;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
""",
    (  # bf16 / fp8 | fp8b128
        r"""  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % 16) || (I % 16)) return int(cudaErrorInvalidValue);
  if (kFp8 && (!a_scale || !w_scale || !a2_scale)) return int(cudaErrorInvalidValue);
""",
        r"""  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % kBlock) || (I % kBlock)) return int(cudaErrorInvalidValue);
  if (!w_scale || !a2_scale) return int(cudaErrorInvalidValue);
""",
    ),
    r"""  const int64_t rows = int64_t(T) * topk;
  Bump b{static_cast<char*>(workspace), 0};
  int32_t* counts = b.take<int32_t>(E);
  int32_t* rank = b.take<int32_t>(rows);
  float* w_sorted = b.take<float>(rows);
""",
    (  # bf16 / fp8 | fp8b128
        r"""  ElementA* xs = b.take<ElementA>(rows * H);
""",
        r"""  int32_t* e_sorted = b.take<int32_t>(rows);
  ElementA* xs = b.take<ElementA>(rows * H);
  float* xs_scale = b.take<float>(rows * (H / kBlock));
""",
    ),
    r"""  ElementD* h = b.take<ElementD>(rows * 2 * I);
  GemmArrays g = take_arrays(b, E);
  typename Gemm::Arguments args = gemm_args(g, E);
  size_t gemm_ws = Gemm::get_workspace_size(args);
  char* gws = b.take<char>(gemm_ws);
  if (!workspace) {
    if (workspace_bytes) *workspace_bytes = b.off + 256;
    return 0;
  }
  if (workspace_bytes && *workspace_bytes < b.off) return int(cudaErrorInvalidValue);
  cudaError_t err;
  if (T == 0) return 0;
  int n = int(rows);
""",
    (  # bf16 / fp8 | fp8b128: setup_one's first scale pointer
        r"""  const float* s1 = a_scale;
""",
        r"""  const float* s1 = xs_scale;
""",
    ),
    r"""  const bool one = E <= kRouteE && n <= kRouteN;  // routing and GEMM setup in one launch, else five
  if (one) {
    route_groups<<<1, 1024, 0, stream>>>(topk_ids, n, E, rank, expert_offsets, g, 2 * I, H, xs,
                                         static_cast<const ElementB*>(w13), h, s1, w_scale);
  } else {
    if ((err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * E, stream)) != cudaSuccess) return int(err);
    count_rows<<<(n + 255) / 256, 256, 0, stream>>>(topk_ids, n, E, counts, rank);
    scan_counts<<<1, 1024, 0, stream>>>(counts, E, expert_offsets);
  }
""",
    (  # bf16 / fp8 | fp8b128
        r"""  gather_rows<<<n, 128, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), topk_ids, topk_w, rank,
                                     expert_offsets, topk, H, a_scale, sorted_pos, w_sorted, xs);
""",
        r"""  gather_rows<<<n, 128, 0, stream>>>(x, a_scale, topk_ids, topk_w, rank, expert_offsets, topk, H, sorted_pos,
                                     w_sorted, e_sorted, xs, xs_scale);
""",
    ),
    r"""  if (!one)
    setup_groups<<<(E + 127) / 128, 128, 0, stream>>>(g, expert_offsets, E, 2 * I, H, xs,
                                                       static_cast<const ElementB*>(w13), h, s1, w_scale);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) return kStatusBase + int(st);
  st = gemm.initialize(args, gws, stream);
  if (st != cutlass::Status::kSuccess) return kStatusBase + int(st);
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return kStatusBase + int(st);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
""",
    (  # bf16 / fp8 | fp8b128
        r"""  activate_rows<<<n, 128, 0, stream>>>(h, expert_offsets, E, I, w_sorted, activation, a2_scale,
                                      static_cast<ElementA*>(act_out));
  return int(cudaGetLastError());
}
""",
        r"""  activate_rows<<<n, 128, 0, stream>>>(h, expert_offsets, E, I, w_sorted, e_sorted, activation,
                                      static_cast<ElementA*>(act_out), const_cast<float*>(a2_scale));
  return int(cudaGetLastError());
}
""",
    ),
)


# stage 2: grouped GEMM, combine
_STAGE2 = (
    r"""
namespace {
namespace jk {

// out[t] = sum_k y[sorted_pos[t, k]]  (routing weights were applied to stage 2's input rows)
__global__ void combine_rows(const ElementD* __restrict__ y, const int32_t* __restrict__ sorted_pos,
                             int topk, int H, __nv_bfloat16* __restrict__ out) {
  int t = blockIdx.x;
  const int32_t* sp = sorted_pos + int64_t(t) * topk;
  for (int j = threadIdx.x; j < H / 8; j += blockDim.x) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < topk; ++k) {
      int p = sp[k];
      if (p < 0) continue;
      uint4 v = reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(y) + int64_t(p) * H)[j];
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

}  // namespace jk
}  // namespace

extern "C" __attribute__((visibility("default"))) const char* jk_name_@@digest16@@(void) { return "@@name@@"; }

""",
    (  # bf16 / fp8 | fp8b128
        r"""""",
        r"""// fp8b128 stage 2. act: stage 1's e4m3 act_out; a2_scale: stage 1's a2_scale output (its 1x128 scales);
// w2_scale: [E, H/128, I/128] float32. Everything else as the bf16 / fp8 stage 2.
""",
    ),
    STAGE2_SIGNATURE + r"""  using namespace jk;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
""",
    (  # bf16 / fp8 | fp8b128
        r"""  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % 16) || (I % 16)) return int(cudaErrorInvalidValue);
  if (kFp8 && (!a2_scale || !w2_scale)) return int(cudaErrorInvalidValue);
""",
        r"""  if (T < 0 || topk <= 0 || E <= 0 || H <= 0 || I <= 0 || (H % kBlock) || (I % kBlock)) return int(cudaErrorInvalidValue);
  if (!a2_scale || !w2_scale) return int(cudaErrorInvalidValue);
""",
    ),
    r"""  const int64_t rows = int64_t(T) * topk;
  Bump b{static_cast<char*>(workspace), 0};
  ElementD* y = b.take<ElementD>(rows * H);
  GemmArrays g = take_arrays(b, E);
  typename Gemm::Arguments args = gemm_args(g, E);
  size_t gemm_ws = Gemm::get_workspace_size(args);
  char* gws = b.take<char>(gemm_ws);
  if (!workspace) {
    if (workspace_bytes) *workspace_bytes = b.off + 256;
    return 0;
  }
  if (workspace_bytes && *workspace_bytes < b.off) return int(cudaErrorInvalidValue);
  if (T == 0) return 0;
  cudaError_t err;
  setup_groups<<<(E + 127) / 128, 128, 0, stream>>>(g, expert_offsets, E, H, I,
                                                     static_cast<const ElementA*>(act),
                                                     static_cast<const ElementB*>(w2), y, a2_scale, w2_scale);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) return kStatusBase + int(st);
  st = gemm.initialize(args, gws, stream);
  if (st != cutlass::Status::kSuccess) return kStatusBase + int(st);
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return kStatusBase + int(st);
  if ((err = cudaGetLastError()) != cudaSuccess) return int(err);
  int threads = H / 8 >= 256 ? 256 : 128;
  combine_rows<<<T, threads, 0, stream>>>(y, sorted_pos, topk, H, static_cast<__nv_bfloat16*>(out));
  return int(cudaGetLastError());
}
""",
)


def _text(parts: tuple, b128: bool) -> str:
    return "".join(p if isinstance(p, str) else p[b128] for p in parts)


def render_unit(inst) -> str:
    """The .cu text of ``inst`` (a :class:`~jitkiln.families.moe2stage.family.MoEGemm`)."""
    b128 = inst.dtype == "fp8b128"
    ks, es = B128_SCHEDULE[inst.schedule] if b128 else SCHEDULE[(inst.dtype, inst.schedule)]
    fields = dict(
        name=inst.name, symbol=inst.symbol, digest16=inst.digest[:16],
        tile_m=inst.tile_m, tile_n=inst.tile_n, tile_k=inst.tile_k,
        cluster_m=inst.cluster_m, cluster_n=inst.cluster_n,
        kernel_schedule=ks, epilogue_schedule=es,
    )
    if not b128:
        fields.update(element=ELEMENT[inst.dtype], is_fp8="true" if inst.dtype == "fp8" else "false")
    swap = bool(getattr(inst, "swap", False))
    assert not (swap and b128), "fp8b128 has no swapped-operand tiles"
    fields.update(layout_d=LAYOUT_D[swap], setup_ptrs=SETUP_PTRS[swap])
    text = _text(_PRELUDE, b128) + _text(_STAGE1 if inst.stage == 1 else _STAGE2, b128)
    for k, v in fields.items():
        text = text.replace(f"@@{k}@@", str(v))
    assert "@@" not in text, "a template field without a value"
    return text
