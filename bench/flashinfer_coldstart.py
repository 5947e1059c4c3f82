"""Time until FlashInfer's ``cutlass_fused_moe`` is ready for a bf16 model (fused_moe_90 on sm_90a).

Modes (one per call; each prints one JSON line and appends it to --result):

* ``flashinfer``: FlashInfer's own cold JIT of the whole module (empty FlashInfer cache), under --budget seconds.
  ninja's ``.ninja_log`` gives every finished edge's time; when the budget ends first, the total is derived as
  (CPU-seconds of the finished edges / finished count) x 249 edges / cores, and the finished waves are reported.
* ``jitkiln-cold``: empty jitkiln cache; ``jitkiln flashinfer build --dtype bf16``, then a fresh process loads it
  through FlashInfer (``get_cutlass_fused_moe_module``) and runs one call.
* ``jitkiln-warm``: the module is already in place: a fresh process, import to first call.
* ``jitkiln-seeded``: empty local cache, objects from JITKILN_SHARED_DIR (seeded by an earlier build): build + load.
* ``jitkiln-bundle``: the module from a signed bundle (``jitkiln flashinfer seed``), then a fresh process loads it.

Every load is a fresh process; its phases (torch import, FlashInfer import, module load + first call) are
reported, and ``ready_after_imports_s`` = what jitkiln adds before the first call (seed or build) + the module
load and first call, i.e. without the imports every FlashInfer user pays with or without a prebuilt module.
* ``cpu-ratio``: no GPU needed: compiler CPU-seconds of the bf16 files (from the cache's records) against
  FlashInfer's whole module (per-kind means x counts), for the 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = r"""
import json, time
t0 = time.time()
import torch
t1 = time.time()
from flashinfer.fused_moe import cutlass_fused_moe
t2 = time.time()
E, K, N, T = 8, 1024, 512, 16
x = torch.randn(T, K, dtype=torch.bfloat16, device="cuda")
w1 = torch.randn(E, 2 * N, K, dtype=torch.bfloat16, device="cuda") / K ** 0.5
w2 = torch.randn(E, K, N, dtype=torch.bfloat16, device="cuda") / N ** 0.5
ids = torch.randint(0, E, (T, 2), device="cuda", dtype=torch.int32)
sc = torch.softmax(torch.randn(T, 2, device="cuda"), -1)
out = cutlass_fused_moe(x, ids, sc, w1, w2, torch.bfloat16, quant_scales=None)
torch.cuda.synchronize()
t3 = time.time()
print(json.dumps({"import_torch_s": round(t1 - t0, 3), "import_flashinfer_s": round(t2 - t1, 3),
                  "module_and_first_call_s": round(t3 - t2, 3)}))
