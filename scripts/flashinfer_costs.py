"""Write the per-file compile costs of FlashInfer's fused MoE module, as recorded in a jitkiln cache, to the table
the builder orders a cold build by (``src/jitkiln/flashinfer/costs/<version>.json``).

A cold machine (and a cold fleet) has no recorded costs; without them every generated file looks alike and a
file that takes twice as long as the others can start in the second wave, which then sets the build's length.
Only the order and the memory admission use the table; keys never do.

    python scripts/flashinfer_costs.py --cache DIR [--out src/jitkiln/flashinfer/costs]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.environ.get("JITKILN_CACHE_DIR"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/jitkiln/flashinfer/costs"))
    args = ap.parse_args()
    files: dict[str, dict] = {}
    version = host = toolchain = None
    for m in Path(args.cache).glob("v1/objects/*/*/meta.json"):
        meta = json.loads(m.read_text())
        if meta.get("family") != "flashinfer":
            continue
        version, host, toolchain = meta.get("flashinfer"), meta.get("host"), meta.get("toolchain")
        files[meta["name"]] = {"cpu_s": meta["cpu_s"], "peak_rss": meta["peak_rss"]}
    if not files:
        raise SystemExit(f"no FlashInfer entries in {args.cache}")
    out = Path(args.out) / f"{version}.json"
    out.write_text(json.dumps({"flashinfer": version, "measured": time.strftime("%Y-%m-%d"), "host": host,
                               "toolchain": toolchain, "command": "python scripts/flashinfer_costs.py",
                               "files": dict(sorted(files.items()))}, indent=1) + "\n")
    print(f"{len(files)} files -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
