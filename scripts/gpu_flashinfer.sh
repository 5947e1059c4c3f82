#!/bin/bash
# Device calls for the FlashInfer front end (carry .gpu/fi: wheels, the trimmed FlashInfer from
# scripts/flashinfer_trim.py, FlashInfer's own tests from scripts/flashinfer_tests.sh, and for `check` a module
# built on the CPU machine in .gpu/fi/aot). Results under $OUT (or ./out).
#   bash scripts/gpu_flashinfer.sh check   the carried module: warm load, flashinfer_check.py, FlashInfer's own
#                                          bf16 tests, then FlashInfer's own cold JIT for the time left
#   bash scripts/gpu_flashinfer.sh cold    jitkiln cold (empty caches, 16 cores) -> seeded (empty local cache,
#                                          the shared dir) -> warm; then flashinfer_check.py on that module
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-check}
DEADLINE=${DEADLINE:-570}
t0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - t0) )); }
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE .gpu/fi/whl/*.whl || exit 1
tar xJf .gpu/fi/flashinfer.tar.xz -C $SITE || exit 1
export PYTHONPATH=$SITE:$PWD/src FLASHINFER_CUDA_ARCH_LIST=9.0a
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
export JITKILN_CACHE_DIR=/tmp/jk-cache JITKILN_SHARED_DIR=/tmp/jk-shared FLASHINFER_WORKSPACE_BASE=/tmp/fiws
R="$OUT/flashinfer-coldstart.jsonl"
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
echo "nvcc: $(nvcc --version | tail -1); CUDA_HOME=$CUDA_HOME; cores $(nproc); mem $(free -g | awk '/Mem/{print $2}') GiB"
AOT=$SITE/flashinfer/data/aot/fused_moe_90
if [ "$what" = check ]; then
  mkdir -p $AOT && cp .gpu/fi/aot/fused_moe_90.so .gpu/fi/aot/fused_moe_90.jitkiln.json $AOT/ || exit 1
  export FLASHINFER_DISABLE_JIT=1  # FlashInfer must load the module, never compile one
  for i in 1 2 3; do timeout 200 python3 bench/flashinfer_coldstart.py jitkiln-warm --result $R 2>&1 | tail -2; done
  timeout 300 python3 scripts/flashinfer_check.py --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log" | grep -v "^ok "
  echo "check rc=$? at $(( $(date +%s) - t0 )) s"
  (cd .gpu/fi/tests && timeout 240 python3 -m pytest -q -p no:cacheprovider -x \
      tests/moe/test_trtllm_cutlass_fused_moe.py -k "gelu_tanh or workspace" 2>&1 | tail -25) | tee "$OUT/fi-tests.log"
  echo "FlashInfer tests done at $(( $(date +%s) - t0 )) s; FlashInfer's own cold JIT gets $(( $(left) - 15 )) s"
  rm -f $AOT/fused_moe_90.so; unset FLASHINFER_DISABLE_JIT
  export MAX_JOBS=$(nproc)  # ninja's default is cores + 2; 7.5 GB peaks would not fit 18 at once
  python3 bench/flashinfer_coldstart.py flashinfer --budget $(( $(left) - 15 )) --result $R 2>&1 | tail -3
  find /tmp/fiws -name .ninja_log -path "*fused_moe_90*" -exec cp {} "$OUT/ninja_log.txt" \;
  exit 0
fi
# cold -> seeded -> warm: one signing key, the shared dir as the fleet's remote
python3 -m jitkiln.cli fleet keygen -o /tmp/jk-key >/dev/null || exit 1
export JITKILN_SIGNING_KEY=/tmp/jk-key JITKILN_TRUST_KEYS=/tmp/jk-key.pub
( while sleep 5; do free -b | awk -v t=$(date +%s) '/Mem/{print t, $3}'; done ) > "$OUT/mem.txt" &
mon=$!
timeout $(( $(left) - 120 )) python3 bench/flashinfer_coldstart.py jitkiln-cold --result $R 2>&1 | tail -3
kill $mon
echo "cold done at $(( $(date +%s) - t0 )) s; peak used memory $(sort -k2 -n "$OUT/mem.txt" | tail -1 | awk '{printf "%.1f GiB", $2/2^30}')"
for m in jitkiln-seeded jitkiln-warm jitkiln-warm; do
  timeout 100 python3 bench/flashinfer_coldstart.py $m --result $R 2>&1 | tail -1
done
cp $AOT/fused_moe_90.jitkiln.json "$OUT/" 2>/dev/null
FLASHINFER_DISABLE_JIT=1 timeout $(( $(left) - 5 )) python3 scripts/flashinfer_check.py --tokens 1,64,2048 --json "$OUT/check-cold.json" \
  2>&1 | tee "$OUT/check-cold.log" | grep -v "^ok "