"""


def sh(cmd, env=None, timeout=None):
    t = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t


def load_time(env) -> tuple[float, dict]:
    """A fresh process: wall time to the first call's result, and its phases (torch import, FlashInfer import,
    module load + first call: the part a prebuilt module changes)."""
    p, wall = sh([sys.executable, "-c", LOAD], env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"load failed: {p.stderr[-2000:]}")
    return wall, json.loads(p.stdout.strip().splitlines()[-1])


def fi_cache(env) -> Path:
    return Path(env.get("FLASHINFER_WORKSPACE_BASE", os.path.expanduser("~"))) / ".cache" / "flashinfer"


def aot_so() -> Path:
    from jitkiln.flashinfer import source
    return source.aot_path("fused_moe_90")


def mode_flashinfer(args, env) -> dict:
    shutil.rmtree(fi_cache(env), ignore_errors=True)
    so = aot_so()
    if so.exists():
        so.unlink()
    cores = os.cpu_count()
    err = tempfile.NamedTemporaryFile(prefix="fi-cold-", suffix=".log", delete=False)
    p = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.DEVNULL, stderr=err,
                         start_new_session=True)
    t0 = time.monotonic()
    try:
        p.wait(timeout=args.budget)
        full = p.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # ninja and every compiler it started
        p.wait()
        full = False
    wall = time.monotonic() - t0
    logs = list(fi_cache(env).rglob("fused_moe_90/.ninja_log"))
    edges = []
    if logs:
        for line in logs[0].read_text().splitlines()[1:]:
            s, e, _, out, _ = line.split("\t")
            edges.append((int(s) / 1000, int(e) / 1000, out))
    durs = [e - s for s, e, _ in edges]
    r = {"mode": "flashinfer", "full": full, "wall_s": round(wall, 1), "finished_edges": len(edges),
         "mean_edge_s": round(sum(durs) / len(durs), 1) if durs else None, "cores": cores}
    starts0 = sorted(s for s, _, _ in edges)[:cores]
    r["first_wave_complete"] = len(edges) >= cores and bool(starts0) and starts0[-1] - starts0[0] < 5.0
    r["edges"] = [[round(s, 1), round(e, 1), os.path.basename(o)] for s, e, o in sorted(edges)]
    if not full and durs:
        from jitkiln.flashinfer import source
        src = source.load_module_source()
        n_gen = sum(src.generated(x) for x in src.sources)
        n_other = len(src.sources) - n_gen
        gen = [e - s for s, e, o in edges if "generated" in o]
        other = [e - s for s, e, o in edges if "generated" not in o]
        m_gen = sum(gen) / len(gen) if gen else sum(durs) / len(durs)
        m_other = sum(other) / len(other) if other else m_gen
        r["derived_total_s"] = round((m_gen * n_gen + m_other * n_other) / cores, 0)
        r["derived_how"] = (f"finished edges' mean wall per kind (generated {m_gen:.0f} s over {len(gen)}, other "
                            f"{m_other:.0f} s over {len(other)}) x the module's {n_gen} generated and {n_other} "
                            f"other sources / {cores} jobs at once (link not counted)")
    if p.returncode not in (0, None) and not full and wall < args.budget:
        r["error"] = Path(err.name).read_text()[-1500:]
    return r


def mode_jitkiln(args, env, kind: str) -> dict:
    if kind in ("cold", "seeded"):
        shutil.rmtree(env["JITKILN_CACHE_DIR"], ignore_errors=True)
    if kind == "cold" and env.get("JITKILN_SHARED_DIR"):  # cold: nothing anywhere; seeded reuses the shared dir
        shutil.rmtree(env["JITKILN_SHARED_DIR"], ignore_errors=True)
        os.makedirs(env["JITKILN_SHARED_DIR"])
    if kind != "warm":
        so = aot_so()
        if so.exists():
            so.unlink()
        t0 = time.monotonic()
        p, _ = sh([sys.executable, "-m", "jitkiln.cli", "flashinfer", "build", "--dtype", "bf16", "--json"], env=env)
        Path(args.result).with_name(f"flashinfer-build-{kind}.log").write_text(p.stderr)  # a line per file
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        build_s = time.monotonic() - t0
        info = json.loads(p.stdout.strip().splitlines()[-1])
    else:
        build_s, info = 0.0, {}
    load_s, phases = load_time(env)
    return {"mode": f"jitkiln-{kind}", "build_s": round(build_s, 1), "load_to_first_call_s": round(load_s, 2),
            "total_s": round(build_s + load_s, 1), "load_phases": phases,
            "ready_after_imports_s": round(build_s + phases["module_and_first_call_s"], 2),
            **{k: info.get(k) for k in ("compiled", "cache_hits", "compiler_cpu_s", "stubbed")}}


def mode_bundle(args, env) -> dict:
    """Seeded from a signed bundle (`jitkiln flashinfer seed`): no compiler, no FlashInfer import to install."""
    so = aot_so()
    if so.exists():
        so.unlink()
    p, seed_s = sh([sys.executable, "-m", "jitkiln.cli", "flashinfer", "seed", args.bundle], env=env)
    if p.returncode != 0:
        raise SystemExit(f"seed failed: {p.stderr[-2000:]}")
    load_s, phases = load_time(env)
    return {"mode": "jitkiln-bundle", "seed_s": round(seed_s, 2), "load_to_first_call_s": round(load_s, 2),
            "total_s": round(seed_s + load_s, 2), "load_phases": phases,
            "ready_after_imports_s": round(seed_s + phases["module_and_first_call_s"], 2)}


def mode_cpu_ratio(args, env) -> dict:
    from jitkiln.flashinfer import planner, source
    from jitkiln.store import Store
    src = source.load_module_source()
    plan = planner.plan_module(src, planner.parse_dtype("bf16"))
    metas = {}
    st = Store(env.get("JITKILN_CACHE_DIR"))
    for _, d in st.entries():
        try:
            m = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if m.get("family") == "flashinfer":
            metas[m["name"]] = m["cpu_s"]
    by_kind: dict[str, list[float]] = {}
    for f in plan.files:
        if f.name in metas:
            by_kind.setdefault(f.kind, []).append(metas[f.name])
    mean = {k: sum(v) / len(v) for k, v in by_kind.items()}

    def est(fs):
        return sum(metas.get(f.name, mean.get(f.kind, 0.0)) for f in fs)
    need, full = est(plan.needed), est(plan.files)
    return {"mode": "cpu-ratio", "measured_files": len(metas), "mean_cpu_s_by_kind": mean,
            "bf16_cpu_s": round(need, 0), "full_cpu_s": round(full, 0), "ratio": round(need / full, 3) if full else None,
            "how": "measured CPU-s per file where compiled here, else the mean of its kind (generated/runner/support)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["flashinfer", "jitkiln-cold", "jitkiln-warm", "jitkiln-seeded", "jitkiln-bundle",
                                     "cpu-ratio"])
    ap.add_argument("--bundle", help="jitkiln-bundle: the signed bundle (`jitkiln flashinfer prebuild -o`)")
    ap.add_argument("--budget", type=float, default=540)
    ap.add_argument("--result", default="bench/results/flashinfer-coldstart.jsonl")
    args = ap.parse_args()
    env = dict(os.environ)
    env.setdefault("JITKILN_CACHE_DIR", "/tmp/jk-bench-cache")
    if args.mode == "flashinfer":
        r = mode_flashinfer(args, env)
    elif args.mode == "cpu-ratio":
        r = mode_cpu_ratio(args, env)
    elif args.mode == "jitkiln-bundle":
        r = mode_bundle(args, env)
    else:
        r = mode_jitkiln(args, env, args.mode.split("-")[1])
    r["host_cores"] = os.cpu_count()
    line = json.dumps(r)
    print(line)
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    with open(args.result, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
