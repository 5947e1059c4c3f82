#!/bin/bash
# Two device calls, back to back on the same warm machine: the CuTe DSL back end's compile cost on the GPU
# machine's 16 cores, against the C++ stock build in the same job. The DSL's cp312 wheels (~96 MB) exceed what one
# call carries (64 MiB), so scripts/dsl_pack.sh repacks them: .gpu/dsl1 = the cu12 wheel's MLIR library
# (xz), .gpu/dsl2 = its JIT runtime library (xz), the rest of that wheel and the small wheels.
#   call 1 (carry .gpu/dsl1):        bash scripts/gpu_dsl_cold.sh stage   -> /tmp/dsl-stage (outside the tree: kept while the machine is warm)
#   call 2 (carry .whl, .gpu/dsl2):  bash scripts/gpu_dsl_cold.sh run     results under $OUT
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
S=/tmp/site
t0=$(date +%s)
if [ "${1:-run}" = stage ]; then
  mkdir -p /tmp/dsl-stage && for f in .gpu/dsl1/*.so.xz; do xz -dc "$f" > "/tmp/dsl-stage/$(basename "${f%.xz}")"; done
  ls -la /tmp/dsl-stage; exit 0
fi
ls /tmp/dsl-stage/_cutlass_ir*.so >/dev/null 2>&1 || { echo "no staged MLIR library: the machine was not warm"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S .whl/nvidia_cutlass-*.whl \
  .gpu/dsl2/*.whl || exit 1
tar xzf .gpu/dsl2/cu12-rest.tar.gz -C $S || exit 1
mv /tmp/dsl-stage/_cutlass_ir*.so $S/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/ || exit 1
xz -dc .gpu/dsl2/libcute_dsl_runtime.so.xz > $S/nvidia_cutlass_dsl/cu12/lib/libcute_dsl_runtime.so || exit 1
export PYTHONPATH=$S:$S/nvidia_cutlass_dsl/dsl_packages:$PWD/src JITKILN_CUTLASS_DIR=$S/cutlass_library/source
echo "setup $(( $(date +%s) - t0 )) s; $(nproc) cores; $(nvcc --version | tail -1)"
python3 -c "import cutlass, cutlass.cute; print('cutlass dsl', cutlass.__version__ if hasattr(cutlass, '__version__') else '?')" || exit 1
python3 bench/coldstart.py moe2stage --variant bf16-dsl --stock-variant bf16 --model kimi-k2 --tp 8 \
  --tokens 1-8192 --scenarios a,c,d --gpu --tag dsl-16cores-h200 --out-dir "$OUT" 2>&1 | tail -12
echo "coldstart done at $(( $(date +%s) - t0 )) s"
python3 bench/instance_cost.py --dsl-only --tag cutedsl-16cores-h200 --out "$OUT" 2>&1 | tail -14
echo "instance cost done at $(( $(date +%s) - t0 )) s"
