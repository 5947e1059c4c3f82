#!/bin/bash
# One device call on the GPU host: the compile-cost and cold-start benchmarks, results under $OUT.
#   run (carry .whl and .tools): bash scripts/gpu_bench.sh [coldstart] [warm] [malloc] [instance] [nvrtc]
#   .whl: nvidia_cutlass, cryptography, cffi, pycparser, nvidia_cuda_cuobjdump, nvidia_cuda_nvdisasm wheels (py3.12)
#   .tools: ccache (wrapper + ccache.real + lib/) and lib/libjemalloc.so.2 (Debian's libjemalloc2): the host
#   has neither, and nothing can be installed there.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site JITKILN_CUTLASS_DIR=/tmp/site/cutlass_library/source
export PATH=$PWD/.tools:$PATH
export JEMALLOC=$PWD/.tools/lib/libjemalloc.so.2
export CUOBJDUMP=$(ls /tmp/site/nvidia/cu*/bin/cuobjdump | head -1)
nproc; nvidia-smi --query-gpu=name --format=csv,noheader
KIMI="moe2stage --variant bf16 --model kimi-k2 --tp 8 --tokens 1-8192"
for what in "$@"; do
  t0=$(date +%s)
  case $what in
    malloc) python3 bench/compiler_malloc.py --reps 4 --parallel 8 --settings glibc,jemalloc --tag 16cores-h100 \
              --out "$OUT" 2>&1 | tail -40 ;;
    instance) python3 bench/instance_cost.py --tag 16cores-h100 --out "$OUT" --work /tmp/icw 2>&1 | tail -5 ;;
    coldstart) python3 bench/coldstart.py $KIMI --scenarios a,c,d,e,f,g --g-ranks 0 --gpu --tag h100 --out-dir "$OUT" \
                 2>&1 | tee "$OUT/coldstart-h100.log" | tail -30 ;;
    warm) python3 bench/coldstart.py $KIMI --scenarios c,d,g --g-ranks 0 --gpu --tag h100-warm --out-dir "$OUT" \
            2>&1 | tee "$OUT/coldstart-h100-warm.log" | tail -14 ;;
    nvrtc) python3 bench/nvrtc_cost.py --tag 16cores-h100 --out "$OUT" 2>&1 | grep -v "warning #177" | tail -14 ;;
  esac
  echo "== $what took $(( $(date +%s) - t0 )) s"
done
