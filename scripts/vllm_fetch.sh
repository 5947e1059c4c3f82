#!/bin/bash
# Fetch vLLM's Triton fused-MoE source and tuned configs from the vLLM wheel, for bench/vllm_moe.py (the vLLM peer
# of bench/moe_perf.py). Nothing of vLLM is committed: DIR is ignored (default .gpu/vllm), and travels to the GPU
# machine with `carry`.
#   bash scripts/vllm_fetch.sh [DIR] [VERSION]        (default VERSION 0.33.0)
set -euo pipefail
dir=${1:-.gpu/vllm}
ver=${2:-0.33.0}
if [ -e "$dir" ] && [ ! -d "$dir" ]; then echo "vllm_fetch: $dir is a file, not a folder: name a folder to write into" >&2; exit 2; fi
mkdir -p "$dir" 2>/dev/null || { echo "vllm_fetch: cannot create the folder $dir" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip download -q --no-deps "vllm==$ver" -d "$tmp" > "$tmp/pip.log" 2>&1; then
  echo "vllm_fetch: pip download vllm==$ver failed (no such version, or no network); pip said:" >&2
  grep -E "^ERROR" "$tmp/pip.log" | tail -2 | cut -c1-300 >&2
  exit 1
fi
whl=$(ls "$tmp"/vllm-*.whl | head -1)
src=vllm/model_executor/layers/fused_moe
python3 - "$whl" "$dir" "$ver" "$src" <<'PY'
import os, sys, zipfile
whl, out, ver, src = sys.argv[1:]
os.makedirs(os.path.join(out, "configs"), exist_ok=True)
with zipfile.ZipFile(whl) as z:
    names = z.namelist()
    if f"{src}/fused_moe.py" not in names:
        sys.exit(f"vllm_fetch: {src}/fused_moe.py is not in {os.path.basename(whl)}")
    open(os.path.join(out, "fused_moe.py"), "wb").write(z.read(f"{src}/fused_moe.py"))
    n = 0
    for nm in names:
        if nm.startswith(f"{src}/configs/") and nm.endswith(".json"):
            open(os.path.join(out, "configs", os.path.basename(nm)), "wb").write(z.read(nm))
            n += 1
open(os.path.join(out, "VERSION"), "w").write(ver + "\n")
print(f"vllm_fetch: vLLM {ver}: fused_moe.py and {n} configs in {out}")
PY
