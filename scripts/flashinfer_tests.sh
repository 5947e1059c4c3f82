#!/bin/bash
# Export FlashInfer's own cutlass fused-MoE tests (and the helpers they import) from a FlashInfer git checkout
# into DEST, for running against a jitkiln-built module on the GPU machine (FlashInfer's tests are not in its
# wheel or sdist). Nothing of them enters this repo: DEST is an ignored folder.
#   bash scripts/flashinfer_tests.sh GIT_DIR [REV] DEST
set -euo pipefail
git_dir=$1; rev=${2:-HEAD}; dest=${3:-.gpu/fi/tests}
rm -rf "$dest"; mkdir -p "$dest"
files=$(git --git-dir="$git_dir" ls-tree -r --name-only "$rev" -- tests/__init__.py tests/conftest.py \
        tests/test_helpers tests/moe/__init__.py tests/moe/conftest.py tests/moe/utils.py \
        tests/moe/test_trtllm_cutlass_fused_moe.py)
for f in $files; do
  mkdir -p "$dest/$(dirname "$f")"
  git --git-dir="$git_dir" show "$rev:$f" > "$dest/$f"
done
echo "$(git --git-dir="$git_dir" rev-parse "$rev") $(git --git-dir="$git_dir" show "$rev:version.txt" 2>/dev/null)" > "$dest/REVISION"
echo "exported $(echo "$files" | wc -w) files of FlashInfer $(cat "$dest/REVISION") to $dest"
