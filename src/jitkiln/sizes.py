"""Sizes and ages as people write them (``500M``, ``20G``, ``30d``)."""
from __future__ import annotations

import re

from .errors import UsageError


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", str(s).strip().lower())
    if not m:
        raise UsageError(f"bad size {s!r}: give e.g. 500M or 20G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_age(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", str(s).strip().lower())
    if not m:
        raise UsageError(f"bad age {s!r}: give e.g. 30d, 12h or 3600s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
