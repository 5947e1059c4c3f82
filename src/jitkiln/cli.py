"""Command line: ``jitkiln plan|build|report|cache|doctor|toolchain``, and the subcommands other modules add
through the ``jitkiln.commands`` entry-point group (``add_cli(subparsers)``): the fleet's ``prebuild``, ``seed``,
``keygen``; a family's or a front end's own commands."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

from . import compilers
from .build import Builder
from .cliargs import (ArgumentParser, add_plan_args, executor_from_args, plan_from_args, positive_int,
                      store_from_args)
from .compilers.base import kill_compilers
from .cutlass import cutlass_include_dirs
from .errors import JitkilnError, StoreError, UsageError
from .family import family_names
from .plan import format_table
from .plugins import entry_points
from .report import check_timeline_path, format_text, load_record, summarize, timeline
from .sizes import parse_age, parse_size
from .store import Store, default_root


def cmd_plan(args) -> int:
    plan = plan_from_args(args)
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_table(plan))
    return 0


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder", hint="give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {path}: {e.strerror or e}") from None
    return out


def cmd_build(args) -> int:
    plan = plan_from_args(args, require_compiler=True)
    plan.require_compiler()  # what a build needs beyond planning (e.g. headers): said first
    out = _out_dir(args.out) if args.out else None
    store = store_from_args(args)
    store.check_root()  # an unusable cache is the first thing to say, before any output
    executor = executor_from_args(args)
    if not args.json:
        print(format_table(plan), file=sys.stderr)
    builder = Builder(store, jobs=args.jobs, progress=not args.no_progress, executor=executor)
    rec = builder.build(plan)
    if rec.path is None:  # every unit was a hit: no compile, no record written
        d = rec.to_json()
        print(f"all {len(d['cache_hits'])} planned units are in the cache {store.base}; nothing to compile",
              file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps({k: d[k] for k in ("family", "variant", "module_key", "compiled", "cache_hits",
                                                "failed", "wall_s", "critical_path_s", "compiler_cpu_s", "jobs")}
                             | {"record": None}))
        return 0
    if out:
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
    if args.timeline:
        check_timeline_path(args.timeline)  # before any work: a path that cannot be written is the reason
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


def cmd_cache(args) -> int:
    store = store_from_args(args)
    if args.action == "path":
        store.check_path()  # a file is no cache path (nothing is created here)
        print(store.base)
    elif args.action == "ls":
        rows = store.ls()
        bad = [r for r in rows if r.get("bad")]
        if bad:  # the reason first: a listing of a damaged cache must not read as a healthy one
            raise StoreError(f"{len(bad)} cache entries have malformed metadata (first: {bad[0]['key'][:16]}: "
                             f"{bad[0]['bad']})", hint="run `jitkiln cache verify` to move them aside")
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
        removed = store.gc(parse_size(args.max_size) if args.max_size is not None else None,
                           parse_age(args.max_age) if args.max_age is not None else None)
        print(f"removed {len(removed)} entries; {store.size() / 2**20:.1f} MB left in {store.base}")
    return 0


def _gpu() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        return subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def cmd_doctor(args) -> int:
    report: dict = {"compilers": {}}
    advice: list[str] = []
    for name in compilers.names():
        if name == "fake":
            continue
        try:
            report["compilers"][name] = compilers.get_compiler(name).describe()
        except (JitkilnError, ImportError) as e:
            report["compilers"][name] = None
            if isinstance(e, JitkilnError):
                advice.append(f"{name}: {e.reason}; {e.hint}")
    try:
        report["cutlass"] = cutlass_include_dirs()[0]
    except JitkilnError as e:
        report["cutlass"] = None
        advice.append(f"CUTLASS: {e.reason}; {e.hint}")
    gpu = report["gpu"] = _gpu()
    if not gpu:
        advice.append("GPU: none found; planning, building and caching work without one, launching kernels needs one")
    root = Path(args.cache_dir) if args.cache_dir else default_root()
    report["cache"] = {"path": str(root), "exists": root.exists(), "writable": os.access(
        root if root.exists() else root.parent, os.W_OK)}
    if root.is_dir():
        st = Store(root)
        report["cache"].update(entries=sum(1 for _ in st.entries()), size_mb=round(st.size() / 2**20, 2))
    report["families"] = family_names()
    for mod in ("redis", "cryptography", "ray", "matplotlib", "torch"):
        try:
            importlib.import_module(mod)
            report[mod] = True
        except ImportError:
            report[mod] = False
    report["advice"] = advice
    report.update(report["compilers"])  # also by name at the top level ("nvcc", "hip")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for name, c in report["compilers"].items():
        print(f"{name + ':':10} {c['path'] + ' (' + c['version'] + ', ' + c['fingerprint'] + ')' if c else 'NOT FOUND'}")
    print(f"CUTLASS:   {report['cutlass'] or 'not found (pip install nvidia-cutlass)'}")
    print(f"GPU:       {gpu or 'none'}")
    c = report["cache"]
    print(f"cache:     {c['path']} ({c.get('entries', 0)} entries, {c.get('size_mb', 0.0)} MB"
          f"{'' if c['writable'] else ', NOT WRITABLE'})")
    print(f"families:  {', '.join(report['families'])}")
    print("optional:  " + ", ".join(f"{m} {'yes' if report[m] else 'no'}"
                                    for m in ("torch", "redis", "cryptography", "ray", "matplotlib")))
    for a in advice:
        print(f"advice:    {a}")
    return 0


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="jitkiln", description="Plan exactly the GPU kernel instances your shapes "
                        "need, build each once, cache and load them.")
    ap.add_argument("--version", action="version", version=f"jitkiln {__import__('jitkiln').__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("plan", help="list the instances dispatch will pick for the shapes, and why others are unused")
    add_plan_args(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("build", help="build the planned instances the cache lacks (each once, in parallel)")
    add_plan_args(p)
    p.add_argument("--jobs", "-j", type=positive_int, help="parallel compiles (default: cores, bounded by free memory)")
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
    p.add_argument("--top", type=positive_int, default=5, help="how many slowest units")
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

    p = sub.add_parser("doctor", help="which compilers, CUTLASS and GPU were found; cache location and size")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir")
    p.set_defaults(fn=cmd_doctor)

    for name, target in sorted(entry_points("jitkiln.commands").items()):
        mod = target.partition(":")[0]
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            # a broken optional extension must not take the core commands down with it
            print(f"jitkiln: warning: the {name} subcommands ({mod}) are unavailable: {e}", file=sys.stderr)
            continue
        getattr(m, target.partition(":")[2] or "add_cli")(sub)
    return ap


def _terminated(signum, frame):  # noqa: ARG001
    kill_compilers()  # they run in their own sessions: a signal to the build does not reach them
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
        if not getattr(args, "fn", None):
            ap.print_help()
            return 2
        return int(args.fn(args) or 0)
    except JitkilnError as e:
        print(f"jitkiln: error: {e.full()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        kill_compilers()
        print("jitkiln: interrupted; the cache holds only complete entries", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
