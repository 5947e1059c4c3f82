#!/usr/bin/env python3
"""Compile cost of one heavy CUTLASS instance: stock nvcc vs jitkiln's way, same SASS.

    python bench/instance_cost.py [--instance NAME] [--tag TAG] [--floor] [--sequential] [--pack [NAME ...]]
                                  [--plan] [--plan-only | --pack-only] [--out DIR]

* ``stock``: the instance's unit compiled as upstream ninja does: one full ``nvcc -c`` to an object with host
  code (``-Xcompiler -fPIC``, the family's flags), ``--time`` phases.
* ``ours``: the same unit, jitkiln's way, to a loadable ``.so``: :func:`jitkiln.build.compile_unit` with the
  nvcc pipeline (host front end beside the device chain; the Builder picks it when a core is spare).
* ``--floor``: also ``nvcc -cubin`` (device only: what any host/device split is bounded by).
* ``--pack [NAME ...]`` / ``--pack-only``: the instance and others (default one stage-2 config) in one packed unit
  against each separately; SASS of every member compared (``--subset``, the packer's namespace renamed).
* ``--dsl`` / ``--dsl-only``: the CuTe DSL back end (variant ``bf16-dsl``, compiler ``cutedsl``) of the same
  tile: a cold process (``python -c`` importing jitkiln, compiling the unit, exiting), then in this process a
  fresh worker (started by the compile) and a warm worker (the next unit, same tile); against the C++ stock
  compile (run here, or ``--cxx-stock-from FILE``: a previous result's ``stock``); ``--dsl-plan``: the Kimi-K2
  tp8 plan of ``bf16-dsl`` built cold (an empty cache, no worker).
* ``--plan`` / ``--plan-only``: the full Kimi-like plan (``moe2stage --model kimi-k2 --tp 8 --tokens 1-8192``): stock = every
  unit by ``nvcc -c``, all in parallel (ninja with MAX_JOBS = cores); ours = ``Builder.build`` into an empty
  cache. Critical path = the longest unit; wall = the whole build.

The runs are sequential, in this one process, on this machine: ``ratio`` = ours_s / stock_s compares two runs
of the same job. ``sass_identical`` is :mod:`scripts/sass_diff.py` on the stock object and our ``.so``
(every kernel, instruction text and encoding). Writes ``bench/results/instance-cost-<tag>.json``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sass_diff  # noqa: E402

from jitkiln import families  # noqa: E402,F401
from jitkiln.build import Builder, compile_unit, default_jobs
from jitkiln.headers import HeaderLabels  # noqa: E402
from jitkiln.family import get_family  # noqa: E402
from jitkiln.plan import make_plan  # noqa: E402
from jitkiln.store import Store  # noqa: E402
from jitkiln.compilers.base import run_measured
from jitkiln.compilers.nvcc import Nvcc, parse_nvcc_time  # noqa: E402

DEFAULT = "moe2stage_s1_bf16_128x256x64_cooperative_c2x1"


def stock_cmd(tc: Nvcc, spec, src: str, out: str, time_path: str, mode: str = "-c") -> list[str]:
    cmd = [tc.path, *tc.gencode(spec.arch), "-std=c++17", "-O3"]
    if mode == "-c":
        cmd += ["-Xcompiler", "-fPIC"]
    cmd += ["--time", time_path]
    for d in spec.include_dirs:
        cmd += ["-I", d]
    return cmd + list(spec.flags) + [mode, src, "-o", out]


def run_stock(tc, spec, name: str, source: str, work: Path, mode: str = "-c") -> dict:
    d = work / f"{mode.strip('-')}-{name}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    src = d / f"{name}.cu"
    src.write_text(source)
    out = d / (f"{name}.o" if mode == "-c" else f"{name}.cubin")
    rc, log, wall, peak, cpu = run_measured(stock_cmd(tc, spec, str(src), str(out), str(d / "t.csv"), mode),
                                            cwd=str(d))
    if rc != 0:
        raise SystemExit(f"stock compile failed ({rc}):\n{log[-3000:]}")
    return {"s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_gib": round(peak / 2**30, 2),
            "phases": parse_nvcc_time(str(d / "t.csv")), "artifact": str(out)}


def run_ours(tc, spec, name: str, source: str, work: Path, pipeline: bool = True) -> dict:
    labels = HeaderLabels(spec, tc)
    ukey = f"instcost-{os.getpid()}"  # one working directory for both runs: comparable bytes
    r, data, _ = compile_unit(spec, tc, labels, name, source, ukey, spare_cores=int(pipeline))
    out = work / f"ours-{int(pipeline)}-{name}.so"
    out.write_bytes(data)
    return {"s": round(r.seconds, 2), "cpu_s": round(r.cpu_s, 2), "peak_rss_gib": round(r.peak_rss / 2**30, 2),
            "phases": r.phases, "pipelined": "(pipelined)" in r.command, "artifact": str(out)}


def pack_cost_run(tc, fam, spec, inst, work: Path, others: list[str], seq: dict | None) -> dict:
    from jitkiln.pack import make_pack
    from jitkiln.plan import Unit
    names = others or ["moe2stage_s2_bf16_128x128x64_pingpong_c1x1"]
    cands = {i.name: i for i in fam.candidates("bf16")}
    members = [inst] + [cands[n] for n in names]
    units = [Unit(i, fam.render(i), f"instcost-pack-{i.digest[:12]}") for i in members]
    labels = HeaderLabels(spec, tc)
    separate = {}
    for u in units:
        if u.instance.name == inst.name and seq:
            separate[u.instance.name] = seq
            continue
        print(f"pack: {u.instance.name} alone ...", flush=True)
        r, data, _ = compile_unit(spec, tc, labels, u.instance.name, u.source, u.ukey)
        path = work / f"alone-{u.instance.name}.so"
        path.write_bytes(data)
        separate[u.instance.name] = {"s": round(r.seconds, 2), "peak_rss_gib": round(r.peak_rss / 2**30, 2),
                                     "artifact": str(path)}
    pk = make_pack(get_family("moe2stage").packer, units, [(1.0, 1)] * len(units))
    print(f"pack: {pk.name} ({len(units)} members) ...", flush=True)
    r, data, _ = compile_unit(spec, tc, labels, pk.name, pk.source, pk.ukey)
    ppath = work / f"{pk.name}.so"
    ppath.write_bytes(data)
    sass_diff.add_rename(r"\d+jk[0-9a-f]{12}=2jk")  # the packer renames each member's namespace jk
    same = {n: sass_diff.sass_identical(d["artifact"], str(ppath), subset=True)["identical"]
            for n, d in separate.items()}
    sass_diff._RENAMES.clear()
    tot = sum(d["s"] for d in separate.values())
    mx = max(d["s"] for d in separate.values())
    return {"members": [u.instance.name for u in units], "pack_s": round(r.seconds, 2),
            "pack_peak_rss_gib": round(r.peak_rss / 2**30, 2), "separate_s": {n: d["s"] for n, d in separate.items()},
            "separate_sum_s": round(tot, 2), "pack_vs_separate_sum": round(r.seconds / tot, 3),
            "shared_fraction": round((tot - r.seconds) / (tot - mx), 3) if tot > mx else None,
            "sass_identical_per_member": same, "sass_identical": all(same.values())}


def plan_cost(tc, work: Path, jobs: int, family: str = "moe2stage") -> dict:
    fam = get_family(family)
    if family == "moe2stage":
        from jitkiln.tokens import parse_tokens
        problems = fam.problems("bf16", model="kimi-k2", tp=8, tokens=parse_tokens("1-8192"))
        plan = make_plan(fam, "bf16", problems)
    else:  # a quick check of this code path with the demo family
        plan = make_plan(fam, "f32", fam.default_problems("f32"))
    spec = plan.spec
    # stock: every unit by nvcc -c, all at once (ninja, MAX_JOBS = cores)
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(jobs) as ex:
        futs = [ex.submit(run_stock, tc, spec, u.instance.name, u.source, work / "plan-stock") for u in plan.units]
        stock = [f.result()["s"] for f in futs]
    stock_wall = time.monotonic() - t0
    store = Store(tempfile.mkdtemp(prefix="instcost-cache-", dir=work))
    rec = Builder(store, jobs=jobs, progress=False).build(plan)
    ours = [u.seconds for u in rec.units]
    return {"family": family, "units": [u.instance.name for u in plan.units], "jobs": jobs,
            "stock_unit_s": stock, "stock_critical_path_s": max(stock), "stock_wall_s": round(stock_wall, 2),
            "ours_unit_s": ours, "ours_critical_path_s": rec.critical_path_s, "ours_wall_s": round(rec.wall_s, 2),
            "ours_modes": [u.mode for u in rec.units], "ours_packing": rec.packing,
            "critical_path_ratio": round(rec.critical_path_s / max(stock), 3),
            "wall_ratio": round(rec.wall_s / stock_wall, 3)}


def dsl_cost(inst_name: str, work: Path, stock: dict | None, plan: bool) -> dict:
    """The CuTe DSL instance of ``inst_name``'s tile: cold process, fresh worker, warm worker (and the plan)."""
    import subprocess
    from jitkiln.compilers import get_compiler
    from jitkiln.compilers import cutedsl
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16-dsl") if i.name == inst_name + "_dsl")
    spec = fam.compile_spec("bf16-dsl")
    cold_py = (
        "import time, json; t0 = time.monotonic()\n"
        "from jitkiln.family import get_family\nfrom jitkiln import families\n"
        "from jitkiln.compilers import get_compiler\nfrom jitkiln.build import compile_unit\n"
        "from jitkiln.headers import HeaderLabels\n"
        "fam = get_family('moe2stage'); spec = fam.compile_spec('bf16-dsl')\n"
        f"inst = next(i for i in fam.candidates('bf16-dsl') if i.name == {inst.name!r})\n"
        "tc = get_compiler('cutedsl')\n"
        "r, data, _ = compile_unit(spec, tc, HeaderLabels(spec, tc), inst.name, fam.render(inst), 'instcost-dsl-cold')\n"
        "print(json.dumps({'unit_s': r.seconds, 'phases': r.phases, 'bytes': len(data), 'peak_rss': r.peak_rss}))\n")
    env = dict(os.environ, JITKILN_CACHE_DIR=str(work / "dsl-cold-cache"))
    print(f"dsl: cold process, {inst.name} ...", flush=True)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", cold_py], capture_output=True, text=True, env=env)
    cold_s = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"cold DSL compile failed:\n{p.stderr[-3000:]}")
    cold = json.loads(p.stdout.strip().splitlines()[-1])
    tc = get_compiler("cutedsl")
    labels = HeaderLabels(spec, tc)
    cutedsl.POOL.shutdown()
    runs = {}
    for kind in ("fresh_worker", "warm_worker"):
        print(f"dsl: {kind} ...", flush=True)
        r, data, _ = compile_unit(spec, tc, labels, inst.name, fam.render(inst), f"instcost-dsl-{kind}")
        out = work / f"dsl-{kind}-{inst.name}.so"
        out.write_bytes(data)
        runs[kind] = {"s": round(r.seconds, 2), "cpu_s": round(r.cpu_s, 2), "phases": r.phases, "mode": r.mode,
                      "worker_peak_rss_gib": round(r.peak_rss / 2**30, 2), "artifact": str(out),
                      "bytes": len(data)}
    cubin = _dsl_cubin_summary(runs["warm_worker"]["artifact"])
    res = {"instance": inst.name, "compiler": tc.fingerprint, "cold_process_s": round(cold_s, 2),
           "cold_unit_s": round(cold["unit_s"], 2), "cold_phases": cold["phases"], **runs, "sass": cubin,
           "fresh_vs_warm_bytes_identical": (Path(runs["fresh_worker"]["artifact"]).read_bytes()
                                             == Path(runs["warm_worker"]["artifact"]).read_bytes())}
    if stock:
        res["cxx_stock_s"] = stock["s"]
        res["cxx_stock_peak_rss_gib"] = stock.get("peak_rss_gib")
        for k in ("cold_process_s",):
            res["ratio_cold_process"] = round(res[k] / stock["s"], 3)
        res["ratio_fresh_worker"] = round(runs["fresh_worker"]["s"] / stock["s"], 3)
        res["ratio_warm_worker"] = round(runs["warm_worker"]["s"] / stock["s"], 3)
    if plan:
        from jitkiln.tokens import parse_tokens
        cutedsl.POOL.shutdown()
        problems = fam.problems("bf16-dsl", model="kimi-k2", tp=8, tokens=parse_tokens("1-8192"))
        pl = make_plan(fam, "bf16-dsl", problems)
        store = Store(tempfile.mkdtemp(prefix="instcost-dsl-cache-", dir=work))
        print(f"dsl: plan kimi-k2 tp8, {len(pl.units)} units, cold ...", flush=True)
        rec = Builder(store, jobs=default_jobs(), progress=False).build(pl)
        res["plan"] = {"units": [u.instance.name for u in pl.units], "jobs": default_jobs(),
                       "unit_s": [u.seconds for u in rec.units], "modes": [u.mode for u in rec.units],
                       "critical_path_s": rec.critical_path_s, "wall_s": round(rec.wall_s, 2)}
    return res


