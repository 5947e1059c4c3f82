"""Cold start, measured in one job on one machine: stock full module vs pruned vs jitkiln (cold, warm, seeded,
8 ranks) vs the best a user has today (stock module with ccache).

    python bench/coldstart.py moe2stage --model kimi-k2 --tp 8 --tokens 1-8192 [--variant bf16] \
        [--scenarios a,b,c,d,e,f,g] [--gpu] [--tag h100] [--out-dir bench/results]

Scenarios (each from an empty cache / build directory unless it says warm):
  a stock     every candidate of the variant, one module, ninja -j cores, then dlopen
  b pruned    only the planned instances, same ninja build
  c jitkiln   a fresh process: plan + tiered load; time to the first correct call (tier 0 where the family has
              one, else the first problem's instances) and to every planned instance loaded (full speed)
  d warm      a fresh process, cache warm: plan + verify + load, ready
  e seeded    a fresh cache seeded from a bundle (or a copy of a warm cache), then as d
  f 8 ranks   eight processes start cold at once on one cache; total compiler CPU seconds vs one rank's
  g ccache    the stock module with ccache as compiler launcher: warm (every unit a direct-mode hit, then link
              and load) and 8 ranks cold at once (separate build dirs, one empty ccache: misses are not merged)

Writes bench/results/coldstart-<tag>.json and one timeline PNG per compiling scenario under
bench/results/coldstart-<tag>/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import stockbuild  # noqa: E402

CHILD = r"""
import json, sys, time
t_start = float(sys.argv[1])
sys.path.insert(0, sys.argv[4])
import argparse
from jitkiln.cliargs import add_plan_args, plan_from_args  # (not build_parser: no subcommand extensions)
from jitkiln.runtime import Module
from jitkiln.store import Store
from jitkiln.build import Builder
ap = argparse.ArgumentParser()
add_plan_args(ap)
args = ap.parse_args(json.loads(sys.argv[2]))
plan = plan_from_args(args, require_compiler=True)
gpu = sys.argv[3] == "1"
first_problem = plan.problems[0] if plan.problems else None
setup_s, inputs, extra = 0.0, None, {}
if gpu and first_problem is not None:  # the model's weights: a server has them before its first call
    import firstcall
    t0 = time.time()
    inputs = firstcall.prepare(plan.family.name, first_problem)
    setup_s = time.time() - t0
mod = Module(plan, Store(), policy="tiered", builder=Builder(Store(), progress=False))
mod.load_available()
t_loaded = time.time()
tier = None
if first_problem is not None:
    r = mod.resolve(first_problem)  # tiered: starts the background build of whatever is missing
    tier = r.tier
    if r.tier == 1 or r.fallback is not None:
        if inputs is not None:
            extra = firstcall.run(plan.family.name, mod, first_problem, inputs)
    else:  # no tier 0 in this family: the first call waits for its instances
        mod.dispatch(first_problem)
t_first = time.time()
if not mod.ready:
    mod.start_background()
mod.wait()
t_full = time.time()
print(json.dumps({"first_call_s": t_first - t_start - setup_s, "full_speed_s": t_full - t_start - setup_s,
                  "loaded_s": t_loaded - t_start - setup_s, "setup_s": setup_s, "first_tier": tier,
                  "ready": mod.ready, **extra,
                  "compiled": [n for r in mod.records for n in r.to_json()["compiled"]],
                  "compiler_cpu_s": sum(r.to_json()["compiler_cpu_s"] for r in mod.records),
                  "records": [str(r.path) for r in mod.records]}))
