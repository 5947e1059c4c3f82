#!/bin/bash
# One device call: install CUTLASS headers (carried wheel), build every moe2stage instance (bf16 and fp8) with
# nvcc in parallel, check correctness, benchmark against peers. Results under $OUT (or ./out).
#   run: bash scripts/gpu_moe.sh [check|bench|all|b128]   (carry .whl; BENCH_ARGS adds bench/moe_perf.py flags)
#   b128: build all three variants, check only fp8b128, then a short bench (Kimi-like shapes, 4096 and 16384
#   tokens) of fp8b128 against bf16 and fp8 per-tensor in one process.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/nvidia_cutlass-*.whl || exit 1
export JITKILN_CUTLASS_DIR=/tmp/site/cutlass_library/source PYTHONPATH=$PWD/src
export JITKILN_CACHE_DIR=${JITKILN_CACHE_DIR:-/tmp/jitkiln-cache}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
t0=$(date +%s)
if [ "$what" = b128 ]; then  # fp8b128 first (its build, then its check while bf16 / fp8 build at low priority)
  DEADLINE=${DEADLINE:-290}
  python3 scripts/moe_build.py --jobs 16 --variant fp8b128 > "$OUT/build-fp8b128.log" 2>&1 &
  b3=$!
  if [ "${BENCH:-1}" = 1 ]; then
    nice -n 10 python3 scripts/moe_build.py --jobs 8 --variant bf16 > "$OUT/build.log" 2>&1 &
    b1=$!
    nice -n 10 python3 scripts/moe_build.py --jobs 8 --variant fp8 > "$OUT/build-fp8.log" 2>&1 &
    b2=$!
  fi
  wait $b3 || { echo "fp8b128 build FAILED:"; grep -m8 -B2 -A6 "error" "$OUT/build-fp8b128.log"; exit 1; }
  grep -hE "^built|wall_s" "$OUT/build-fp8b128.log"
  echo "fp8b128 built at $(( $(date +%s) - t0 )) s; C7510 hits: $(grep -l C7510 $JITKILN_CACHE_DIR/v1/logs/*.log 2>/dev/null | wc -l); spill warnings: $(grep -hiE 'warning.*spill' $JITKILN_CACHE_DIR/v1/logs/*.log 2>/dev/null | wc -l)"
  python3 scripts/moe_check.py --build build/moe --variant fp8b128 --json "$OUT/check-fp8b128.json" 2>&1 | tee "$OUT/check-fp8b128.log" | grep -v "^ok "
  rc=$?
  echo "check done at $(( $(date +%s) - t0 )) s"
  [ "${BENCH:-1}" = 1 ] || exit $rc
  wait $b1 && wait $b2 || { echo "bf16/fp8 build failed: no bench"; exit $rc; }
  left=$(( DEADLINE - ($(date +%s) - t0) ))
  echo "bf16 + fp8 built at $(( $(date +%s) - t0 )) s; bench gets ${left} s"
  [ $left -gt 30 ] && timeout $left python3 bench/moe_perf.py --build build/moe --fp8 --fp8b128 --no-loop --reps 7 \
    --shapes "kimi-k2 tp8,kimi-k2 ep8" --tokens 4096,16384 --json "$OUT/moe-perf-b128.json" --md "$OUT/moe-perf-b128.md" \
    2>&1 | tee "$OUT/bench-b128.log" | grep -vE "^\|"
  exit $rc
fi
python3 scripts/moe_build.py --jobs 16 --variant bf16 > "$OUT/build.log" 2>&1 &
b1=$!
python3 scripts/moe_build.py --jobs 16 --variant fp8 > "$OUT/build-fp8.log" 2>&1 &
b2=$!
python3 scripts/moe_build.py --jobs 16 --variant fp8b128 > "$OUT/build-fp8b128.log" 2>&1 &
b3=$!
wait $b1 || { tail -60 "$OUT/build.log"; exit 1; }
fp8=1; wait $b2 || { fp8=0; echo "fp8 build FAILED:"; grep -m5 -A3 "error" "$OUT/build-fp8.log"; }
b128=1; wait $b3 || { b128=0; echo "fp8b128 build FAILED:"; grep -m8 -A3 "error" "$OUT/build-fp8b128.log"; }
grep -hE "^built|wall_s" "$OUT/build.log" "$OUT/build-fp8.log" "$OUT/build-fp8b128.log"
logs="$JITKILN_CACHE_DIR/v1/logs"
echo "C7510 hits: $(grep -l C7510 $logs/*.log 2>/dev/null | wc -l); spill warnings: $(grep -hiE 'warning.*spill' $logs/*.log 2>/dev/null | wc -l) (compiler logs in $logs)"
echo "build took $(( $(date +%s) - t0 )) s (bf16 + fp8 + fp8b128 in parallel)"
if [ "$what" != bench ]; then
  python3 scripts/moe_check.py --build build/moe 2>&1 | tee "$OUT/check.log" | grep -v "^ok "
  [ $fp8 = 1 ] && python3 scripts/moe_check.py --build build/moe --variant fp8 2>&1 | tee "$OUT/check-fp8.log" | grep -v "^ok "
  [ $b128 = 1 ] && python3 scripts/moe_check.py --build build/moe --variant fp8b128 2>&1 | tee "$OUT/check-fp8b128.log" | grep -v "^ok "
fi
if [ "$what" != check ]; then
  extra=""; [ $fp8 = 1 ] && extra="--fp8"; [ $b128 = 1 ] && extra="$extra --fp8b128"
  python3 bench/moe_perf.py --build build/moe --json "$OUT/moe-perf.json" --md "$OUT/moe-perf.md" $extra ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log"
fi
