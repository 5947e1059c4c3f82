"""``jitkiln flashinfer plan|build|prebuild|seed|cc``."""
from __future__ import annotations

import argparse
import json
import sys

from ..cliargs import positive_int
from ..errors import UsageError


def _deployment(args):
    from . import planner
    if args.dtype and args.model:
        d = planner.parse_dtype(args.dtype)
        return d, f"--dtype {args.dtype} (overrides the model's)"
    if args.dtype:
        return planner.parse_dtype(args.dtype), f"--dtype {args.dtype}"
    if args.model:
        return planner.deployment_from_model(args.model)
    raise UsageError("give --model CONFIG_OR_NAME or --dtype (bf16, fp16, fp32, fp8, fp8-block, act=..,weight=..,out=..)")


def _plan(args):
    from . import planner, source
    for k in ("tp", "ep"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k} must be >= 1")
    d, why = _deployment(args)
    src = source.load_module_source(args.arch)
    p = planner.plan_module(src, d)
    p.notes.insert(0, f"deployment from {why}; tp {args.tp}, ep {args.ep}")
    return src, p


def cmd_plan(args) -> int:
    src, p = _plan(args)
    if args.json:
        print(json.dumps(p.to_json(), indent=1))
        return 0
    c = p.to_json()["counts"]
    print(f"FlashInfer {p.version} {p.module}: {c['needed']} of {c['total']} files for {p.deployment.label} "
          f"({c['generated_needed']} of {c['generated_total']} generated)")
    for n in p.notes:
        print(f"  note: {n}")
    print("needed:")
    for f in p.needed:
        print(f"  {f.name}  [{f.reason}]")
    print(f"left out ({len(p.left_out)}):")
    for f in p.left_out:
        print(f"  {f.name}  [{f.reason}]")
    return 0


def cmd_build(args) -> int:
    from ..fleet.config import store_from_env
    from . import build
    src, p = _plan(args)
    s = build.build(p, src, store_from_env(), jobs=args.jobs, out=args.out)  # progress: stderr
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "results"}))
    else:
        print(f"{s['module']} for {p.deployment.label}: {s['files']} files ({s['compiled']} compiled, "
              f"{s['cache_hits']} from the cache), {s['stubbed']} symbols stubbed, {s['wall_s']} s; "
              f"FlashInfer loads it from {s['path']}")
    return 0


def cmd_prebuild(args) -> int:
    from ..fleet.config import store_from_env
    from . import bundle
    src, p = _plan(args)
    r = bundle.prebuild(p, src, store_from_env(), args.output, key=args.key, jobs=args.jobs)
    print(json.dumps(r) if args.json else f"{r['bundle']}: {r['module']} for {p.deployment.label}, {r['files']} "
          f"files ({r['compiled']} compiled, {r['cache_hits']} from the cache), signed")
    return 0


def cmd_seed(args) -> int:
    from . import bundle
    r = bundle.seed(args.bundle, args.trust)
    print(f"installed {r['installed']} ({r['module']}); FlashInfer loads it with no compile")
    return 0


def cmd_cc(args) -> int:
    from . import cc
    return cc.main(args.command)


def add_cli(sub) -> None:
    p = sub.add_parser("flashinfer", help="FlashInfer's cutlass fused MoE: plan/build only what a deployment needs; "
                                          "a caching compiler launcher for FlashInfer's JIT")
    s = p.add_subparsers(dest="fi_cmd")
    for name, fn, hlp in (("plan", cmd_plan, "the files a deployment needs, and why every other one is left out"),
                          ("build", cmd_build, "compile them once, link with stubs, place the prebuilt module"),
                          ("prebuild", cmd_prebuild, "build the module and write it as a signed bundle")):
        q = s.add_parser(name, help=hlp)
        q.add_argument("--model", help="HF config.json (or its folder) or a known model name")
        q.add_argument("--dtype", help="bf16 | fp16 | fp32 | fp8 | fp8-block | act=A,weight=W,out=O[,quant=Q]")
        q.add_argument("--tp", type=int, default=1)
        q.add_argument("--ep", type=int, default=1)
        q.add_argument("--arch", default="sm_90a")
        q.add_argument("--json", action="store_true")
        if name != "plan":
            q.add_argument("--jobs", type=positive_int, default=None)
        if name == "build":
            q.add_argument("--out", help="write DIR/<module>/<module>.so instead of FlashInfer's data/aot")
        if name == "prebuild":
            q.add_argument("-o", "--output", required=True, help="the bundle to write")
            q.add_argument("--key", help="signing key (default $JITKILN_SIGNING_KEY)")
        q.set_defaults(fn=fn)
    q = s.add_parser("seed", help="install a signed module bundle where FlashInfer loads prebuilt modules")
    q.add_argument("bundle")
    q.add_argument("--trust", action="append", help="a trusted .pub (added to $JITKILN_TRUST_KEYS)")
    q.set_defaults(fn=cmd_seed)
    q = s.add_parser("cc", help="compiler launcher: FLASHINFER_NVCC_LAUNCHER='jitkiln flashinfer cc'")
    q.add_argument("command", nargs=argparse.REMAINDER)
    q.set_defaults(fn=cmd_cc)
    p.set_defaults(fn=lambda a: (p.print_help(file=sys.stderr), 2)[1])
