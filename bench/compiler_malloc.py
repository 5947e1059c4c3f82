"""Does the compiler's memory allocator change its speed? nvcc -cubin of one heavy moe2stage instance (cicc
is ~90 % of it), run REPS times per allocator setting, interleaved, PARALLEL at a time, measuring wall, cicc's
phase, user and system CPU seconds and minor page faults; and whether the cubins are byte-identical.

    python bench/compiler_malloc.py --reps 3 --parallel 1 --tag 2cores        # this (2-core) machine
    python bench/compiler_malloc.py --reps 4 --parallel 8 --tag 16cores-h100  # the GPU host

Settings: ``glibc`` (nothing set), ``glibc-thp`` (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) and ``jemalloc``
(LD_PRELOAD of libjemalloc.so.2 from $JEMALLOC or the system's libjemalloc2). The machine code is compared with
scripts/sass_diff.py (the cubins differ in their paths). Writes bench/results/compiler-malloc-TAG.json.
The answer here was no (docs/compile-cost.md): cicc takes the same time, user and system seconds and the same
~1.04 M minor page faults (one per 4 KiB page of its ~3.3 GiB, touched once) with either allocator.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

from jitkiln.family import get_family  # noqa: E402
from jitkiln.compilers.nvcc import Nvcc, parse_nvcc_time  # noqa: E402

import instance_cost  # noqa: E402
import sass_diff  # noqa: E402


def find_jemalloc() -> str | None:
    for p in [os.environ.get("JEMALLOC", ""), "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
              "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2"]:
        if p and os.path.isfile(p):
            return p
    return None


def one(tc, spec, src: str, work: Path, tag: str, env: dict) -> dict:
    d = work / tag
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "u.cu").write_text(src)
    cmd = instance_cost.stock_cmd(tc, spec, str(d / "u.cu"), str(d / "u.cubin"), str(d / "t.csv"), "-cubin")
    t0 = time.monotonic()
    pid = os.posix_spawn(cmd[0], cmd, env, file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                                         (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    _, status, ru = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nvcc failed ({status}) in {d}")
    return {"wall_s": round(wall, 2), "cicc_s": parse_nvcc_time(str(d / "t.csv")).get("cicc"),
            "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2), "minflt": ru.ru_minflt,
            "cubin": str(d / "u.cubin")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instance", default=instance_cost.DEFAULT)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--settings", default="glibc,glibc-thp,jemalloc")
    ap.add_argument("--tag", default=f"{os.cpu_count()}cores")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    fam = get_family("moe2stage")
    inst = next(i for i in fam.candidates("bf16") if i.name == args.instance)
    spec, tc, src = fam.compile_spec("bf16"), Nvcc.find(), fam.render(inst)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF")}
    je = find_jemalloc()
    envs = {"glibc": dict(base), "glibc-thp": dict(base, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")}
    if je:
        envs["jemalloc"] = dict(base, LD_PRELOAD=je)
    settings = [s for s in args.settings.split(",") if s in envs]
    jobs = [(s, r) for r in range(args.reps) for s in settings]  # interleaved
    work = Path(tempfile.mkdtemp(prefix="cmalloc-"))
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    print(f"{len(jobs)} compiles of {inst.name}, {args.parallel} at a time; jemalloc: {je}", flush=True)
    with cf.ThreadPoolExecutor(args.parallel) as ex:
        futs = {ex.submit(one, tc, spec, src, work, f"{s}-{r}", envs[s]): s for s, r in jobs}
        for f in cf.as_completed(futs):
            r = f.result()
            runs[futs[f]].append(r)
            print(futs[f], json.dumps(r), flush=True)
    cubins = [r.pop("cubin") for rs in runs.values() for r in rs]
    same = all(sass_diff.sass_identical(cubins[0], c)["identical"] for c in cubins[1:])
    shutil.rmtree(work, ignore_errors=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cicc_s", "user_s", "sys_s", "minflt")}
           for s, rs in runs.items() if rs}
    ref = med.get("glibc")
    res = {"command": "python bench/compiler_malloc.py " + " ".join(sys.argv[1:]), "instance": inst.name,
           "cores": os.cpu_count(), "parallel": args.parallel, "reps": args.reps, "jemalloc": je,
           "median": med,
           "over_glibc": {s: {k: round(m[k] / ref[k], 3) for k in ("wall_s", "cicc_s", "user_s", "sys_s")}
                          for s, m in med.items()} if ref else None,
           "sass_identical": same,
           "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compiler-malloc-{args.tag}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("median", "over_glibc", "sass_identical")}, indent=1))
    return 0 if res["sass_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
