# Sourced by the device-call scripts (gpu_decode.sh, gpu_tile_tune.sh): $OUT, the DEADLINE clock (`left`: seconds
# still to spend), the CUTLASS headers from the carried wheel, and a jitkiln cache seeded from a carried
# .gpu/cache/cache.tar.xz (objects an earlier call brought back), so units compiled before are loaded, not rebuilt.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-570}
t0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - t0) )); }
ls .whl/nvidia_cutlass-*.whl > /dev/null 2>&1 || {
  echo "$(basename "$0"): no .whl/nvidia_cutlass-*.whl here: carry .whl (pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl)" >&2
  exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/nvidia_cutlass-*.whl || exit 1
export JITKILN_CUTLASS_DIR=/tmp/site/cutlass_library/source PYTHONPATH=$PWD/src JITKILN_CACHE_DIR=/tmp/jitkiln-cache
mkdir -p $JITKILN_CACHE_DIR
if [ -f .gpu/cache/cache.tar.xz ]; then tar -C $JITKILN_CACHE_DIR -xJf .gpu/cache/cache.tar.xz; fi
