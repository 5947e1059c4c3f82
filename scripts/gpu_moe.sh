#!/bin/bash
# One device call: install CUTLASS headers (carried wheel), build every moe2stage instance (bf16 and fp8) with
# nvcc in parallel, check correctness, benchmark against peers. Results under $OUT (or ./out).
#   run: bash scripts/gpu_moe.sh [check|bench|all]   (carry .whl; BENCH_ARGS adds bench/moe_perf.py flags)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/nvidia_cutlass-*.whl || exit 1
export JITKILN_CUTLASS_DIR=/tmp/site/cutlass_library/source PYTHONPATH=$PWD/src
export JITKILN_CACHE_DIR=${JITKILN_CACHE_DIR:-/tmp/jitkiln-cache}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
t0=$(date +%s)
python3 scripts/moe_build.py --jobs 16 --variant bf16 > "$OUT/build.log" 2>&1 &
b1=$!
python3 scripts/moe_build.py --jobs 16 --variant fp8 > "$OUT/build-fp8.log" 2>&1 &
b2=$!
wait $b1 || { tail -60 "$OUT/build.log"; exit 1; }
fp8=1; wait $b2 || { fp8=0; echo "fp8 build FAILED:"; grep -m5 -A3 "error" "$OUT/build-fp8.log"; }
grep -hE "^built|wall_s" "$OUT/build.log" "$OUT/build-fp8.log"
logs="$JITKILN_CACHE_DIR/v1/logs"
echo "C7510 hits: $(grep -l C7510 $logs/*.log 2>/dev/null | wc -l); spill warnings: $(grep -hiE 'warning.*spill' $logs/*.log 2>/dev/null | wc -l) (compiler logs in $logs)"
echo "build took $(( $(date +%s) - t0 )) s (bf16 + fp8 in parallel)"
if [ "$what" != bench ]; then
  python3 scripts/moe_check.py --build build/moe 2>&1 | tee "$OUT/check.log" | grep -v "^ok "
  [ $fp8 = 1 ] && python3 scripts/moe_check.py --build build/moe --variant fp8 2>&1 | tee "$OUT/check-fp8.log" | grep -v "^ok "
fi
if [ "$what" != check ]; then
  extra=""; [ $fp8 = 1 ] && extra="--fp8"
  python3 bench/moe_perf.py --build build/moe --json "$OUT/moe-perf.json" --md "$OUT/moe-perf.md" $extra ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log"
fi
