"""Command line: ``jitkiln plan|build|report|cache|doctor`` (and the subcommands families and the fleet add)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

from .errors import JitkilnError, UsageError
from .tokens import parse_tokens

# Modules that may add subcommands through ``add_cli(subparsers)`` (absent ones are skipped).
EXTENSIONS = ("jitkiln.families.ck2stages", "jitkiln.bundle")


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


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("family", help="kernel family (see `jitkiln doctor` for the list)")
    p.add_argument("--variant", help="variant (dtype tag); the family's first by default")
    p.add_argument("--model", help="a model config.json path, or a built-in model name (e.g. kimi-k2)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (default 1)")
    p.add_argument("--tokens", help="token counts: a range (1-8192: the sizes a server captures) or a list")
    p.add_argument("--shape", action="append", metavar="K=V,...", help="a problem shape (repeatable)")
    p.add_argument("--arch", help="target arch (sm_90a, gfx950...)")
    p.add_argument("--full", action="store_true", help="plan every candidate (the full module)")
    p.add_argument("--aiter-root", help="ck2stages: the AITER tree to plan from (default: $JITKILN_AITER_ROOT, "
                                        "else the installed amd-aiter)")
    p.add_argument("--json", action="store_true", help="print JSON")


def plan_from_args(args, require_toolchain: bool = False):
    from .family import get_family
    from .plan import make_plan
    fam = get_family(args.family)
    opts = {"aiter_root": args.aiter_root} if getattr(args, "aiter_root", None) else {}
    fam.configure(arch=args.arch, **opts)
    variant = fam.check_variant(args.variant)
    if args.tp < 1 or args.ep < 1:
        raise UsageError("--tp and --ep must be positive integers")
    problems = fam.problems(variant, shapes=parse_shapes(args.shape), model=args.model, tp=args.tp, ep=args.ep,
                            tokens=parse_tokens(args.tokens) if args.tokens else None)
    return make_plan(fam, variant, problems, arch=args.arch, full=args.full, require_toolchain=require_toolchain)


def store_from_args(args):
    from .store import Store
    if getattr(args, "cache_dir", None):
        return Store(args.cache_dir)
    try:
        from .remote import store_from_env  # fleet tiers from the environment, when configured
    except ImportError:
        return Store()
    return store_from_env()


def cmd_plan(args) -> int:
    from .plan import format_table
    plan = plan_from_args(args)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_table(plan))
    return 0


def cmd_build(args) -> int:
    from .build import Builder
    from .plan import format_table
    from .report import format_text, load_record
    plan = plan_from_args(args, require_toolchain=True)
    store = store_from_args(args)
    store.ensure()  # an unusable cache is the first thing to say, before any output
    executor = None
    if args.executor == "ray":
        from .ray_executor import RayCompile
        executor = RayCompile(address=args.ray_address)
    if not args.json:
        print(format_table(plan), file=sys.stderr)
    builder = Builder(store, jobs=args.jobs, progress=not args.no_progress, executor=executor)
    rec = builder.build(plan)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.ninja_log, out / ".ninja_log")
        shutil.copy(rec.path, out / "build.json")
    if args.report or not args.json:
        print(format_text(load_record(str(rec.path), store)), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        d = rec.to_json()
        summary = {k: d[k] for k in ("family", "variant", "module_key", "compiled", "cache_hits", "failed",
                                     "wall_s", "critical_path_s", "compiler_cpu_s", "jobs")}
        summary["record"] = str(rec.path)
        print(json.dumps(summary))
    return 0


def cmd_report(args) -> int:
    from .report import format_text, load_record, summarize, timeline
    store = store_from_args(args)
    rec = load_record(args.record, store)
    if args.timeline:
        timeline(rec, args.timeline)
    if args.json:
        print(json.dumps(summarize(rec, args.top), indent=1))
    else:
        print(format_text(rec, args.top))
        if args.timeline:
            print(f"timeline: {args.timeline}")
    return 0


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", s.strip().lower())
    if not m:
        raise UsageError(f"bad size {s!r}: give e.g. 500M or 20G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_age(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", s.strip().lower())
    if not m:
        raise UsageError(f"bad age {s!r}: give e.g. 30d, 12h or 3600s")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def cmd_cache(args) -> int:
    store = store_from_args(args)
    if args.action == "path":
        print(store.base)
    elif args.action == "ls":
        rows = store.ls()
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(f"{r['key'][:16]}  {(r['size'] or 0) / 2**20:8.2f} MB  {r['compile_s'] or 0:7.2f} s  "
                      f"{r['arch'] or '-':8}  {r['name']}")
            print(f"{len(rows)} entries, {store.size() / 2**20:.1f} MB in {store.base}")
    elif args.action == "verify":
        ok, bad = store.verify_all()
        for b in bad:
            print(f"BAD  {b}")
        print(f"{ok} entries verified, {len(bad)} bad (moved aside)")
        return 1 if bad else 0
    elif args.action == "gc":
        if args.max_size is None and args.max_age is None:
            raise UsageError("cache gc needs --max-size SIZE and/or --max-age AGE (e.g. --max-size 20G --max-age 30d)")
        removed = store.gc(parse_size(args.max_size) if args.max_size else None,
                           parse_age(args.max_age) if args.max_age else None)
        print(f"removed {len(removed)} entries; {store.size() / 2**20:.1f} MB left in {store.base}")
    return 0


def cmd_doctor(args) -> int:
    from .family import family_names
    from .store import Store, default_root
    report: dict = {}
    advice: list[str] = []
    try:
        from .toolchain import Nvcc
        tc = Nvcc.find()
        report["nvcc"] = tc.describe()
    except JitkilnError as e:
        report["nvcc"] = None
        advice.append(f"nvcc: {e.reason}; {e.hint}")
    try:
        from .cutlass import cutlass_include_dirs
        report["cutlass"] = cutlass_include_dirs()[0]
    except ImportError:
        report["cutlass"] = None
    except JitkilnError as e:
        report["cutlass"] = None
        advice.append(f"CUTLASS: {e.reason}; {e.hint}")
    try:
        from .toolchain import get_toolchain
        report["hip"] = get_toolchain("hip").describe()
    except (JitkilnError, ImportError) as e:
        report["hip"] = None
        if isinstance(e, JitkilnError):
            advice.append(f"ROCm (only for AMD builds): {e.reason}")
    gpu = None
    smi = shutil.which("nvidia-smi")
    if smi:
        import subprocess
        try:
            gpu = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            gpu = None
    report["gpu"] = gpu
    if not gpu:
        advice.append("GPU: none found; planning, building and caching work without one, launching kernels needs one")
    root = Path(args.cache_dir) if args.cache_dir else default_root()
    st = Store(root)
    report["cache"] = {"path": str(root), "exists": root.exists(),
                       "entries": sum(1 for _ in st.entries()) if root.exists() else 0,
                       "size_mb": round(st.size() / 2**20, 2) if root.exists() else 0.0,
                       "writable": os.access(root if root.exists() else root.parent, os.W_OK)}
    report["families"] = family_names()
    for mod, pkg in (("redis", "redis"), ("cryptography", "cryptography"), ("ray", "ray"),
                     ("matplotlib", "matplotlib"), ("torch", "torch")):
        try:
            importlib.import_module(mod)
            report[mod] = True
        except ImportError:
            report[mod] = False
    report["advice"] = advice
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        nv = report["nvcc"]
        print(f"nvcc:      {nv['path'] + ' (' + nv['version'] + ', ' + nv['fingerprint'] + ')' if nv else 'NOT FOUND'}")
        print(f"CUTLASS:   {report['cutlass'] or 'not found (pip install nvidia-cutlass)'}")
        print(f"ROCm/HIP:  {report['hip']['path'] if report['hip'] else 'not found'}")
        print(f"GPU:       {gpu or 'none'}")
        c = report["cache"]
        print(f"cache:     {c['path']} ({c['entries']} entries, {c['size_mb']} MB"
              f"{'' if c['writable'] else ', NOT WRITABLE'})")
        print(f"families:  {', '.join(report['families'])}")
        print("optional:  " + ", ".join(f"{m} {'yes' if report[m] else 'no'}"
                                        for m in ("torch", "redis", "cryptography", "ray", "matplotlib")))
        for a in advice:
            print(f"advice:    {a}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jitkiln", description="Plan exactly the GPU kernel instances your shapes "
                                 "need, build each once, cache and load them.")
    ap.add_argument("--version", action="version", version=f"jitkiln {__import__('jitkiln').__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("plan", help="list the instances dispatch will pick for the shapes, and why others are unused")
    add_plan_args(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("build", help="build the planned instances the cache lacks (each once, in parallel)")
    add_plan_args(p)
    p.add_argument("--jobs", "-j", type=int, help="parallel compiles (default: cores, bounded by free memory)")
    p.add_argument("--cache-dir", help="cache root (default $JITKILN_CACHE_DIR or ~/.cache/jitkiln)")
    p.add_argument("--out", help="also write .ninja_log and build.json into this directory")
    p.add_argument("--report", action="store_true", help="print the build report")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where units compile")
    p.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS)")
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser("report", help="where the build time went: critical path, slowest units, hits, unused")
    p.add_argument("record", nargs="?", default="last", help="a build record (default: the last build)")
    p.add_argument("--timeline", metavar="OUT", help="write the build timeline (.png, or .html)")
    p.add_argument("--top", type=int, default=5, help="how many slowest units")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("cache", help="the compiled-instance cache: ls, verify, gc, path")
    p.add_argument("action", choices=("ls", "verify", "gc", "path"))
    p.add_argument("--max-size", help="gc: keep the cache under this size (e.g. 20G)")
    p.add_argument("--max-age", help="gc: drop entries unused for this long (e.g. 30d)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir")
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("doctor", help="which compiler, CUTLASS, ROCm and GPU were found; cache location and size")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir")
    p.set_defaults(fn=cmd_doctor)

    for mod in EXTENSIONS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            # a broken optional extension must not take the core commands down with it
            print(f"jitkiln: warning: the subcommands of {mod} are unavailable: {e}", file=sys.stderr)
            continue
        if hasattr(m, "add_cli"):
            m.add_cli(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except JitkilnError as e:
        print(f"jitkiln: error: {e.full()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("jitkiln: interrupted; the cache holds only complete entries", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
