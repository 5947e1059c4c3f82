#!/bin/bash
# One device call for scripts/tile_tune.py: build every bf16 (and fp8, where the set has fp8 tiles) candidate plus
# the set's extra tiles, check them, sweep every tile of each stage against vLLM. Results under $OUT.
#   run (carry .whl .gpu/vllm .gpu/cache): TILE_TUNE_SET=wide bash scripts/gpu_tile_tune.sh
#   SHAPES / TOKENS: the sweep's shapes and token counts; CHECK_TOKENS: moe_check's grid; DEADLINE: seconds.
[ $# -eq 0 ] || { echo "gpu_tile_tune.sh: takes no arguments (TILE_TUNE_SET, SHAPES, TOKENS, CHECK_TOKENS, DEADLINE)" >&2; exit 2; }
python3 scripts/tile_tune.py sets > /dev/null || exit 2
source scripts/gpu_env.sh
python3 scripts/tile_tune.py build-cpp --jobs 16 > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -30 "$OUT/build.log"; }
grep -E "^built" "$OUT/build.log" | grep -v " cached" ; echo "built at $(( $(date +%s) - t0 )) s"
tar -C $JITKILN_CACHE_DIR -cJf "$OUT/cache.tar.xz" v1/objects v1/manifests v1/header-digests.json 2>/dev/null
variants=$(python3 -c "import sys; sys.path.insert(0,'scripts'); import tile_tune; print(' '.join(tile_tune.EXTRA))")
for v in $variants; do
  DSL=""; [ "$v" = bf16-dsl ] && DSL="--dsl-cache .gpu/cache"
  timeout $(( $(left) / 3 )) python3 scripts/tile_tune.py check -- --variant $v $DSL --grid --grid-tokens ${CHECK_TOKENS:-1,64,512} \
    > "$OUT/check-$v.log" 2>&1
  echo "check $v rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "^BAD|SUMMARY" "$OUT/check-$v.log" | head -20
done
FP8=""; [[ " $variants " == *" fp8 "* ]] && FP8=--fp8
DSL=""; [[ " $variants " == *" bf16-dsl "* ]] && DSL="--dsl-cache .gpu/cache"
timeout $(left) python3 scripts/tile_tune.py bench -- --vllm .gpu/vllm --no-loop --no-grouped-mm --reps 5 $FP8 $DSL \
  --shapes "${SHAPES:-small-moe,qwen3-30b,mixtral tp8,kimi-k2 tp8}" --tokens ${TOKENS:-256,1024,4096,16384} \
  --sweep ${TOKENS:-256,1024,4096,16384} --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? at $(( $(date +%s) - t0 )) s"; grep -vE "^\|" "$OUT/sweep.log" | cut -c1-400 | tail -60
