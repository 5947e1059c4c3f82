"""Warm start: the same plan a second time compiles nothing and is loaded and ready in under 0.5 s.

    python bench/warm_load.py [--family demo] [--runs 5]

Builds the plan once into a fresh cache (cold), then starts fresh Python processes that plan, find every
instance in the cache, verify and load it; each reports the time from its first jitkiln import to a ready
module. Prints the median and writes bench/results/warm-load-<host>.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import time, json
t0 = time.perf_counter()
from jitkiln.runtime import load
m = load({family!r}, policy="error")
t1 = time.perf_counter()
print(json.dumps({{"ready": m.ready, "seconds": t1 - t0, "instances": len(m.plan.units)}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="demo")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, JITKILN_CACHE_DIR=d)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jitkiln.cli", "build", args.family, "--no-progress"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        cold = time.perf_counter() - t0
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, "-c", CHILD.format(family=args.family)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            assert r["ready"], r
            runs.append(r["seconds"])
    med = statistics.median(runs)
    res = {"family": args.family, "cores": os.cpu_count(), "host": os.uname().nodename, "cold_build_s": round(cold, 3),
           "warm_load_s": [round(x, 4) for x in runs], "warm_load_median_s": round(med, 4),
           "target_s": 0.5, "met": med < 0.5}
    print(json.dumps(res, indent=1))
    out = Path(args.out or Path(__file__).parent / "results" / f"warm-load-{os.cpu_count()}cores.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
