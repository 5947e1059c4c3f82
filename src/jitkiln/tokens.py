"""Token counts to plan for: ``--tokens 1-8192`` means the batch sizes a server runs in that range.

One definition for every family and command (``jitkiln plan``, ``build``, ``prebuild``, ``aiter-blob``).
"""
from __future__ import annotations

from .errors import UsageError


# vLLM / SGLang style CUDA-graph capture sizes: 1, 2, 4, then every multiple of 8 up to 256 (vLLM's default
# list goes on in steps of 16 to 512); prefill / chunked-prefill batches are covered by the powers of two.
def graph_capture_sizes(max_size: int = 512) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, 513, 16))
    return [s for s in sizes if s <= max_size]


def expand_token_range(lo: int, hi: int) -> list[int]:
    """The batch sizes a server captures in [lo, hi]: CUDA-graph sizes, powers of two, and both ends."""
    lo, hi = int(lo), int(hi)
    if lo < 1 or hi < lo:
        raise UsageError(f"bad token range {lo}-{hi}: need 1 <= lo <= hi")
    out = {lo, hi}
    out.update(s for s in graph_capture_sizes() if lo <= s <= hi)
    p = 1
    while p <= hi:
        if p >= lo:
            out.add(p)
        p *= 2
    return sorted(out)


def parse_tokens(spec: str) -> list[int]:
    """``"1-8192"`` -> :func:`expand_token_range`; ``"1,16,64"`` -> those; ``"512"`` -> [512]."""
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(expand_token_range(int(a), int(b)))
            else:
                v = int(part)
                if v < 1:
                    raise ValueError
                out.add(v)
        except (ValueError, UsageError):
            raise UsageError(f"bad --tokens {spec!r}: give N, N,M,... or LO-HI (e.g. 1-8192)") from None
    return sorted(out)
