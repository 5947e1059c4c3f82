"""Command-line arguments shared by every command that plans (``plan``, ``build``, ``prebuild``, extensions):
the plan arguments, the family options, the store and the executor they select."""
from __future__ import annotations

import argparse
import re
from typing import Sequence

from .errors import UsageError
from .family import Family, family_names, get_family
from .fleet.config import store_from_env
from .fleet.ray import RayCompile
from .plan import Plan, make_plan
from .store import Store
from .tokens import parse_tokens


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as jitkiln's one-line reason (no usage block before it)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def parse_shapes(items: Sequence[str] | None) -> list[dict]:
    shapes = []
    for item in items or []:
        d = {}
        for kv in item.split(","):
            k, sep, v = kv.partition("=")
            if not sep or not k.strip():
                raise UsageError(f"bad --shape {item!r}: give K=V pairs separated by commas, e.g. m=128,n=256,k=64")
            v = v.strip()
            d[k.strip()] = int(v) if re.fullmatch(r"-?\d+", v) else v
        shapes.append(d)
    return shapes


def _family_options() -> dict[str, list[str]]:
    """Every option flag families declare -> the families declaring it."""
    out: dict[str, list[str]] = {}
    for name in family_names():
        try:
            fam = get_family(name)
        except Exception:  # noqa: BLE001 - a broken family must not take the command line down
            continue
        for opt in fam.options:
            out.setdefault(opt.flag, []).append(name)
    return out


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("family", help="kernel family (see `jitkiln doctor` for the list)")
    p.add_argument("--variant", help="variant (dtype tag); the family's first by default")
    p.add_argument("--model", help="a model config.json path, or a built-in model name (e.g. kimi-k2)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size (default 1)")
    p.add_argument("--ep", type=positive_int, default=1, help="expert parallel size (default 1)")
    p.add_argument("--tokens", help="token counts: a range (1-8192: the sizes a server captures) or a list")
    p.add_argument("--shape", action="append", metavar="K=V,...", help="a problem shape (repeatable)")
    p.add_argument("--arch", help="target arch (sm_90a, gfx950...)")
    p.add_argument("--full", action="store_true", help="plan every candidate (the full module)")
    for flag, fams in sorted(_family_options().items()):
        helps = [o.help for n in fams for o in get_family(n).options if o.flag == flag]
        p.add_argument(flag, help=helps[0] if helps else f"option of {', '.join(fams)}")
    p.add_argument("--json", action="store_true", help="print JSON")


def configure_family(args) -> Family:
    fam = get_family(args.family)
    opts = {}
    for flag, fams in _family_options().items():
        dest = flag.lstrip("-").replace("-", "_")
        val = getattr(args, dest, None)
        if val is None:
            continue
        if fam.name not in fams:
            raise UsageError(f"{flag} is an option of {', '.join(fams)}, not of {fam.name}")
        opts[dest] = val
    return fam.configure(arch=args.arch, **opts)


def plan_from_args(args, require_compiler: bool = False) -> Plan:
    fam = configure_family(args)
    variant = fam.check_variant(args.variant)
    problems = fam.problems(variant, shapes=parse_shapes(args.shape), model=args.model, tp=args.tp, ep=args.ep,
                            tokens=parse_tokens(args.tokens) if args.tokens else None)
    return make_plan(fam, variant, problems, arch=args.arch, full=args.full, require_compiler=require_compiler)


def store_from_args(args):
    """The local store (``--cache-dir``), or the fleet store the environment configures."""
    return store_from_env(getattr(args, "cache_dir", None) or None)


def executor_from_args(args):
    if getattr(args, "executor", "local") != "ray":
        return None
    return RayCompile(address=args.ray_address)


__all__ = ["ArgumentParser", "Store", "add_plan_args", "configure_family", "executor_from_args", "parse_shapes",
           "plan_from_args", "positive_int", "store_from_args"]