def _dsl_cubin_summary(so: str) -> dict:
    """Instruction counts of interest in the cubin embedded in a DSL artifact (cuobjdump on the ELF inside)."""
    import re
    import shutil as _sh
    import subprocess
    data = Path(so).read_bytes()
    offs = [m.start() for m in re.finditer(rb"\x7fELF", data)][1:]
    found = sorted(Path(sys.prefix).glob("lib/*/site-packages/nvidia/*/bin/cuobjdump"))
    cuobj = _sh.which("cuobjdump") or (found[0] if found else None)
    out: dict = {}
    for off in offs:
        tmp = Path(tempfile.mkdtemp()) / "k.cubin"
        tmp.write_bytes(data[off:])
        if not cuobj:
            break
        txt = subprocess.run([str(cuobj), "-sass", str(tmp)], capture_output=True, text=True).stdout
        for ins in re.findall(r"(HGMMA\.[\w.]+|UTMALDG\.[\w.]+|UTMASTG\.[\w.]+)", txt):
            out[ins] = out.get(ins, 0) + 1
        if out:
            out["cubin_bytes_upper_bound"] = len(data) - off
            break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instance", default=DEFAULT)
    ap.add_argument("--tag", default=f"{default_jobs()}cores")
    ap.add_argument("--floor", action="store_true", help="also time nvcc -cubin (device only)")
    ap.add_argument("--sequential", action="store_true", help="also time jitkiln's unit without the pipeline")
    ap.add_argument("--pack", nargs="*", metavar="NAME", default=None,
                    help="also: this instance packed with these (default one stage-2 config) in one unit, "
                         "against each separately (nvcc, sequential)")
    ap.add_argument("--plan", action="store_true", help="also the full Kimi-like plan, stock vs ours")
    ap.add_argument("--plan-family", default="moe2stage", help=argparse.SUPPRESS)
    ap.add_argument("--plan-only", action="store_true", help="only the plan comparison")
    ap.add_argument("--pack-only", action="store_true", help="only the pack comparison")
    ap.add_argument("--dsl", action="store_true", help="also the CuTe DSL back end of the same tile")
    ap.add_argument("--dsl-only", action="store_true", help="only the CuTe DSL back end (and the C++ stock)")
    ap.add_argument("--dsl-plan", action="store_true", help="with --dsl/--dsl-only: the Kimi-K2 tp8 bf16-dsl plan cold")
    ap.add_argument("--cxx-stock-from", default=None, help="with --dsl-only: take the C++ stock compile from this result")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=None)
    args = ap.parse_args()

    fam = get_family("moe2stage")
    inst = next((i for i in fam.candidates("bf16") if i.name == args.instance), None)
    if inst is None:
        raise SystemExit(f"no bf16 candidate named {args.instance}")
    spec = fam.compile_spec("bf16")
    tc = Nvcc.find()
    source = fam.render(inst)
    work = Path(args.work or tempfile.mkdtemp(prefix="instcost-"))
    work.mkdir(parents=True, exist_ok=True)

    res: dict = {"command": "python bench/instance_cost.py " + " ".join(sys.argv[1:]),
                 "instance": inst.name, "cores": default_jobs(), "host": platform.node(),
                 "cpu": _cpu_model(), "nvcc": tc.version, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.dsl_only:
        if args.cxx_stock_from:
            prev = json.loads(Path(args.cxx_stock_from).read_text())
            stock = dict(prev["stock"], from_result=args.cxx_stock_from, from_command=prev.get("command"))
        else:
            print(f"stock: nvcc -c {inst.name} ...", flush=True)
            stock = run_stock(tc, spec, inst.name, source, work)
        res["cxx_stock"] = stock
        res["dsl"] = dsl_cost(inst.name, work, stock, args.dsl_plan)
        print(json.dumps({k: v for k, v in res["dsl"].items() if not isinstance(v, dict)}, indent=1))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"instance-cost-{args.tag}.json").write_text(json.dumps(res, indent=1))
        return 0
    if args.plan_only or args.pack_only:
        if args.plan_only:
            res["plan"] = plan_cost(tc, work, default_jobs(), args.plan_family)
        else:
            res["pack"] = pack_cost_run(tc, fam, spec, inst, work, args.pack or [], None)
        print(json.dumps(res.get("plan") or res.get("pack"), indent=1))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"instance-cost-{args.tag}.json").write_text(json.dumps(res, indent=1))
        return 0
    print(f"stock: nvcc -c {inst.name} ...", flush=True)
    stock = run_stock(tc, spec, inst.name, source, work)
    print(f"  {stock['s']} s {stock['phases']}", flush=True)
    print("ours: jitkiln compile_unit (pipelined) ...", flush=True)
    ours = run_ours(tc, spec, inst.name, source, work, spare_cores=1)
    print(f"  {ours['s']} s {ours['phases']}", flush=True)
    sd = sass_diff.sass_identical(stock["artifact"], ours["artifact"])
    res.update(stock_s=stock["s"], ours_s=ours["s"], ratio=round(ours["s"] / stock["s"], 3),
               sass_identical=sd["identical"], sass=sd, stock=stock, ours=ours)
    if args.sequential:
        print("ours, sequential nvcc ...", flush=True)
        seq = run_ours(tc, spec, inst.name, source, work, spare_cores=0)
        res["ours_sequential"] = seq
        res["ours_sequential_ratio"] = round(seq["s"] / stock["s"], 3)
        res["pipelined_vs_sequential_bytes_identical"] = (Path(seq["artifact"]).read_bytes()
                                                          == Path(ours["artifact"]).read_bytes())
    if args.pack:
        res["pack"] = pack_cost_run(tc, fam, spec, inst, work, args.pack, res.get("ours_sequential"))
    if args.floor:
        print("floor: nvcc -cubin ...", flush=True)
        fl = run_stock(tc, spec, inst.name, source, work, mode="-cubin")
        res["device_only_cubin"] = fl
        res["device_only_ratio"] = round(fl["s"] / stock["s"], 3)
        res["device_only_sass_identical"] = sass_diff.sass_identical(stock["artifact"], fl["artifact"])["identical"]
    if args.dsl:
        res["dsl"] = dsl_cost(inst.name, work, stock, args.dsl_plan)
    if args.plan:
        print("plan: kimi-k2 tp8, stock vs ours ...", flush=True)
        res["plan"] = plan_cost(tc, work, default_jobs(), args.plan_family)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"instance-cost-{args.tag}.json"
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("cores", "stock_s", "ours_s", "ratio", "sass_identical")}))
    print(f"wrote {path}")
    return 0 if res["sass_identical"] else 1


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
