"""MoE model shapes: from a Hugging Face ``config.json`` (or a shipped example), with tensor/expert parallelism.

Shipped examples live in ``jitkiln/data/models/<name>.json`` (the numbers of public configs only) and are
nameable on the command line (``--model kimi-k2``); any path to a ``config.json`` works the same.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import UsageError

# field name alternatives, in order of preference
_HIDDEN = ("hidden_size", "d_model", "n_embd")
_INTER = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size", "ffn_hidden_size")
_EXPERTS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts", "n_experts")
_TOPK = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k", "moe_top_k")
_NESTED = ("text_config", "language_config", "llm_config")


def _models_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "data" / "models"


def example_models() -> list[str]:
    """Names of the shipped example configs (``kimi-k2``, ``deepseek-v3``, ...)."""
    try:
        return sorted(p.name[:-5] for p in _models_dir().iterdir() if p.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def load_config(path_or_name: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(config dict, source label) from a dict, a path to a config.json (or its folder), or an example name."""
    if isinstance(path_or_name, Mapping):
        return dict(path_or_name), "<dict>"
    s = os.fspath(path_or_name)
    p = s
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if os.path.isfile(p):
        try:
            with open(p, "rb") as f:
                cfg = json.loads(f.read().decode("utf-8"))
        except UnicodeDecodeError:
            raise UsageError(f"cannot read model config {p}: not UTF-8 text",
                             hint="give a Hugging Face config.json") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read model config {p}: {e}") from None
        return _config_object(cfg, p), p
    res = _models_dir() / f"{s}.json"
    if res.is_file():
        return _config_object(json.loads(res.read_text()), f"example {s}"), f"example {s}"
    raise UsageError(f"no model config {s!r}: not a file, a folder holding config.json, or a shipped example",
                     hint="shipped examples: " + (", ".join(example_models()) or "(none)"))


def _config_object(cfg: Any, src: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise UsageError(f"model config {src} is JSON of the wrong type ({type(cfg).__name__}); a config.json "
                         "holds an object", hint="give a Hugging Face config.json")
    return cfg


def _pick(cfg: Mapping[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    for n in names:
        v = cfg.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return n, v
    return None


@dataclass(frozen=True)
class MoEShape:
    """A model's MoE layer, as one rank sees it after tensor / expert parallelism."""

    hidden: int  # model width (K of stage 1, N of stage 2)
    inter_dim: int  # per-rank expert intermediate size (moe_intermediate_size / tp)
    experts: int  # local experts on this rank (routed experts / ep)
    topk: int  # experts per token
    tp: int = 1
    ep: int = 1
    global_experts: int = 0
    moe_intermediate: int = 0
    source: str = ""

    @classmethod
    def from_hf_config(cls, path_or_dict, tp: int = 1, ep: int = 1) -> "MoEShape":
        cfg, src = load_config(path_or_dict)
        for key in _NESTED:  # multimodal wrappers (e.g. Kimi-K2.5's text_config)
            if isinstance(cfg.get(key), Mapping) and _pick(cfg, _EXPERTS) is None:
                cfg = dict(cfg[key])
        hidden = _pick(cfg, _HIDDEN)
        experts = _pick(cfg, _EXPERTS)
        topk = _pick(cfg, _TOPK)
        # ``intermediate_size`` is the expert width only where no ``moe_intermediate_size`` exists (Mixtral);
        # in DeepSeek/Qwen3 configs it is the dense MLP's width.
        inter = _pick(cfg, _INTER)
        missing = []
        if hidden is None:
            missing.append("hidden_size")
        if inter is None:
            missing.append("moe_intermediate_size (or intermediate_size)")
        if experts is None:
            missing.append("n_routed_experts / num_experts / num_local_experts")
        if topk is None:
            missing.append("num_experts_per_tok")
        if missing:
            raise UsageError(
                f"model config {src} does not describe a mixture-of-experts layer: missing "
                + ", ".join(missing),
                hint="give a DeepSeek-V3/Kimi-K2 style config (hidden_size, moe_intermediate_size, "
                     "n_routed_experts, num_experts_per_tok) or a Qwen3-MoE/Mixtral style one "
                     "(intermediate_size / moe_intermediate_size, num_experts / num_local_experts)")
        tp, ep = int(tp), int(ep)
        if tp < 1 or ep < 1:
            raise UsageError(f"tp and ep must be >= 1 (got tp={tp}, ep={ep})")
        H, I, E, K = hidden[1], inter[1], experts[1], topk[1]
        if I % tp:
            raise UsageError(f"{inter[0]}={I} is not divisible by tp={tp}")
        if E % ep:
            raise UsageError(f"{experts[0]}={E} is not divisible by ep={ep}")
        if K > E:
            raise UsageError(f"{topk[0]}={K} exceeds the expert count {E}")
        i_local = I // tp
        if H % 16 or i_local % 16:
            raise UsageError(f"hidden={H} and inter_dim={i_local} must be multiples of 16 (16-byte TMA rows)")
        return cls(hidden=H, inter_dim=i_local, experts=E // ep, topk=K, tp=tp, ep=ep,
                   global_experts=E, moe_intermediate=I, source=src)

    def problem(self, tokens: int) -> dict[str, int]:
        return {"tokens": int(tokens), "hidden": self.hidden, "inter_dim": self.inter_dim,
                "experts": self.experts, "topk": self.topk, "ep": self.ep}


from ...tokens import expand_token_range, graph_capture_sizes, parse_tokens  # noqa: E402,F401  (re-exported)
