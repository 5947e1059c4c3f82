"""``demo``: a real, small templated CUDA kernel family for the engine's tests and the quick start.

C = A @ B for row-major A[M,K], B[K,N] (float32 or float64), one shared-memory tiled kernel template with
block tile BM x BN x BK and a per-thread tile TM x TN. nvcc compiles an instance in ~2 s.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

from typing import Sequence

from ..family import CAbi, CompileSpec, Family, Instance, Packer, Problem, ShapeKey, register


@dataclass(frozen=True)
class DemoGemm(Instance):
    family: ClassVar[str] = "demo"
    dtype: str
    bm: int
    bn: int
    bk: int
    tm: int
    tn: int

    @property
    def name(self) -> str:
        return f"demo_gemm_{self.dtype}_{self.bm}x{self.bn}x{self.bk}_t{self.tm}x{self.tn}"


# Why each tile exists (the heuristic below picks among them):
#  skinny  8x64x16  t1x2 : decode-like GEMMs with few rows (M <= 16): a tall tile would idle most threads.
#  small  16x16x16  t1x1 : small outputs (M*N <= 16384): many blocks keep the SMs busy.
#  medium 32x32x16  t2x2 : mid-size outputs with a short side under 512.
#  large  64x64x8   t4x4 : large outputs: 4x4 register tiles reuse each loaded element 4 times.
TILES = {
    "skinny": (8, 64, 16, 1, 2),
    "small": (16, 16, 16, 1, 1),
    "medium": (32, 32, 16, 2, 2),
    "large": (64, 64, 8, 4, 4),
}
RULES = {
    "skinny": "chosen only when m <= 16",
    "small": "chosen only when m > 16 and m*n <= 16384",
    "medium": "chosen only when m > 16, m*n > 16384 and min(m, n) < 512",
    "large": "chosen only when m > 16 and min(m, n) >= 512",
}

SOURCE = r"""// jitkiln demo instance {name}
#include <cuda_runtime.h>
#include <stdint.h>

namespace {{
template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
gemm_tiled(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int64_t M, int64_t N, int64_t K) {{
  constexpr int TX = BN / TN, TY = BM / TM, NT = TX * TY;
  __shared__ T As[BM][BK + 1];
  __shared__ T Bs[BK][BN + 1];
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int64_t row0 = (int64_t)blockIdx.y * BM, col0 = (int64_t)blockIdx.x * BN;
  T acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
  for (int64_t k0 = 0; k0 < K; k0 += BK) {{
    for (int e = threadIdx.x; e < BM * BK; e += NT) {{
      int r = e / BK, c = e % BK;
      int64_t gr = row0 + r, gc = k0 + c;
      As[r][c] = (gr < M && gc < K) ? A[gr * K + gc] : T(0);
    }}
    for (int e = threadIdx.x; e < BK * BN; e += NT) {{
      int r = e / BN, c = e % BN;
      int64_t gr = k0 + r, gc = col0 + c;
      Bs[r][c] = (gr < K && gc < N) ? B[gr * N + gc] : T(0);
    }}
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {{
      T a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[ty * TM + i][kk];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }}
    __syncthreads();
  }}
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {{
      int64_t r = row0 + ty * TM + i, c = col0 + tx * TN + j;
      if (r < M && c < N) C[r * N + c] = acc[i][j];
    }}
}}
}}  // namespace

extern "C" __attribute__((visibility("default"))) const char* jk_name_{digest16}(void) {{ return "{name}"; }}

extern "C" __attribute__((visibility("default")))
int {symbol}(const void* A, const void* B, void* C, int64_t M, int64_t N, int64_t K, void* stream) {{
  if (M < 0 || N < 0 || K < 0) return (int)cudaErrorInvalidValue;
  if (M == 0 || N == 0) return 0;
  dim3 grid((unsigned)((N + {bn} - 1) / {bn}), (unsigned)((M + {bm} - 1) / {bm}));
  gemm_tiled<{ctype}, {bm}, {bn}, {bk}, {tm}, {tn}><<<grid, ({bm} / {tm}) * ({bn} / {tn}), 0, (cudaStream_t)stream>>>(
      (const {ctype}*)A, (const {ctype}*)B, ({ctype}*)C, M, N, K);
  return (int)cudaGetLastError();
}}
"""


def _pack(units: Sequence) -> str | None:
    """demo units in one: the kernel template (everything before the first ``extern "C"``) once, then each
    member's C ABI functions. Members whose template text differs cannot share a unit."""
    heads, tails = [], []
    for u in units:
        src = u.source.split("\n", 1)[1]  # drop the '// jitkiln demo instance NAME' line
        i = src.index('extern "C"')
        heads.append(src[:i])
        tails.append(src[i:])
    if len(set(heads)) != 1:
        return None
    names = ", ".join(u.instance.name for u in units)
    return f"// jitkiln pack: {names}\n" + heads[0] + "\n".join(tails)


@register
class Demo(Family):
    name = "demo"
    doc = "tiled GEMM C = A @ B (row-major), a small real CUDA template for the engine"
    shape_keys = (ShapeKey("m", int, "rows of A and C"), ShapeKey("n", int, "columns of B and C"),
                  ShapeKey("k", int, "columns of A, rows of B"))
    abi = CAbi(argtypes=(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p),
               doc="int launch(const T* A, const T* B, T* C, int64 M, int64 N, int64 K, cudaStream_t stream)")
    CTYPES = {"f32": "float", "f64": "double"}
    # measured: demo f32, 3 instances 5.0 s packed vs 3 x 2.4 s separately (nvcc 13.0, 2 cores)
    packer = Packer(_pack, shared_fraction=0.6, memory_growth=0.2)

    def variants(self):
        return ["f32", "f64"]

    def candidates(self, variant):
        self.check_variant(variant)
        return [DemoGemm(variant, *t) for t in TILES.values()]

    @staticmethod
    def tile_for(problem: Problem) -> str:
        m, n = int(problem["m"]), int(problem["n"])
        if m <= 16:
            return "skinny"
        if m * n <= 16384:
            return "small"
        if min(m, n) < 512:
            return "medium"
        return "large"

    def select(self, variant, problem):
        return {"gemm": DemoGemm(variant, *TILES[self.tile_for(problem)])}

    def rule(self, variant, instance):
        for tag, t in TILES.items():
            if (instance.bm, instance.bn, instance.bk, instance.tm, instance.tn) == t:
                return f"{tag} tile {t[0]}x{t[1]}x{t[2]}: {RULES[tag]}"
        return "never chosen by the heuristic"

    def render(self, instance):
        return SOURCE.format(name=instance.name, digest16=instance.digest[:16], symbol=instance.symbol,
                             ctype=self.CTYPES[instance.dtype], bm=instance.bm, bn=instance.bn, bk=instance.bk,
                             tm=instance.tm, tn=instance.tn)

    def compile_spec(self, variant, arch=None):
        return CompileSpec(toolchain="nvcc", arch=arch or "sm_90a", flags=("-DNDEBUG", "-lineinfo"))

    def default_problems(self, variant):
        # A decode-like GEMM, a mid-size one and a large one: three of the four tiles are used.
        return [{"m": 8, "n": 512, "k": 256}, {"m": 256, "n": 256, "k": 256}, {"m": 1024, "n": 1024, "k": 512}]

    def cost_estimate(self, instance):
        return 2.0 + 0.1 * instance.tm * instance.tn

    def memory_estimate(self, instance):
        return 400 << 20
