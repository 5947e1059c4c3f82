"""What AITER's ``fused_moe`` runs for a shape: tuned-CSV rows first, else ``get_block_size_M`` + heuristic.

Mirrors the choices of ``aiter.fused_moe.get_2stage_cfgs`` that decide which ck2stages instances a deployment
needs: the tuned fMoE CSV row for the (padded) token count, its ``block_m`` and kernel names; without a row, the
block size from ``get_block_size_M`` and the heuristic dispatch; stage 1 runs AITER's CK module only for the
weight dtypes AITER sends there (fp8/int8 weights use an assembly stage 1 unless a row names a CK kernel).
``tests/test_ck2stages_plan.py`` checks ``padded_m``/``block_size_m`` against AITER's own functions.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import UsageError
from .aiter_tree import AiterTree
from .variants import DEFAULT_CU_NUM, Variant

KEY_COLS = ("cu_num", "token", "model_dim", "inter_dim", "expert", "topk", "act_type", "dtype", "q_dtype_a",
            "q_dtype_w", "q_type", "use_g1u1", "doweight_stage1")
CK_STAGE1_WEIGHTS = ("b16", "f16", "i4", "fp4x2")  # AITER runs its CK stage 1 for these weight dtypes


def padded_m(m: int) -> int:
    """AITER's token bucketing for config lookup: 1..16 -> 16, then the next power of two, capped at 1024."""
    if 1 <= m <= 16:
        return 16
    if m < 1024:
        return 1 << (m - 1).bit_length() if m > 0 else 1
    return 1024


