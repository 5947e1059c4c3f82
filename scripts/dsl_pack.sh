#!/bin/bash
# Repack nvidia-cutlass-dsl 4.8.1's cp312 wheels for scripts/gpu_dsl_cold.sh (a device call carries at most
# 64 MiB; the cu12 wheel alone is 92 MB): .gpu/dsl1 = the cu12 wheel's MLIR library, xz-compressed; .gpu/dsl2 =
# its JIT runtime library (xz), the rest of that wheel, and the small wheels as they are.
set -euo pipefail
d1=${1:-.gpu/dsl1}; dest=${2:-.gpu/dsl2}; tmp=$(mktemp -d)
mkdir -p "$d1" "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp" nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu12==4.8.1
cp "$tmp"/nvidia_cutlass_dsl-*.whl "$tmp"/nvidia_cutlass_dsl_libs_base-*.whl "$tmp"/nvidia_cutlass_dsl_libs_core-*.whl "$dest/"
(cd "$tmp" && mkdir x && cd x && unzip -q ../nvidia_cutlass_dsl_libs_cu12-*.whl)
tar czf "$dest/cu12-rest.tar.gz" -C "$tmp/x" --exclude='*/libcute_dsl_runtime.so' --exclude='*/_cutlass_ir*.so' .
for f in "$tmp"/x/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir*.so; do
  xz -T0 -7 -c "$f" > "$d1/$(basename "$f").xz"
done
xz -T0 -7 -c "$tmp"/x/nvidia_cutlass_dsl/cu12/lib/libcute_dsl_runtime.so > "$dest/libcute_dsl_runtime.so.xz"
rm -rf "$tmp"; du -sh "$d1" "$dest"
