"""Build a trimmed FlashInfer fused-MoE module: every needed file once through the store (longest first,
bounded by cores and free memory, a progress line per file), then link with stubs and place the module where
FlashInfer's loader finds a prebuilt module."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..build import available_memory, default_jobs
from ..errors import JitkilnError, StoreError
from . import link, objcache, planner, source

# expected peak memory before a file's first compile records its own: FlashInfer's generated CUTLASS files peaked
# at 5.3-7.7 GB (nvcc 13.0, sm_90a), its hand-written .cu files lower
DEFAULT_MEM = {"generated": int(7.5 * 2**30), "cuda": 4 << 30, "cxx": 1 << 30}
DEFAULT_S = {"generated": 190.0, "runner": 120.0, "blockscale": 120.0, "support": 60.0}


class MemoryGate:
    """Admit a compile when its expected peak fits in free memory (one always runs)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.running = 0
        self.mem = 0

    def enter(self, need: int) -> None:
        with self.cond:
            while self.running and self.mem + need > available_memory() * 0.9:
                self.cond.wait(0.5)
            self.running += 1
            self.mem += need

    def leave(self, need: int) -> None:
        with self.cond:
            self.running -= 1
            self.mem -= need
            self.cond.notify_all()


def measured_costs(version: str) -> dict[str, dict]:
    """Per-file compile costs measured on a reference build of this FlashInfer version (``costs/<version>.json``,
    written by scripts/flashinfer_costs.py); {} when none was measured. They order a cold build (longest first)
    and admit compiles by expected memory; a cost this cache recorded itself takes precedence."""
    p = Path(__file__).with_name("costs") / f"{version}.json"
    try:
        return json.loads(p.read_text()).get("files", {})
    except (OSError, ValueError):
        return {}


def build(plan: planner.Plan, src: source.ModuleSource, store, jobs: int | None = None, out: str | None = None,
          progress: bool = True) -> dict:
    jobs = jobs or default_jobs()
    dest = Path(out) / src.name / f"{src.name}.so" if out else source.aot_path(src.name)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        probe = dest.parent / f".jk-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StoreError(f"cannot write the module to {dest.parent} ({e.strerror or e})",
                         hint="give --out DIR and point FlashInfer at it (FLASHINFER's data/aot), or fix the "
                              "permissions") from None
    store.ensure()
    bdir = Path(tempfile.mkdtemp(prefix=f"{src.name}-", dir=str(store.root / "tmp")))
    t0 = time.monotonic()
    items = []
    costs = measured_costs(src.version)
    for f in plan.needed:
        e = src.compiles[f.source]
        argv = list(e.argv)
        obj = str(bdir / os.path.basename(e.out))
        argv[argv.index("-o") + 1] = obj
        kind = "cuda" if e.rule == "cuda_compile" else "cxx"
        cmd, fp, root, ukey, labels = objcache.prepare(argv)
        rec = store.recorded_costs(ukey)
        ref = costs.get(f.name, {})
        exp_s = rec[0] if rec else ref.get("cpu_s") or DEFAULT_S.get(f.kind, 60.0) * (1 if kind == "cuda" else 0.05)
        exp_m = (rec[1] if rec and rec[1] else ref.get("peak_rss")
                 or DEFAULT_MEM["generated" if f.kind == "generated" and kind == "cuda" else kind])
        items.append((f, argv, obj, exp_s, exp_m))
    items.sort(key=lambda it: -it[3])  # longest first
    gate = MemoryGate()
    lock = threading.Lock()
    done = {"n": 0}
    results: list[dict] = []
    errors: list[JitkilnError] = []

    def one(it) -> None:
        f, argv, obj, exp_s, exp_m = it
        import contextlib

        @contextlib.contextmanager
        def g():
            gate.enter(exp_m)
            try:
                yield
            finally:
                gate.leave(exp_m)
        try:
            o = objcache.compile_cached(argv, store, name=f.name, gate=g,
                                        meta_extra={"module": src.name, "flashinfer": src.version})
        except JitkilnError as e:
            errors.append(e)
            return
        with lock:
            done["n"] += 1
            results.append({"file": f.name, "status": o.status, "compile_s": round(o.seconds, 2),
                            "cpu_s": round(o.cpu_s, 2), "peak_rss": o.peak_rss})
            if progress:
                print(f"[{done['n']}/{len(items)}] {o.status:8s} {f.name} ({o.seconds:.1f} s) "
                      f"{time.monotonic() - t0:.0f} s elapsed", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(items)))) as ex:
        list(ex.map(one, items))
    if errors:
        raise errors[0]
    compile_wall = time.monotonic() - t0
    objs = [it[2] for it in sorted(items, key=lambda it: src.sources.index(it[0].source))]
    ln = link.link_module(objs, src.link.argv, str(dest), src.name, plan.deployment.label,
                          workdir=str(bdir / "link"))
    summary = {
        "module": src.name, "flashinfer": src.version, "deployment": plan.deployment.__dict__, "path": str(dest),
        "files": len(items), "compiled": sum(r["status"] == "compiled" for r in results),
        "cache_hits": sum(r["status"] in ("hit", "waited") for r in results),
        "compile_wall_s": round(compile_wall, 2), "compiler_cpu_s": round(sum(r["cpu_s"] for r in results), 2),
        "link_s": ln["link_s"], "wall_s": round(time.monotonic() - t0, 2), "stubbed": ln["stubbed"],
        "undefined_after": ln["undefined_after"], "jobs": jobs, "results": results,
    }
    side = dest.with_suffix(".jitkiln.json")
    tmp = side.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: v for k, v in summary.items() if k != "results"}
                              | {"left_out": [f.name for f in plan.left_out]}, indent=1))
    os.replace(tmp, side)
    import shutil
    shutil.rmtree(bdir, ignore_errors=True)
    return summary