"""


def run_child(plan_argv: list[str], cache: str, gpu: bool, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, JITKILN_CACHE_DIR=cache, **(env_extra or {}))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode (see precompile())
    return subprocess.Popen([sys.executable, "-c", CHILD, repr(time.time()), json.dumps(plan_argv),
                             "1" if gpu else "0", str(HERE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def precompile() -> None:
    """Byte-compile jitkiln as ``pip install`` does, so no measured process pays for compiling Python."""
    import compileall
    import jitkiln
    compileall.compile_dir(os.path.dirname(jitkiln.__file__), quiet=1)


def finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def png(rec: dict, out: Path) -> str | None:
    try:
        from jitkiln.report import timeline_png
        return timeline_png(rec, str(out))
    except Exception as e:  # noqa: BLE001 - a picture is a nice-to-have, the numbers are the result
        print(f"(no timeline picture: {e})", file=sys.stderr)
        return None


def phases_record(title: str, variant: str, phases: list[tuple[str, float, float]]) -> dict:
    """Steps of a run that compiles nothing (warm, seeded) shaped like a build record, for the timeline picture."""
    units = [{"name": n, "status": "compiled", "start": a, "end": b, "seconds": b - a, "peak_rss": 0,
              "urgent": False} for n, a, b in phases]
    return {"family": title, "variant": variant, "units": units, "wall_s": max(b for _, _, b in phases),
            "jobs": 1, "critical_path_s": max(b - a for _, a, b in phases), "unused": [], "module_key": "-" * 16}


def child_phases(r: dict, offset: float = 0.0) -> list[tuple[str, float, float]]:
    """A child's steps: process start to every available instance loaded, to the first call, to full speed."""
    out = [("start, imports, plan, verify, load", offset, offset + r["loaded_s"])]
    if r["first_call_s"] > r["loaded_s"] + 1e-3:
        out.append(("first call", offset + r["loaded_s"], offset + r["first_call_s"]))
    if r["full_speed_s"] > r["first_call_s"] + 1e-3:
        out.append(("every planned instance loaded", offset + r["first_call_s"], offset + r["full_speed_s"]))
    return out


