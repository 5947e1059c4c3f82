"""``jitkiln aiter plan|prebuild|seed``: the AITER front end on the command line (see docs/aiter.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Sequence

from ..errors import JitkilnError, UsageError


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="a4w4", help="ck2stages variant (default a4w4)")
    p.add_argument("--model", help="Hugging Face config.json of the MoE model (or a built-in name, e.g. kimi-k2)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree")
    p.add_argument("--ep", type=int, default=1, help="expert parallel degree")
    p.add_argument("--tokens", default=None, help="token counts the server runs, e.g. 1-8192 (default 1-8192 "
                                                  "with --model)")
    p.add_argument("--shape", action="append", default=[], help="K=V,... e.g. inter_dim=1024,block_m=128")
    p.add_argument("--arch", help="gfx950 or gfx942 (default: $JITKILN_ARCH, $GPU_ARCHS; 'native' is resolved "
                                  "from the GPU)")
    p.add_argument("--policy", default="full", choices=("full", "error"),
                   help="shapes outside the plan: AITER's full module (full) or fail fast (error)")


def _plan_of(a) -> dict:
    plan: dict = {}
    if a.model:
        plan.update(model=a.model, tp=a.tp, ep=a.ep, tokens=a.tokens or "1-8192")
    if a.shape:
        plan["shapes"] = list(a.shape)
    if not plan:
        raise JitkilnError("give the deployment: --model CONFIG --tp N [--tokens RANGE], or --shape K=V,...")
    return plan


def cmd_plan(a) -> int:
    from .planner import AiterCK2Stages, make_spec
    from .tree import package_root, resolve_arch
    arch = resolve_arch(a.arch)
    fam = AiterCK2Stages(aiter_root=str(package_root()), arch=arch)
    from .tree import check_signature
    check_signature(fam.module(a.variant), fam.tree.root)
    spec = make_spec(fam, a.variant, _plan_of(a), a.policy)
    doc = {**spec.plan, "variant": spec.variant, "arch": spec.arch, "policy": spec.policy}
    if a.out:
        try:
            Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write the plan to {a.out}: {e.strerror or e}",
                             hint="give -o a file in an existing, writable folder") from None
    if a.json:
        print(json.dumps({"plan": doc, "suffix": spec.suffix, "module_key": spec.module_key,
                          "instances": spec.instances, "unused": spec.unused}, indent=2))
    else:
        print(f"{spec.variant} on {spec.arch}: {len(spec.instances)} of {len(spec.instances) + len(spec.unused)} "
              f"instances; AITER module name suffix _{spec.suffix}")
        for n in spec.instances:
            print(f"  {n}")
        if a.out:
            print(f"plan written to {a.out}: export JITKILN_AITER_PLAN={os.path.abspath(a.out)}")
    return 0


def cmd_prebuild(a) -> int:
    from .prebuild import prebuild
    r = prebuild(_plan_of(a), variant=a.variant, arch=a.arch, out=a.out, key=a.key, policy=a.policy)
    print(json.dumps(r, indent=2) if a.json else
          f"built {r['md_name']}.so ({len(r['instances'])} instances) at {r['so']}"
          + (f"; bundle {r['bundle']}" if r.get("bundle") else ""))
    return 0


def cmd_seed(a) -> int:
    from .prebuild import seed
    r = seed(a.bundle, trust_paths=a.trust, arch=a.arch, dest_dir=a.jit_dir)
    print(f"installed {r['installed']}\nenable it in the server: export JITKILN_AITER_PLAN={r['plan']} and call "
          f"jitkiln.aiter.enable() after `import aiter`")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``aiter`` (with ``plan``, ``prebuild``, ``seed``) on an argparse subparsers object.

    Each leaf sets ``func``/``fn`` to a callable taking the parsed args and returning an exit code."""
    p = subparsers.add_parser("aiter", help="AITER front end: plan, prebuild and seed jitkiln's reduced "
                                            "ck2stages module", description=__doc__)
    sub = p.add_subparsers(dest="aiter_cmd", required=True)
    pl = sub.add_parser("plan", help="plan the reduced module and write the plan file for JITKILN_AITER_PLAN")
    _plan_args(pl)
    pl.add_argument("-o", "--out", help="write the plan JSON here")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan, fn=cmd_plan)
    pb = sub.add_parser("prebuild", help="build the reduced module with AITER's build (needs ROCm) and "
                                         "optionally write a signed bundle")
    _plan_args(pb)
    pb.add_argument("-o", "--out", help="write a signed bundle here")
    pb.add_argument("--key", help="ed25519 signing key (default $JITKILN_SIGNING_KEY)")
    pb.add_argument("--json", action="store_true")
    pb.set_defaults(func=cmd_prebuild, fn=cmd_prebuild)
    sd = sub.add_parser("seed", help="install a bundle's module into this machine's AITER JIT folder")
    sd.add_argument("bundle")
    sd.add_argument("--trust", action="append", default=[], help="extra trusted .pub file or folder")
    sd.add_argument("--arch", help="this machine's arch, when no GPU is visible")
    sd.add_argument("--jit-dir", help="AITER's JIT folder (default: $AITER_JIT_DIR, else AITER's own)")
    sd.set_defaults(func=cmd_seed, fn=cmd_seed)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jitkiln.aiter.cli")
    add_cli(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except JitkilnError as e:
        print(f"error: {e.full()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
