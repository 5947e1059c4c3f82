"""bench/vllm_moe.py: the vLLM peer's expert assignment (what vLLM's moe_align_block_size returns) and its source
extraction, on the CPU (the kernel itself runs on the GPU machine only)."""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from vllm_moe import VllmMoE, VllmUnavailable, _extract  # noqa: E402


def test_align_matches_vllms_documented_example():
    # moe_align_block_size's docstring example (ids 1-based there: 4 experts, block 4); here ids 0..3 (+ one -1)
    ids = torch.tensor([[1, 2, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2]], dtype=torch.int32)
    sorted_ids, expert_ids, ntp, em = VllmMoE.assign(None, ids, 4, 4, ep=2)
    n = ids.numel()
    assert int(ntp) == 16 and em == sorted_ids.numel()
    got = sorted_ids[:16].view(4, 4)
    assert got.tolist() == [[3, 6, 9, n], [0, 4, 10, n], [1, 7, 11, n], [2, 5, 8, n]]
    assert expert_ids[:4].tolist() == [0, 1, 2, 3] and (sorted_ids[16:] == n).all()


def test_align_skips_other_ranks_and_pads():
    ids = torch.tensor([[0, -1], [-1, 0], [1, -1]], dtype=torch.int32)
    sorted_ids, expert_ids, ntp, _ = VllmMoE.assign(None, ids, 2, 8, ep=8)
    assert int(ntp) == 4  # expert 0: 2 rows, expert 1: 1 row + 1 pad
    assert sorted_ids[:4].tolist() == [0, 3, 4, 6] and expert_ids[:2].tolist() == [0, 1]


def test_naive_assignment_when_few_pairs():
    ids = torch.tensor([[5, 9]], dtype=torch.int32)
    sorted_ids, expert_ids, ntp, em = VllmMoE.assign(None, ids, 16, 384, ep=1)
    assert sorted_ids is None and expert_ids.tolist() == [5, 9] and int(ntp) == em == 2 * 16


def test_extract_names_what_is_missing():
    src = "import x\n\n@deco\ndef a(p):\n    return p\n\n\ndef b():\n    pass\n"
    assert _extract(src, ("a",)).startswith("@deco\ndef a(p):")
    with pytest.raises(VllmUnavailable, match="has no c"):
        _extract(src, ("a", "c"))


def test_load_names_a_missing_or_wrong_folder(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    for bad in (f, tmp_path / "missing", tmp_path):  # a file, nothing, a folder without fused_moe.py
        with pytest.raises(VllmUnavailable, match="scripts/vllm_fetch.sh"):
            VllmMoE(str(bad))
