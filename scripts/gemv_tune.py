"""Tuning sweep of the weight-stream (GEMV) units: times extra (warps, unroll) variants of both stages beside the
family's candidates, through bench/moe_perf.py's --sweep, in one process. The extra variants exist only in this
process (the family's candidate list is extended here, not in the library).

    python scripts/gemv_tune.py --s1 8x4,8x2,4x4 --s2 4x4,4x2,8x2n1 -- <bench/moe_perf.py arguments>

(WARPSxUNROLL, and nN for N x 8 routed rows a pass; stage 2 without nN is the per-token unit.)
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from jitkiln.families.moe2stage import heuristic  # noqa: E402
from jitkiln.families.moe2stage.gemv import MoEGemv1, MoEGemv2  # noqa: E402


def variants(text, cls):
    out = []
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)(?:n(\d+))?", item)
        try:
            if not m:
                raise ValueError("not WARPSxUNROLL[nN]")
            kw = {} if m.group(3) is None else {"n": int(m.group(3))}
            out.append(cls(dtype="bf16", warps=int(m.group(1)), unroll=int(m.group(2)), **kw))
        except ValueError as e:
            sys.exit(f"gemv_tune: bad variant {item!r} ({e}); write WARPSxUNROLL[nN], e.g. 8x4,4x2,8x2n4")
    return out


def main():
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    if len(own) % 2 or any(k not in ("--s1", "--s2") for k in own[::2]):
        sys.exit("gemv_tune: usage: gemv_tune.py [--s1 WxU,..] [--s2 WxU,..] -- <bench/moe_perf.py arguments>")
    opts = dict(zip(own[::2], own[1::2]))
    extra = variants(opts.get("--s1", ""), MoEGemv1) + variants(opts.get("--s2", ""), MoEGemv2)
    base = heuristic.candidates
    have = {c.digest for c in base("bf16")}
    extra = [e for e in extra if e.digest not in have]

    def candidates(dtype, gemv=True, dsl=False):
        return base(dtype, gemv, dsl) + (extra if dtype == "bf16" and gemv and not dsl else [])
    heuristic.candidates = candidates
    print("extra GEMV variants: " + ", ".join(e.name for e in extra), flush=True)
    import moe_perf
    sys.argv = ["moe_perf.py"] + rest
    moe_perf.main()


if __name__ == "__main__":
    main()