def ranks_record(variant: str, ranks: list[dict], jobs: int, store_of) -> dict | None:
    """The compiles of N ranks started together, one row per compile, named by the rank that ran it."""
    from jitkiln.report import load_record
    units = []
    for i, r in enumerate(ranks):
        for path in r["records"]:
            try:
                rec = load_record(path, store_of)
            except Exception:  # noqa: BLE001 - a picture is a nice-to-have
                continue
            for u in rec["units"]:
                if u.get("status") == "compiled":
                    units.append(dict(u, name=f"rank {i}: {u['name']}"))
    if not units:
        return None
    return {"family": f"{len(ranks)} ranks cold", "variant": variant, "units": units,
            "wall_s": max(u["end"] for u in units), "jobs": jobs,
            "critical_path_s": max(u["seconds"] for u in units), "unused": [], "module_key": "-" * 16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family")
    ap.add_argument("--variant")
    ap.add_argument("--stock-variant", help="scenarios a/b/g build this variant's stock module (e.g. bf16 against a "
                                            "bf16-dsl plan: the C++ module a user builds today)")
    ap.add_argument("--model")
    ap.add_argument("--tp", default="1")
    ap.add_argument("--ep", default="1")
    ap.add_argument("--tokens")
    ap.add_argument("--shape", action="append")
    ap.add_argument("--scenarios", default="a,b,c,d,e,f,g")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--g-ranks", type=int, default=None,
                    help="ranks of the ccache scenario (default --ranks; fewer keeps it short on few cores)")
    ap.add_argument("--g-ranks-scope", choices=("full", "pruned"), default="full",
                    help="module the 8-rank ccache scenario builds (pruned keeps it short on few cores)")
    ap.add_argument("--gpu", action="store_true", help="make the first call a real launch (needs a GPU)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--tag", default=f"{os.cpu_count()}cores")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    want = set(args.scenarios.split(","))
    precompile()

    from jitkiln.cli import build_parser
    from jitkiln.cliargs import plan_from_args
    plan_argv = [args.family] + [x for k in ("variant", "model", "tp", "ep", "tokens")
                                 if getattr(args, k) is not None for x in (f"--{k}", str(getattr(args, k)))]
    for s in args.shape or []:
        plan_argv += ["--shape", s]
    plan = plan_from_args(build_parser().parse_args(["plan", *plan_argv]), require_compiler=True)
    stock_plan = plan
    if args.stock_variant and args.stock_variant != plan.variant:
        sv = list(plan_argv)
        if "--variant" in sv:
            sv[sv.index("--variant") + 1] = args.stock_variant
        else:
            sv += ["--variant", args.stock_variant]
        stock_plan = plan_from_args(build_parser().parse_args(["plan", *sv]), require_compiler=True)
    full = list(stock_plan.family.candidates(stock_plan.variant))
    out_dir = Path(args.out_dir)
    pics = out_dir / f"coldstart-{args.tag}"
    pics.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": "python bench/coldstart.py " + " ".join(sys.argv[1:]), "cores": os.cpu_count(),
                 "jobs": args.jobs, "host": os.uname().nodename, "family": plan.family.name, "variant": plan.variant,
                 "stock_variant": stock_plan.variant,
                 "candidates": len(full), "planned": len(plan.units), "scenarios": {}}
    try:
        import torch  # noqa: F401
        res["gpu"] = torch.cuda.get_device_name() if args.gpu and torch.cuda.is_available() else None
    except ImportError:
        res["gpu"] = None
    sc = res["scenarios"]
    scope = None
    work = Path(tempfile.mkdtemp(prefix="jk-coldstart-"))
    unused = [{"name": i.name, "reason": r} for i, r in plan.unused]

    def stock(tag, instances, launcher=None, env=None, build_dir=None):
        d = build_dir or work / tag
        shutil.rmtree(d, ignore_errors=True)
        stockbuild.write_ninja(d, stock_plan, instances, launcher)
        r = stockbuild.ninja_build(d, args.jobs, env)
        print(f"[{tag}] {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU s, {len(instances)} units", flush=True)
        return r

    if "a" in want:
        r = stock("a_stock", full)
        sc["a_stock"] = {k: r[k] for k in ("wall_s", "cpu_s")} | {"units": len(full)}
        png(stockbuild.as_record("stock full module", stock_plan.variant, r["ninja_log"], r["wall_s"], args.jobs),
            pics / "a_stock.png")
    if "b" in want:
        r = stock("b_pruned", stock_plan.instances)
        sc["b_pruned"] = {k: r[k] for k in ("wall_s", "cpu_s")} | {"units": len(stock_plan.units)}
        png(stockbuild.as_record("stock pruned module", stock_plan.variant, r["ninja_log"], r["wall_s"], args.jobs,
                                 unused), pics / "b_pruned.png")
    cache_c = str(work / "cache_c")
    if want & {"c", "d", "e"}:
        r = finish(run_child(plan_argv, cache_c, args.gpu))
        sc["c_jitkiln_cold"] = r
        print(f"[c_jitkiln_cold] first call {r['first_call_s']:.2f} s (tier {r['first_tier']}), "
              f"full speed {r['full_speed_s']:.1f} s, {r['compiler_cpu_s']:.1f} CPU s", flush=True)
        if r["records"]:
            from jitkiln.report import load_record
            from jitkiln.store import Store
            png(load_record(r["records"][0], Store(cache_c)), pics / "c_jitkiln_cold.png")
    if "d" in want:
        runs = [finish(run_child(plan_argv, cache_c, False)) for _ in range(3)]
        best = sorted(runs, key=lambda r: r["full_speed_s"])[1]  # the median of three
        sc["d_warm"] = best | {"runs": [r["full_speed_s"] for r in runs]}
        png(phases_record("warm start (median run)", plan.variant, child_phases(best)), pics / "d_warm.png")
        print(f"[d_warm] ready in {best['full_speed_s']:.3f} s (median of 3), compiled {best['compiled']}", flush=True)
    if "e" in want:
        seeded = str(work / "cache_e")
        t0 = time.time()
        how = "copied cache"
        bundle = work / "plan.bundle"
        key = work / "bench.key"
        try:
            subprocess.run([sys.executable, "-m", "jitkiln.cli", "keygen", "-o", str(key)], check=True,
                           capture_output=True)
            subprocess.run([sys.executable, "-m", "jitkiln.cli", "prebuild", *plan_argv, "-o", str(bundle),
                            "--key", str(key)],
                           env=dict(os.environ, JITKILN_CACHE_DIR=cache_c), check=True, capture_output=True)
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "jitkiln.cli", "seed", str(bundle), "--trust", f"{key}.pub",
                            "--arch", plan.spec.arch],
                           env=dict(os.environ, JITKILN_CACHE_DIR=seeded), check=True, capture_output=True)
            how = "signed bundle"
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            print(f"(bundle seeding unavailable: {e}; seeding by copying the cache)", file=sys.stderr)
            t0 = time.time()
            shutil.copytree(cache_c, seeded, dirs_exist_ok=True)
        seed_s = time.time() - t0
        r = finish(run_child(plan_argv, seeded, False))
        sc["e_seeded"] = r | {"seed_s": round(seed_s, 3), "how": how,
                              "total_s": round(seed_s + r["full_speed_s"], 3)}
        png(phases_record(f"seeded ({how})", plan.variant, [(f"seed the cache ({how})", 0.0, seed_s)]
                          + child_phases(r, seed_s)), pics / "e_seeded.png")
        print(f"[e_seeded] {how}: seed {seed_s:.2f} s + ready {r['full_speed_s']:.2f} s, compiled {r['compiled']}",
              flush=True)
    if "f" in want:
        cache_f = str(work / "cache_f")
        t0 = time.time()
        procs = [run_child(plan_argv, cache_f, False) for _ in range(args.ranks)]
        ranks = [finish(p) for p in procs]
        one = sc.get("c_jitkiln_cold", {}).get("compiler_cpu_s")
        total = sum(r["compiler_cpu_s"] for r in ranks)
        compiled = [n for r in ranks for n in r["compiled"]]
        sc["f_ranks_cold"] = {"ranks": args.ranks, "wall_s": round(time.time() - t0, 3), "compiler_cpu_s": total,
                              "one_rank_cpu_s": one, "cpu_over_one_rank": round(total / one, 3) if one else None,
                              "compiled_total": len(compiled), "compiled_unique": len(set(compiled)),
                              "full_speed_s_max": max(r["full_speed_s"] for r in ranks)}
        from jitkiln.store import Store
        rr = ranks_record(plan.variant, ranks, args.jobs, Store(cache_f))
        if rr:
            png(rr, pics / "f_ranks_cold.png")
        print(f"[f_ranks_cold] {args.ranks} ranks: {total:.1f} CPU s (one rank {one}), "
              f"{len(compiled)} compiles of {len(set(compiled))} units", flush=True)
    if "g" in want and shutil.which("ccache"):
        ccdir = work / "ccache"
        env = dict(os.environ, CCACHE_DIR=str(ccdir), CCACHE_MAXSIZE="20G", CCACHE_COMPILERCHECK="content",
                   CCACHE_BASEDIR=str(work), CCACHE_NOHASHDIR="1")  # relative paths: build dirs share hits
        cold = stock("g_ccache_cold", full, "ccache", env)
        warm = stock("g_ccache_warm", full, "ccache", env)  # a new build dir: every unit a direct-mode hit
        stats = subprocess.run(["ccache", "-s"], env=env, capture_output=True, text=True).stdout
        for tag, r in (("g_ccache_cold", cold), ("g_ccache_warm", warm)):
            png(stockbuild.as_record(tag.replace("_", " "), plan.variant, r["ninja_log"], r["wall_s"], args.jobs),
                pics / f"{tag}.png")
        g = {"cold_wall_s": cold["wall_s"], "warm_wall_s": warm["wall_s"], "warm_cpu_s": warm["cpu_s"],
             "ccache_stats": stats.strip().splitlines()[:8]}
        print(f"[g_ccache] cold {cold['wall_s']:.1f} s, warm {warm['wall_s']:.2f} s", flush=True)
        scope = full if args.g_ranks_scope == "full" else stock_plan.instances
        if args.g_ranks == 0:  # cold and warm only
            sc["g_ccache"] = g
            scope = None
    if "g" in want and shutil.which("ccache") and scope is not None:
        shutil.rmtree(ccdir, ignore_errors=True)
        t0 = time.time()
        cpu0 = stockbuild._children_cpu()
        ps = []
        # each rank's ninja gets cores / ranks jobs: 8 x MAX_JOBS=cores concurrent CUTLASS compiles (3.3 GB each)
        # would exhaust the machine's memory; all of them together still use every core
        g_ranks = args.g_ranks or args.ranks  # (0 was handled above)
        rank_jobs = max(1, args.jobs // g_ranks)
        for i in range(g_ranks):
            d = work / f"g_rank{i}"
            shutil.rmtree(d, ignore_errors=True)
            stockbuild.write_ninja(d, plan, scope, "ccache")
            ps.append(subprocess.Popen(["ninja", "-j", str(rank_jobs), "-C", str(d)], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in ps:
            p.wait()
        g["ranks_cold"] = {"ranks": g_ranks, "jobs_per_rank": rank_jobs, "scope": args.g_ranks_scope,
                           "units": len(scope),
                           "wall_s": round(time.time() - t0, 3),
                           "cpu_s": round(stockbuild._children_cpu() - cpu0, 3)}
        one = (sc.get("b_pruned") if args.g_ranks_scope == "pruned" else sc.get("a_stock") or {"cpu_s": cold["cpu_s"]})
        if one and one.get("cpu_s"):
            g["ranks_cold"]["cpu_over_one_rank"] = round(g["ranks_cold"]["cpu_s"] / one["cpu_s"], 3)
        sc["g_ccache"] = g
        print(f"[g_ccache] cold {cold['wall_s']:.1f} s, warm {warm['wall_s']:.2f} s; {g_ranks} ranks cold "
              f"({args.g_ranks_scope}) {g['ranks_cold']['wall_s']:.1f} s wall, {g['ranks_cold']['cpu_s']:.1f} CPU s",
              flush=True)

    # ratios against (a) and (g)
    stock_s = sc.get("a_stock", {}).get("wall_s")
    c = sc.get("c_jitkiln_cold", {})
    res["stock_s"] = stock_s
    res["first_call_s"] = c.get("first_call_s")
    res["full_speed_s"] = c.get("full_speed_s")
    if stock_s and c:
        res["first_call_over_stock"] = round(c["first_call_s"] / stock_s, 4)
        res["full_speed_over_stock"] = round(c["full_speed_s"] / stock_s, 4)
    if "b_pruned" in sc and stock_s:
        res["pruned_over_stock"] = round(sc["b_pruned"]["wall_s"] / stock_s, 4)
    if "d_warm" in sc:
        res["warm_s"] = sc["d_warm"]["full_speed_s"]
        if "g_ccache" in sc:
            res["warm_over_ccache_warm"] = round(res["warm_s"] / sc["g_ccache"]["warm_wall_s"], 4)
    if "e_seeded" in sc:
        res["seeded_s"] = sc["e_seeded"]["total_s"]
    if "f_ranks_cold" in sc:
        res["ranks_cpu_over_one"] = sc["f_ranks_cold"]["cpu_over_one_rank"]
    out = out_dir / f"coldstart-{args.tag}.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in res.items() if k != "scenarios"}, indent=1))
    print(f"wrote {out} and {pics}/")
    return 0


if __name__ == "__main__":
    from jitkiln.errors import JitkilnError
    try:
        sys.exit(main())
    except JitkilnError as e:
        print(f"coldstart: error: {e}" + (f"\nhint: {e.hint}" if getattr(e, "hint", None) else ""), file=sys.stderr)
        sys.exit(2)
