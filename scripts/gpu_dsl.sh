#!/bin/bash
# One device call for moe2stage bf16-dsl (CuTe DSL grouped GEMM): its units are compiled on the CPU machine
# (CUTE_DSL_ARCH=sm_90a, no GPU needed) into an ignored cache folder that travels (carry .gpu and .whl); the DSL
# itself is not installed here, so scripts/moe_dsl_load.py pins the compiler fingerprint to the one recorded
# there. Checks bf16-dsl (moe_check.py --grid) while the C++ bf16 instances build with nvcc, then times both in
# one process (bench/moe_perf.py --dsl-cache). Results under $OUT (or ./out).
#   run: bash scripts/gpu_dsl.sh [check|all]     (CHECK_S: check time limit, DEADLINE: whole-script seconds)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-all}
DSL=${DSL_CACHE:-.gpu/cache}
DEADLINE=${DEADLINE:-560}
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/nvidia_cutlass-*.whl || exit 1
export JITKILN_CUTLASS_DIR=/tmp/site/cutlass_library/source PYTHONPATH=$PWD/src
export JITKILN_CACHE_DIR=${JITKILN_CACHE_DIR:-/tmp/jitkiln-cache}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
nvcc --version | tail -1
if [ "$what" != check ]; then
  nice -n 10 python3 scripts/moe_build.py --jobs 16 --variant bf16 > "$OUT/build.log" 2>&1 &
  b1=$!
fi
timeout 120 python3 scripts/moe_dsl_diag.py > "$OUT/diag.log" 2>&1; grep -E "GEMM|ERROR" "$OUT/diag.log" | head -30
timeout ${CHECK_S:-300} python3 scripts/moe_check.py --variant bf16-dsl --dsl-cache "$DSL" --grid \
  --json "$OUT/check-dsl.json" 2>&1 | tee "$OUT/check-dsl.log" | grep -v "^ok "
rc=$?
echo "check rc=$rc at $(( $(date +%s) - t0 )) s"
[ "$what" = check ] && exit $rc
[ $rc = 0 ] || [ "${BENCH_ANYWAY:-0}" = 1 ] || { kill $b1; exit $rc; }
wait $b1 || { echo "bf16 build failed"; tail -40 "$OUT/build.log"; exit 1; }
grep -hE "wall_s" "$OUT/build.log"
left=$(( DEADLINE - ($(date +%s) - t0) ))
echo "bf16 built at $(( $(date +%s) - t0 )) s; bench gets ${left} s"
timeout $left python3 bench/moe_perf.py --build build/moe --dsl-cache "$DSL" --no-loop --reps ${REPS:-7} \
  --shapes "kimi-k2 tp8,kimi-k2 ep8,qwen3-moe" --tokens ${TOKENS:-1,16,64,512,4096} \
  --json "$OUT/moe-perf-dsl.json" --md "$OUT/moe-perf-dsl.md" 2>&1 | tee "$OUT/bench-dsl.log" | grep -vE "^\|"
exit $rc
