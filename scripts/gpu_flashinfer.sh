#!/bin/bash
# Device calls for the FlashInfer front end. Carry .gpu/fi: wheels FlashInfer needs there (apache-tvm-ffi;
# cryptography for the signed shared dir), the trimmed FlashInfer (scripts/flashinfer_trim.py), FlashInfer's own
# tests (scripts/flashinfer_tests.sh) and, for `check`, a module `jitkiln flashinfer build` made (.gpu/fi/aot).
# Results under $OUT (or ./out).
#   bash scripts/gpu_flashinfer.sh check    that module through FlashInfer: warm loads, flashinfer_check.py,
#                                           FlashInfer's own bf16 tests; then jitkiln cold on this machine's
#                                           cores (empty caches) -> seeded (empty local cache, the signed shared
#                                           dir) -> warm
#   bash scripts/gpu_flashinfer.sh ficold   FlashInfer's own cold JIT of the whole module for the time left
#                                           (its .ninja_log comes back: every finished file's time)
#   bash scripts/gpu_flashinfer.sh final    seeded from .gpu/fi/bf16.bundle (`jitkiln flashinfer prebuild`,
#                                           trusted .gpu/fi/key.pub), warm, then as ficold
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
if [ "$what" = final ]; then  # seeded from a signed bundle, warm, then FlashInfer's own cold JIT
  export JITKILN_TRUST_KEYS=$PWD/.gpu/fi/key.pub
  FLASHINFER_DISABLE_JIT=1 timeout 100 python3 bench/flashinfer_coldstart.py jitkiln-bundle \
    --bundle .gpu/fi/bf16.bundle --result $R 2>&1 | tail -c 600
  for i in 1 2; do
    FLASHINFER_DISABLE_JIT=1 timeout 100 python3 bench/flashinfer_coldstart.py jitkiln-warm --result $R 2>&1 | tail -c 600
  done
  what=ficold
fi
if [ "$what" = ficold ]; then
  export MAX_JOBS=$(nproc)  # ninja's default is cores + 2; 7.5 GB peaks would not fit 18 at once
  python3 bench/flashinfer_coldstart.py flashinfer --budget $(( $(left) - 20 )) --result $R 2>&1 | tail -c 1500
  find /tmp/fiws -name .ninja_log -path "*fused_moe_90*" -exec cp {} "$OUT/ninja_log.txt" \;
  exit 0
fi
mkdir -p $AOT && cp .gpu/fi/aot/fused_moe_90.so .gpu/fi/aot/fused_moe_90.jitkiln.json $AOT/ || exit 1
export FLASHINFER_DISABLE_JIT=1  # FlashInfer must load the module, never compile one
for i in 1 2; do timeout 100 python3 bench/flashinfer_coldstart.py jitkiln-warm --result $R 2>&1 | tail -1; done
timeout 200 python3 scripts/flashinfer_check.py --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log" | grep -v "^ok "
echo "check rc=$? at $(( $(date +%s) - t0 )) s"
(cd .gpu/fi/tests && timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/moe/test_trtllm_cutlass_fused_moe.py -k "gelu_tanh or workspace" 2>&1 | tail -25) > "$OUT/fi-tests.log"
tail -4 "$OUT/fi-tests.log"
echo "FlashInfer's tests done at $(( $(date +%s) - t0 )) s; jitkiln cold gets $(( $(left) - 45 )) s"
# cold -> seeded -> warm: one signing key, the shared dir as the fleet's remote
python3 -m jitkiln.cli keygen -o /tmp/jk-key >/dev/null || exit 1
export JITKILN_SIGNING_KEY=/tmp/jk-key JITKILN_TRUST_KEYS=/tmp/jk-key.pub
( while sleep 2; do free -b | awk -v t=$(date +%s) '/Mem/{print t, $3}'; done ) > "$OUT/mem.txt" &
mon=$!
timeout $(( $(left) - 45 )) python3 bench/flashinfer_coldstart.py jitkiln-cold --result $R 2>&1 | tail -c 600
kill $mon
echo "cold done at $(( $(date +%s) - t0 )) s; peak used memory $(sort -k2 -n "$OUT/mem.txt" | tail -1 | awk '{printf "%.1f GiB", $2/2^30}')"
for m in jitkiln-seeded jitkiln-warm; do
  [ "$(left)" -gt 10 ] && timeout $(( $(left) - 3 )) python3 bench/flashinfer_coldstart.py $m --result $R 2>&1 | tail -c 400
done