def block_size_m(token: int, topk: int, expert: int, inter_dim: int, cu_num: int) -> int:
    """AITER's untuned block_m choice: the candidate with the fewest waves of tiles over the CUs, then the
    fewest idle CUs in the last wave."""
    tiles_n = -(-inter_dim // 128)
    best = None
    for bm in (32, 64, 128):
        rows = token * topk + expert * bm - topk
        tiles = (tiles_n * (rows + bm - 1)) // bm  # AITER's grouping: (tgN * (rows + bm - 1)) // bm
        score = (-(-tiles // cu_num), cu_num - tiles % cu_num)
        if best is None or score < best[0]:
            best = (score, bm)
    return best[1]


def cu_num_for(arch: str) -> int:
    env = os.environ.get("CU_NUM")
    if env:
        return int(env)
    return DEFAULT_CU_NUM[arch]


@dataclass
class TunedRow:
    source: str  # file:line
    block_m: int
    kernel1: str
    kernel2: str
    run_1stage: bool


def tuned_files(tree: AiterTree) -> list[Path]:
    env = os.environ.get("AITER_CONFIG_FMOE")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    if not tree.configs or not tree.configs.is_dir():
        return []
    files = [tree.configs / "tuned_fmoe.csv"]
    files += sorted(p for p in (tree.configs / "model_configs").glob("*tuned_fmoe*.csv")
                    if "untuned" not in p.name)
    return [f for f in files if f.is_file()]


def load_tuned(tree: AiterTree) -> dict[tuple, TunedRow]:
    """Every tuned fMoE row by its key (later rows and files win, as in AITER's dict of the CSV)."""
    out: dict[tuple, TunedRow] = {}
    for f in tuned_files(tree):
        with open(f, newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh), start=2):
                try:
                    key = tuple(str(row[c]).strip() for c in KEY_COLS)
                    out[key] = TunedRow(f"{f.name}:{i}", int(float(row["block_m"])), row.get("kernelName1", ""),
                                        row.get("kernelName2", ""),
                                        str(row.get("run_1stage", "0")).strip() in ("1", "True", "true"))
                except (KeyError, ValueError):
                    continue
    return out


@dataclass
class Resolved:
    """What AITER runs for one shape: block_m, kernel names (tuned) and which CK stages run, with the reason."""

    block_m: int
    stages: tuple[int, ...]
    kernels: dict = field(default_factory=dict)  # stage -> tuned kernel name
    why: str = ""


def resolve(problem: dict[str, Any], variant: Variant, arch: str, tuned: dict[tuple, TunedRow]) -> Resolved:
    if "token" not in problem:  # an explicit (inter_dim, block_m) shape: the heuristic dispatch, both stages
        kernels = {s: problem[f"kernel_name{s}"] for s in (1, 2) if problem.get(f"kernel_name{s}")}
        why = f"--shape inter_dim={problem['inter_dim']},block_m={problem['block_m']}"
        return Resolved(int(problem["block_m"]), (1, 2), kernels, why + (" with kernel names" if kernels else ""))
    cu = cu_num_for(arch)
    token, inter_dim = problem["token"], problem["inter_dim"]
    key = (str(cu), str(token), str(problem["model_dim"]), str(inter_dim), str(problem["expert"]),
           str(problem["topk"]), *[variant.csv_key(arch)[c] for c in KEY_COLS[6:11]], "1",
           variant.csv_key(arch)["doweight_stage1"])
    row = tuned.get(key)
    if row is not None:
        if row.run_1stage:
            return Resolved(row.block_m, (), {}, f"tuned {row.source}: 1-stage kernel, no ck2stages instance")
        ck1 = "ck2stages" in row.kernel1 or variant.b in CK_STAGE1_WEIGHTS
        stages = (1, 2) if ck1 else (2,)
        kernels = {1: row.kernel1, 2: row.kernel2} if ck1 else {2: row.kernel2}
        return Resolved(row.block_m, stages, {s: k for s, k in kernels.items() if k},
                        f"tuned {row.source} (token={token}, block_m={row.block_m})")
    if variant.quant == "per_1x128":
        bm, why = 64, "untuned: block_m=64 for per_1x128"
    else:
        bm = block_size_m(token, problem["topk"], problem["expert"], inter_dim, cu)
        why = (f"untuned: block_m={bm} from get_block_size_M(token={token}, topk={problem['topk']}, "
               f"expert={problem['expert']}, inter_dim={inter_dim}, cu_num={cu})")
    if variant.b in CK_STAGE1_WEIGHTS:
        return Resolved(bm, (1, 2), {}, why)
    if bm not in (32, 64, 128):
        bm = ([b for b in (32, 64, 128) if bm < b] + [128])[0]
    return Resolved(bm, (2,), {}, why + "; stage 1 runs AITER's assembly kernel")


# --- model configs --------------------------------------------------------------------------------------------

def _first(cfg: dict, *names: str):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return None


def model_shapes(model: str, tp: int, ep: int) -> dict[str, int]:
    """(model_dim, inter_dim, expert, topk) of a Hugging Face ``config.json`` for one rank."""
    p = Path(model)
    builtin = Path(__file__).resolve().parents[2] / "data" / "models" / f"{model}.json"
    if not p.exists() and builtin.is_file():
        p = builtin  # a built-in example model name (jitkiln/data/models/<name>.json)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except OSError as e:
        raise UsageError(f"cannot read model config {model}: {e.strerror}",
                         hint="give --model the path of a Hugging Face config.json (or its folder)") from None
    except ValueError as e:
        raise UsageError(f"model config {model} is not JSON: {e}") from None
    cfg = cfg.get("text_config", cfg) if "moe_intermediate_size" not in cfg else cfg
    hidden = _first(cfg, "hidden_size")
    inter = _first(cfg, "moe_intermediate_size", "intermediate_size")
    experts = _first(cfg, "n_routed_experts", "num_experts", "num_local_experts")
    topk = _first(cfg, "num_experts_per_tok", "moe_topk", "top_k")
    missing = [n for n, v in (("hidden_size", hidden), ("moe_intermediate_size", inter),
                              ("n_routed_experts/num_experts", experts), ("num_experts_per_tok", topk)) if v is None]
    if missing:
        raise UsageError(f"model config {p} lacks {', '.join(missing)}: it does not describe an MoE model")
    if tp < 1 or ep < 1 or inter % tp or experts % ep:
        raise UsageError(f"--tp {tp} / --ep {ep} do not divide moe_intermediate_size={inter} / "
                         f"experts={experts}", hint="--tp shards inter_dim, --ep shards the experts")
    return {"model_dim": int(hidden), "inter_dim": int(inter) // tp, "expert": int(experts) // ep,
            "topk": int(topk)}


def token_buckets(tokens: Sequence[int]) -> list[int]:
    """The padded token counts AITER looks configs up by, for every token count given."""
    if not tokens:
        raise UsageError("empty --tokens range")
    if min(tokens) < 1:
        raise UsageError("--tokens must be >= 1")
    return sorted({padded_m(int(t)) for t in tokens})
