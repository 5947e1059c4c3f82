#!/bin/bash
# One device call for moe2stage at decode (bench/moe_perf.py against vLLM's Triton fused MoE): build every bf16
# candidate (the weight-stream GEMV units included), check them, benchmark. Results under $OUT.
#   run (carry .whl .gpu/vllm [.gpu/cache]): bash scripts/gpu_decode.sh [check] [bench] [sweep] [fp8] [fp8b128] [dsl]
#   .gpu/vllm: scripts/vllm_fetch.sh; .gpu/cache: a jitkiln cache brought back by an earlier call (cache.tar.xz),
#   so a later call on a fresh machine loads the CUTLASS units instead of compiling them again.
#   dsl: also bf16-dsl (its units compiled here beforehand: python scripts/moe_dsl_build.py .gpu/cache), checked
#   and timed beside bf16 (bench/moe_perf.py --dsl-cache .gpu/cache).
#   fp8b128: also build and check the fp8b128 variant (not timed: the vLLM peer is bf16 / per-tensor fp8).
#   BENCH_ARGS: more bench/moe_perf.py flags (e.g. --shapes / --tokens); DEADLINE: seconds for the whole call.
#   The build log stays on the machine ($BUILD_LOG, default /tmp/build.log; its "built" lines are printed).
for w in "$@"; do
  case $w in check|bench|sweep|tune|fp8|fp8b128|dsl) ;;
    *) echo "gpu_decode.sh: unknown word '$w': use check, bench, sweep, tune, fp8, fp8b128, dsl" >&2; exit 2 ;;
  esac
done
for v in ${CHECK_VARIANTS:-}; do
  case $v in bf16|fp8|fp8b128|bf16-dsl) ;;
    *) echo "gpu_decode.sh: CHECK_VARIANTS: unknown variant '$v' (bf16, fp8, fp8b128, bf16-dsl)" >&2; exit 2 ;;
  esac
done
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
variants="bf16"; [[ " $* " == *" fp8 "* ]] && variants="bf16 fp8"
[[ " $* " == *" fp8b128 "* ]] && variants="$variants fp8b128"
BUILD_LOG=${BUILD_LOG:-/tmp/build.log}
DSL_ARGS=""; [[ " $* " == *" dsl "* ]] && DSL_ARGS="--dsl-cache .gpu/cache"
for v in $variants; do  # the variants side by side (one store: each unit is compiled once)
  ( python3 scripts/moe_build.py --jobs 16 --variant $v > "$BUILD_LOG.$v" 2>&1 || echo "build $v failed" >> "$BUILD_LOG.$v" ) &
done
wait
cat "$BUILD_LOG".* > "$BUILD_LOG"
if grep -q "^build .* failed" "$BUILD_LOG"; then tail -40 "$BUILD_LOG"; exit 1; fi
grep -hE "^built|wall_s" "$BUILD_LOG"
echo "built at $(( $(date +%s) - t0 )) s"
# CACHE_OUT=1: bring the cache back (objects + manifests; small) for the next call (at most 8 files come back)
if [ "${CACHE_OUT:-0}" = 1 ]; then
  tar -C $JITKILN_CACHE_DIR -cJf "$OUT/cache.tar.xz" v1/objects v1/manifests v1/header-digests.json 2>/dev/null
fi
for what in "$@"; do
  case $what in
    check)  # CHECK_VARIANTS: only these (default: every built variant, and bf16-dsl with dsl)
      for v in ${CHECK_VARIANTS:-$variants}; do
        [ "$v" = bf16-dsl ] && continue
        timeout $(left) python3 scripts/moe_check.py --variant $v --grid --grid-tokens 1,8,64,512 \
          > "$OUT/check-$v.log" 2>&1
        echo "check $v rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "^BAD|SUMMARY" "$OUT/check-$v.log" | head -20
      done
      if [ -n "$DSL_ARGS" ] && [[ -z "$CHECK_VARIANTS" || " $CHECK_VARIANTS " == *" bf16-dsl "* ]]; then
        timeout $(left) python3 scripts/moe_check.py --variant bf16-dsl $DSL_ARGS --grid --grid-tokens 1,8,64,512 \
          > "$OUT/check-bf16-dsl.log" 2>&1
        echo "check bf16-dsl rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "^BAD|SUMMARY" "$OUT/check-bf16-dsl.log" | head -20
      fi ;;
    sweep)
      timeout $(left) python3 bench/moe_perf.py --vllm .gpu/vllm --no-loop --no-grouped-mm --reps 7 \
        --shapes "kimi-k2 tp8,kimi-k2 ep8,qwen3-moe,small-moe,qwen3-30b,mixtral tp8" --tokens ${SWEEP_TOKENS:-1,4,16,64,256} \
        --sweep ${SWEEP_TOKENS:-1,4,16,64,256} $DSL_ARGS ${BENCH_ARGS} --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
      echo "sweep rc=$? at $(( $(date +%s) - t0 )) s"; grep -vE "^\|" "$OUT/sweep.log" | tail -80 ;;
    tune)
      timeout $(left) python3 scripts/gemv_tune.py --s1 "${TUNE_S1:-8x2,4x4,4x2,16x2}" --s2 "${TUNE_S2:-4x2,8x2,8x4,2x4}" -- \
        --vllm .gpu/vllm --no-loop --no-grouped-mm --reps 7 \
        --shapes "kimi-k2 tp8,kimi-k2 ep8,qwen3-moe,small-moe,qwen3-30b,mixtral tp8" --tokens ${SWEEP_TOKENS:-1,2,4,8,16,32} \
        --sweep ${SWEEP_TOKENS:-1,2,4,8,16,32} ${BENCH_ARGS} --json "$OUT/tune.json" > "$OUT/tune.log" 2>&1
      echo "tune rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "kernels:|extra GEMV|Error|error" "$OUT/tune.log" | cut -c1-600 | tail -20 ;;
    bench)
      timeout $(left) python3 bench/moe_perf.py --vllm .gpu/vllm --no-loop --reps 9 --tokens all \
        --shapes "kimi-k2 tp8,kimi-k2 ep8,qwen3-moe,small-moe,qwen3-30b,mixtral tp8" $DSL_ARGS ${BENCH_ARGS} \
        --json "$OUT/moe-perf.json" --md "$OUT/moe-perf.md" > "$OUT/bench.log" 2>&1
      echo "bench rc=$? at $(( $(date +%s) - t0 )) s"; grep -vE "^\|" "$OUT/bench.log" | tail -40 ;;
  esac
done
