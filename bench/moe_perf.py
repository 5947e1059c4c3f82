"""moe2stage vs peers on one GPU: ms, TFLOP/s, GB/s of weights read, ratios; peers timed in this process.

Peers:
* ``grouped_mm``: a torch composition -- argsort routing, gather, ``torch._grouped_mm`` (W13), SiLU*up*w,
  ``torch._grouped_mm`` (W2), ``index_add_`` combine; no host sync, so it is timed as a CUDA graph like jitkiln.
* ``loop``: per-expert matmul loop (one host sync for the counts, then a matmul pair per non-empty expert);
  timed eagerly (it cannot be captured).

FLOPs = 6 * routed_rows * inter_dim * hidden (two GEMMs); weight bytes = active experts * 3 * inter_dim * hidden
* element size (each touched expert's W13 and W2 read once). Timing: median over repeats of CUDA-event-timed
graph replays (rotating routings drawn up front so no replay reuses one).

    python bench/moe_perf.py --build build/moe [--tokens 1,16,64,512,4096,16384] [--json out.json] [--md out.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from jitkiln.families.moe2stage.torch_ops import torch_moe  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from jitkiln.families.moe2stage.torch_ops import fused_moe  # noqa: E402

SHAPES = {
    # name: (hidden, inter_dim per rank, local experts, global experts, topk)
    "kimi-k2 tp8": (7168, 2048 // 8, 384, 384, 8),
    "kimi-k2 ep8": (7168, 2048, 384 // 8, 384, 8),
    "qwen3-moe": (4096, 1536, 128, 128, 8),  # Qwen3-235B-A22B at tp 1
    "small-moe": (2048, 768 // 4, 128, 128, 8),  # Qwen3-30B-A3B at tp 4 (vLLM ships a tuned H200 config)
    "qwen3-30b": (2048, 768, 128, 128, 8),  # Qwen3-30B-A3B at tp 1 (tuned H200 config)
    "mixtral tp8": (4096, 14336 // 8, 8, 8, 2),  # Mixtral-8x7B at tp 8: few large experts, top-2 (tuned config)
}
TOKENS = (1, 16, 64, 512, 4096, 16384)
ALL_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def routing(T, E_local, E_global, k, dev, gen):
    ids = torch.rand(T, E_global, device=dev, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    if E_global != E_local:  # rank 0 of ep: its experts are 0..E_local-1, others' picks become -1
        ids = torch.where(ids < E_local, ids, torch.full_like(ids, -1))
    w = torch.softmax(torch.randn(T, k, device=dev, generator=gen), dim=1).float()
    return ids, w


def peer_grouped_mm(x, w13, w2, w, ids, masked):
    """The torch._grouped_mm composition: jitkiln's own tier 0 (ids outside [0, E) are always masked)."""
    return torch_moe(x, w13, w2, w, ids)


def peer_loop(x, w13, w2, w, ids):
    E, two_i, _ = w13.shape
    I = two_i // 2
    flat = ids.reshape(-1).long()
    k = ids.shape[1]
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, E))
    order = torch.argsort(key)
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()  # the host sync
    out = torch.zeros_like(x)
    start = 0
    wf = w.reshape(-1)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = sel // k
        h = x[tok] @ w13[e].t()
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out.index_add_(0, tok, (a @ w2[e].t()) * wf[sel].to(x.dtype)[:, None])
    return out


def time_graph(fn, inputs, reps):
    """Capture ``fn(i)`` for each prepared input set in one graph each; median ms of replays."""
    graphs = []
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(len(inputs)):
            fn(i)  # warm-up outside capture (loads, autotuning, allocator)
        torch.cuda.synchronize()
        for i in range(len(inputs)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(i)
            graphs.append(g)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    # warm-up replays, not timed: the first replays after new weights were made (a shape's first row) measured up
    # to 10 % slower than the same graphs later, whichever path was timed first
    _time(lambda j: graphs[j % len(graphs)].replay(), 3)
    return _time(lambda j: graphs[j % len(graphs)].replay(), reps)


def time_eager(fn, n_inputs, reps):
    for i in range(n_inputs):
        fn(i)
    torch.cuda.synchronize()
    return _time(lambda j: fn(j % n_inputs), reps)


def _time(step, reps):
    samples = []
    for r in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        inner = 5
        a.record()
        for j in range(inner):
            step(r * inner + j)
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / inner)
    return statistics.median(samples), (max(samples) - min(samples)) / statistics.median(samples)


def kernel_times(fn, n_in):
    """Device time per kernel name (ms per call, the n_in inputs averaged), eager, after one warm-up call each."""
    from torch.profiler import ProfilerActivity, profile
    for i in range(n_in):
        fn(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n_in):
            fn(i)
        torch.cuda.synchronize()
    kt = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            nm = ev.name[:60]
            kt[nm] = kt.get(nm, 0.0) + ev.device_time / n_in / 1e3
    return dict(sorted(kt.items(), key=lambda kv: -kv[1])[:12])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build/moe")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list, or 'all' (1, 2, 4 .. 16384)")
    ap.add_argument("--vllm", default="", help="time vLLM's Triton fused MoE too, from this folder "
                    "(scripts/vllm_fetch.sh; see bench/vllm_moe.py for what is and is not timed)")
    ap.add_argument("--no-grouped-mm", action="store_true", help="skip the torch grouped_mm peer")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-loop", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="also time the fp8 variant (per-tensor scales)")
    ap.add_argument("--fp8b128", action="store_true",
                    help="also time the fp8b128 variant (128x128 weight blocks, 1x128 activations quantized on the GPU)")
    ap.add_argument("--dsl-cache", default="",
                    help="also time bf16-dsl (CuTe DSL grouped GEMM), loaded from this cache (scripts/moe_dsl_load.py)")
    ap.add_argument("--sweep", default="", help="token counts at which every candidate of each stage is timed")
    ap.add_argument("--profile", default="", help="shape:tokens,... rows to break down per kernel")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args()
    if a.tokens == "all":
        a.tokens = ",".join(map(str, ALL_TOKENS))
    bad = [s for s in a.shapes.split(",") if s not in SHAPES]
    if bad:
        sys.exit(f"moe_perf: unknown shape(s) {', '.join(bad)}: choose from {', '.join(SHAPES)}")
    try:
        toks = [int(t) for t in a.tokens.split(",")]
        assert toks and min(toks) >= 1
    except (ValueError, AssertionError):
        sys.exit(f"moe_perf: --tokens {a.tokens!r}: a comma list of positive integers, or 'all'")
    vl = None
    if a.vllm:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from vllm_moe import load_or_exit
        vl = load_or_exit(a.vllm, "moe_perf")
    if not torch.cuda.is_available():
        sys.exit("moe_perf: no CUDA device here: run it on the GPU machine (scripts/gpu_decode.sh)")
    from moe_build import ForcedModule, build
    from jitkiln.families.moe2stage.gemv import is_gemv
    mod, _ = build("bf16", a.build, verbose=False)
    mod8 = build("fp8", a.build, verbose=False)[0] if a.fp8 else None
    modb = build("fp8b128", a.build, verbose=False)[0] if a.fp8b128 else None
    modd = dsl_info = None
    if a.dsl_cache:
        from moe_dsl_load import load_dsl
        modd, dsl_info = load_dsl(a.dsl_cache)
    sweep_tokens = {int(t) for t in a.sweep.split(",") if t}
    profile_rows = {tuple(r.split(":")) for r in a.profile.split(",") if r}
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(int(time.time()))
    props = torch.cuda.get_device_properties(dev)
    # the card's copy bandwidth, measured (bytes read + written)
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    ms_copy, _ = _time(lambda j: dst.copy_(buf), 10)  # noqa: F821
    copy_bw = 2 * buf.numel() / ms_copy / 1e6  # GB/s
    del buf, dst  # noqa: F821
    m = torch.randn(8192, 8192, device=dev, generator=gen).to(torch.bfloat16)
    n = torch.randn(8192, 8192, device=dev, generator=gen).to(torch.bfloat16)
    ms_mm, _ = _time(lambda j: m @ n, 10)  # noqa: F821
    peak_tf = 2 * 8192 ** 3 / ms_mm / 1e9
    del m, n  # noqa: F821
    meta = {"device": props.name, "sms": props.multi_processor_count, "copy_gbs": copy_bw, "peak_tflops": peak_tf,
            "torch": torch.__version__, "cuda": torch.version.cuda, "command": " ".join(sys.argv)}
    if vl is not None:
        import triton
        meta["vllm"] = {"version": vl.version, "triton": triton.__version__,
                        "timed": "fused_moe_kernel (W13), silu_and_mul (one Triton pass), cache3 zeroing (ep only), "
                                 "fused_moe_kernel (W2, routed weights), top-k sum (torch.sum)",
                        "not timed": "moe_align_block_size (sorted ids / expert ids, computed before the graph)"}
    if dsl_info:
        meta["dsl_load"] = dsl_info
    rows_out = []
    print(f"device {props.name}, {props.multi_processor_count} SMs, copy bandwidth {copy_bw:.0f} GB/s, "
          f"bf16 8192^3 matmul {peak_tf:.0f} TFLOP/s", flush=True)
    for sname in a.shapes.split(","):
        H, I, E, Eg, k = SHAPES[sname]
        w13 = (torch.randn(E, 2 * I, H, device=dev, generator=gen) / H ** 0.5).to(torch.bfloat16)
        w2 = (torch.randn(E, H, I, device=dev, generator=gen) / I ** 0.5).to(torch.bfloat16)
        ep = Eg // E
        if mod8 is not None:
            from moe_check import quantize_fp8
            q13, s13 = quantize_fp8(w13)
            q2, s2 = quantize_fp8(w2)
            a1 = torch.full((1,), 4.0 / 448, device=dev)  # static scales (values are ~N(0,1) here)
            a2 = torch.full((1,), 1.0 / 448, device=dev)
        if modb is not None:
            from moe_check import quantize_blocks
            b13, bs13 = quantize_blocks(w13)
            b2, bs2 = quantize_blocks(w2)
        for T in map(int, a.tokens.split(",")):
            n_in = 3
            xs = [torch.randn(T, H, device=dev, generator=gen).to(torch.bfloat16) for _ in range(n_in)]
            rts = [routing(T, E, Eg, k, dev, gen) for _ in range(n_in)]
            outs = [torch.empty(T, H, dtype=torch.bfloat16, device=dev) for _ in range(n_in)]
            rows = sum(int((r[0] >= 0).sum()) for r in rts) / n_in
            active = sum(int(torch.unique(r[0][r[0] >= 0]).numel()) for r in rts) / n_in
            flops = 6.0 * rows * I * H
            wbytes = active * 3 * I * H * 2
            masked = Eg != E
            res = {"shape": sname, "tokens": T, "hidden": H, "inter_dim": I, "experts": E, "topk": k, "ep": ep,
                   "routed_rows": rows, "active_experts": active}
            sel = mod.family.select("bf16", {"tokens": T, "hidden": H, "inter_dim": I, "experts": E, "topk": k,
                                          "ep": ep})
            res["instances"] = {s: i.name for s, i in sel.items()}
            jk = lambda i: fused_moe(xs[i], w13, w2, rts[i][1], rts[i][0], out=outs[i], module=mod, ep=ep)  # noqa
            res["jitkiln_ms"], res["jitkiln_spread"] = time_graph(jk, range(n_in), a.reps)
            if vl is not None:  # same inputs, same process, right after jitkiln
                cfg, src = vl.config(T, E, I, H, k, props.name)
                res["vllm_config"], res["vllm_config_source"] = cfg, src
                asg = [vl.assign(r[0], cfg["BLOCK_SIZE_M"], Eg, ep) for r in rts]  # untimed (vLLM's align op)
                cch = [vl.caches(T, k, H, I, dev) for _ in range(n_in)]
                vouts = [torch.empty(T, H, dtype=torch.bfloat16, device=dev) for _ in range(n_in)]
                vr = lambda i: vl.run(xs[i], w13, w2, rts[i][1], rts[i][0], asg[i], cfg, cch[i], vouts[i], ep)  # noqa
                res["vllm_ms"], res["vllm_spread"] = time_graph(vr, range(n_in), a.reps)
                res["vs_vllm"] = res["vllm_ms"] / res["jitkiln_ms"]
                vo = vr(0).double()
                jo0 = fused_moe(xs[0], w13, w2, rts[0][1], rts[0][0], module=mod, ep=ep).double()
                res["vllm_rel_diff_vs_jitkiln"] = ((vo - jo0).norm() / jo0.norm().clamp_min(1e-30)).item()
                print(f"   vllm {res['vllm_ms']:.4f} ms ({src}: M{cfg['BLOCK_SIZE_M']} N{cfg['BLOCK_SIZE_N']} "
                      f"K{cfg['BLOCK_SIZE_K']}) vs jitkiln {res['jitkiln_ms']:.4f} ms: x{res['vs_vllm']:.2f}, "
                      f"rel diff {res['vllm_rel_diff_vs_jitkiln']:.1e}", flush=True)
                del cch, vouts
            if mod8 is not None:
                j8 = lambda i: fused_moe(xs[i], q13, q2, rts[i][1], rts[i][0], out=outs[i], module=mod8, ep=ep,  # noqa
                                         a_scale=a1, w13_scale=s13, a2_scale=a2, w2_scale=s2)
                res["fp8_ms"], _ = time_graph(j8, range(n_in), a.reps)
                o8 = fused_moe(xs[0], q13, q2, rts[0][1], rts[0][0], module=mod8, ep=ep, a_scale=a1,
                               w13_scale=s13, a2_scale=a2, w2_scale=s2).double()
                ob = fused_moe(xs[0], w13, w2, rts[0][1], rts[0][0], module=mod, ep=ep).double()
                res["fp8_rel_diff_vs_bf16"] = ((o8 - ob).norm() / ob.norm().clamp_min(1e-30)).item()
            if vl is not None and mod8 is not None:  # vLLM's fp8 w8a8 path, same scales and inputs
                cfg8, src8 = vl.config(T, E, I, H, k, props.name, "fp8_w8a8")
                asg8 = [vl.assign(r[0], cfg8["BLOCK_SIZE_M"], Eg, ep) for r in rts]
                c8 = [vl.caches_fp8(T, k, H, I, dev) for _ in range(n_in)]
                v8 = lambda i: vl.run_fp8(xs[i], q13, q2, rts[i][1], rts[i][0], asg8[i], cfg8, c8[i],  # noqa
                                          outs[i], ep, a1, s13, a2, s2)  # noqa: F821
                res["vllm_fp8_ms"], _ = time_graph(v8, range(n_in), a.reps)
                res["vllm_fp8_config"], res["vllm_fp8_config_source"] = cfg8, src8
                res["vs_vllm_fp8"] = res["vllm_fp8_ms"] / res["fp8_ms"]
                o8 = fused_moe(xs[0], q13, q2, rts[0][1], rts[0][0], module=mod8, ep=ep, a_scale=a1,
                               w13_scale=s13, a2_scale=a2, w2_scale=s2).double()
                res["vllm_fp8_rel_diff_vs_jitkiln"] = ((v8(0).double() - o8).norm()
                                                      / o8.norm().clamp_min(1e-30)).item()
                print(f"   vllm fp8 {res['vllm_fp8_ms']:.4f} ms ({src8}) vs jitkiln fp8 {res['fp8_ms']:.4f} ms: "
                      f"x{res['vs_vllm_fp8']:.2f}, rel diff {res['vllm_fp8_rel_diff_vs_jitkiln']:.1e}", flush=True)
                del c8
            if modb is not None:
                jb = lambda i: fused_moe(xs[i], b13, b2, rts[i][1], rts[i][0], out=outs[i], module=modb, ep=ep,  # noqa
                                         w13_scale=bs13, w2_scale=bs2)
                res["fp8b128_ms"], _ = time_graph(jb, range(n_in), a.reps)
                ob = fused_moe(xs[0], b13, b2, rts[0][1], rts[0][0], module=modb, ep=ep, w13_scale=bs13,
                               w2_scale=bs2).double()
                o16 = fused_moe(xs[0], w13, w2, rts[0][1], rts[0][0], module=mod, ep=ep).double()
                res["fp8b128_rel_diff_vs_bf16"] = ((ob - o16).norm() / o16.norm().clamp_min(1e-30)).item()
                res["fp8b128_instances"] = {s: i.name for s, i in modb.family.select("fp8b128", {
                    "tokens": T, "hidden": H, "inter_dim": I, "experts": E, "topk": k, "ep": ep}).items()}
            if modd is not None:  # same inputs, same process, right after the C++ instances
                jd = lambda i: fused_moe(xs[i], w13, w2, rts[i][1], rts[i][0], out=outs[i], module=modd, ep=ep)  # noqa
                res["dsl_ms"], res["dsl_spread"] = time_graph(jd, range(n_in), a.reps)
                od = fused_moe(xs[0], w13, w2, rts[0][1], rts[0][0], module=modd, ep=ep).double()
                o16 = fused_moe(xs[0], w13, w2, rts[0][1], rts[0][0], module=mod, ep=ep).double()
                res["dsl_rel_diff_vs_bf16"] = ((od - o16).norm() / o16.norm().clamp_min(1e-30)).item()
                res["dsl_time_ratio"] = res["dsl_ms"] / res["jitkiln_ms"]
                if "vllm_ms" in res:
                    res["dsl_vs_vllm"] = res["vllm_ms"] / res["dsl_ms"]
                res["dsl_instances"] = {s: i.name for s, i in modd.family.select("bf16-dsl", {
                    "tokens": T, "hidden": H, "inter_dim": I, "experts": E, "topk": k, "ep": ep}).items()}
                print(f"   dsl {res['dsl_ms']:.3f} ms vs C++ {res['jitkiln_ms']:.3f} ms: time ratio "
                      f"{res['dsl_time_ratio']:.2f}, rel diff {res['dsl_rel_diff_vs_bf16']:.1e}", flush=True)
            if T in sweep_tokens:
                res["sweep"] = {}
                cands = mod.family.candidates("bf16")
                for st in (1, 2):
                    for c in [c for c in cands if c.stage == st]:
                        pair = (c, sel["stage2"]) if st == 1 else (sel["stage1"], c)
                        fm = ForcedModule(mod, *pair)
                        fj = lambda i: fused_moe(xs[i], w13, w2, rts[i][1], rts[i][0], out=outs[i], module=fm)  # noqa
                        res["sweep"][f"s{st}:{c.name}"] = time_graph(fj, range(n_in), max(5, a.reps // 2))[0]
                if modd is not None:  # the DSL variant's tiles too (its weight-stream units are bf16's)
                    dsel = modd.family.select("bf16-dsl", {"tokens": T, "hidden": H, "inter_dim": I, "experts": E,
                                                           "topk": k, "ep": ep})
                    for c in [c for c in modd.family.candidates("bf16-dsl") if not is_gemv(c)]:
                        pair = (c, dsel["stage2"]) if c.stage == 1 else (dsel["stage1"], c)
                        fm = ForcedModule(modd, *pair)
                        fj = lambda i: fused_moe(xs[i], w13, w2, rts[i][1], rts[i][0], out=outs[i], module=fm)  # noqa
                        res["sweep"][f"s{c.stage}:{c.name}"] = time_graph(fj, range(n_in), max(5, a.reps // 2))[0]
                if mod8 is not None:  # the fp8 variant's tiles (fp8 inputs, the fp8 pick for the other stage)
                    sel8 = mod8.family.select("fp8", {"tokens": T, "hidden": H, "inter_dim": I, "experts": E,
                                                      "topk": k, "ep": ep})
                    for c in mod8.family.candidates("fp8"):
                        pair = (c, sel8["stage2"]) if c.stage == 1 else (sel8["stage1"], c)
                        fm = ForcedModule(mod8, *pair)
                        fj = lambda i: fused_moe(xs[i], q13, q2, rts[i][1], rts[i][0], out=outs[i], module=fm,  # noqa
                                                 ep=ep, a_scale=a1, w13_scale=s13, a2_scale=a2, w2_scale=s2)
                        res["sweep"][f"s{c.stage}:{c.name}"] = time_graph(fj, range(n_in), max(5, a.reps // 2))[0]
                print("   sweep " + "  ".join(f"{k.split(':')[0]}:{k[13:]} {v:.3f}" for k, v in res["sweep"].items()))
            if (sname.replace(" ", "_"), str(T)) in profile_rows:
                res["kernels_ms"] = kernel_times(jk, n_in)
                print("   kernels: " + "; ".join(f"{k} {v:.4f}" for k, v in res["kernels_ms"].items()))
                if vl is not None:
                    vr0 = lambda i: vl.run(xs[i], w13, w2, rts[i][1], rts[i][0], asg[i], cfg,  # noqa
                                           vl.caches(T, k, H, I, dev), outs[i], ep)  # noqa
                    res["vllm_kernels_ms"] = kernel_times(vr0, n_in)
                    print("   vllm kernels: " + "; ".join(f"{k} {v:.4f}" for k, v in res["vllm_kernels_ms"].items()))
            gm = lambda i: peer_grouped_mm(xs[i], w13, w2, rts[i][1], rts[i][0], masked)  # noqa
            if a.no_grouped_mm:
                res["grouped_mm_skipped"] = True
            else:
                try:
                    res["grouped_mm_ms"], res["grouped_mm_spread"] = time_graph(gm, range(n_in), a.reps)
                except Exception as e:  # noqa: BLE001
                    res["grouped_mm_error"] = repr(e)[:200]
            if not a.no_loop and (T <= 4096 or E <= 128):
                lp = lambda i: peer_loop(xs[i], w13, w2, rts[i][1], rts[i][0])  # noqa
                res["loop_ms"], res["loop_spread"] = time_eager(lp, n_in, max(3, a.reps // 3))
            # agreement with the grouped_mm peer (same routing, same inputs)
            ref = peer_grouped_mm(xs[0], w13, w2, rts[0][1], rts[0][0], masked).double()
            jo = fused_moe(xs[0], w13, w2, rts[0][1], rts[0][0], module=mod, ep=ep).double()
            res["rel_diff_vs_grouped_mm"] = ((jo - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            ms = res["jitkiln_ms"]
            res["tflops"] = flops / ms / 1e9
            min_bytes = wbytes + 2 * T * H * 2  # weights once, x read, out written
            res["floor_ms"] = max(flops / peak_tf / 1e9, min_bytes / copy_bw / 1e6)
            res["of_floor"] = res["floor_ms"] / ms
            res["weights_gbs"] = wbytes / ms / 1e6
            res["weights_bw_frac"] = res["weights_gbs"] / copy_bw
            peers = [res[p] for p in ("grouped_mm_ms", "loop_ms", "vllm_ms") if p in res]
            best = min(peers) if peers else float("nan")
            res["vs_grouped_mm"] = res.get("grouped_mm_ms", float("nan")) / ms
            res["vs_loop"] = res.get("loop_ms", float("nan")) / ms
            res["vs_best_peer"] = best / ms
            rows_out.append(res)
            if a.json:  # after every row: a run cut short keeps what it measured
                with open(a.json, "w") as f:
                    json.dump({"meta": meta, "rows": rows_out}, f, indent=1)
            print(f"{sname:12s} T={T:6d} jk {ms:8.3f} ms {res['tflops']:6.1f} TF/s {res['weights_gbs']:7.0f} GB/s"
                  f" | gmm {res.get('grouped_mm_ms', float('nan')):8.3f} loop {res.get('loop_ms', float('nan')):8.3f}"
                  f" | x{res['vs_best_peer']:.2f} best peer  diff {res['rel_diff_vs_grouped_mm']:.1e}"
                  f" floor {res['floor_ms']:.3f} fp8 {res.get('fp8_ms', float('nan')):.3f}"
                  f" fp8b128 {res.get('fp8b128_ms', float('nan')):.3f}"
                  f"  [{sel['stage1'].name[10:]}, {sel['stage2'].name[10:]}]", flush=True)
            del xs, rts, outs
        del w13, w2
        if modb is not None:
            del b13, b2
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows_out}, f, indent=1)
    md = markdown(meta, rows_out)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)


def markdown(meta, rows):
    bw60 = 0.6 * meta["copy_gbs"]
    lines = [f"device: {meta['device']} ({meta['sms']} SMs), torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"measured copy bandwidth {meta['copy_gbs']:.0f} GB/s (60% = {bw60:.0f}), "
             f"bf16 8192^3 matmul {meta.get('peak_tflops', 0):.0f} TFLOP/s", "",
             "| shape | tokens | jitkiln ms | TFLOP/s | weights GB/s | grouped_mm ms | loop ms | x grouped_mm "
             "| x loop | floor ms | % of floor | fp8 ms | fp8 x bf16 | target | instances (stage1, stage2) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        T = r["tokens"]
        miss = []
        if r["vs_best_peer"] < 1.0:
            miss.append(f"peer x{r['vs_best_peer']:.2f}")
        if T >= 4096 and r["tflops"] < 600:
            miss.append(f"{r['tflops']:.0f}/600 TF")
        if T <= 64 and r["weights_gbs"] < bw60:
            miss.append(f"{r['weights_gbs'] / meta['copy_gbs'] * 100:.0f}%/60% bw")
        if T >= 4096 and "fp8_ms" in r and r["jitkiln_ms"] / r["fp8_ms"] < 1.4:
            miss.append(f"fp8 x{r['jitkiln_ms'] / r['fp8_ms']:.2f}/1.4")
        tgt = "met" if not miss else "MISSED: " + ", ".join(miss)
        f8 = r.get("fp8_ms", float("nan"))
        inst = ", ".join(v.replace("moe2stage_", "") for v in r["instances"].values())
        lines.append(f"| {r['shape']} | {T} | {r['jitkiln_ms']:.3f} | {r['tflops']:.1f} | {r['weights_gbs']:.0f} | "
                     f"{r.get('grouped_mm_ms', float('nan')):.3f} | {r.get('loop_ms', float('nan')):.3f} | "
                     f"{r['vs_grouped_mm']:.2f} | {r['vs_loop']:.2f} | {r['floor_ms']:.3f} | "
                     f"{100 * r['of_floor']:.0f}% | {f8:.3f} | {r['jitkiln_ms'] / f8:.2f} | {tgt} | {inst} |")
    v = [r for r in rows if "vllm_ms" in r]
    if v:  # vLLM's Triton fused MoE, same rows, same process (bench/vllm_moe.py: what is and is not timed)
        vm = meta.get("vllm", {})
        lines += ["", f"against vLLM {vm.get('version', '?')}'s Triton fused MoE (Triton {vm.get('triton', '?')}; "
                  f"timed: {vm.get('timed', '?')}; not timed: {vm.get('not timed', '?')}); ratio = vLLM ms / "
                  "jitkiln ms (> 1: jitkiln faster); bandwidth = active experts' weight bytes / time as a share of "
                  "the measured copy bandwidth:", "",
                  "| shape | tokens | jitkiln ms | vLLM ms | ratio | jitkiln TFLOP/s | vLLM TFLOP/s | jitkiln bw "
                  "| vLLM bw | vLLM config | rel diff | jitkiln instances |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for r in v:
            fl = 6.0 * r["routed_rows"] * r["inter_dim"] * r["hidden"]
            wb = r["active_experts"] * 3 * r["inter_dim"] * r["hidden"] * 2
            c = r["vllm_config"]
            cs = (f"M{c['BLOCK_SIZE_M']} N{c['BLOCK_SIZE_N']} K{c['BLOCK_SIZE_K']} "
                  f"{'tuned' if r['vllm_config_source'].startswith('tuned') else 'default'}")
            inst = ", ".join(x.replace("moe2stage_", "") for x in r["instances"].values())
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['jitkiln_ms']:.4f} | {r['vllm_ms']:.4f} | "
                         f"{r['vs_vllm']:.2f}{'' if r['vs_vllm'] >= 1.0 else ' (below 1)'} | "
                         f"{fl / r['jitkiln_ms'] / 1e9:.1f} | {fl / r['vllm_ms'] / 1e9:.1f} | "
                         f"{100 * wb / r['jitkiln_ms'] / 1e6 / meta['copy_gbs']:.0f}% | "
                         f"{100 * wb / r['vllm_ms'] / 1e6 / meta['copy_gbs']:.0f}% | {cs} | "
                         f"{r['vllm_rel_diff_vs_jitkiln']:.1e} | {inst} |")
        below = [r for r in v if r["vs_vllm"] < 1.0]
        lines += ["", f"{len(v) - len(below)} of {len(v)} rows at >= 1.0x vLLM" +
                  (": below at " + ", ".join(f"{r['shape']} T={r['tokens']} ({r['vs_vllm']:.2f})" for r in below)
                   if below else "")]
    f = [r for r in rows if "vllm_fp8_ms" in r]
    if f:  # fp8 (per-tensor) against vLLM's fp8 w8a8 Triton path, same scales, same inputs
        lines += ["", "fp8 (e4m3 weights with per-expert scales, static per-tensor activation scales) against vLLM's "
                  "fp8_w8a8 Triton path (its fp8 config files / rule; both quantizations as one-pass Triton stand-ins); "
                  "ratio = vLLM ms / jitkiln ms:", "",
                  "| shape | tokens | jitkiln fp8 ms | vLLM fp8 ms | ratio | vLLM config | rel diff |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        for r in f:
            c = r["vllm_fp8_config"]
            cs = (f"M{c['BLOCK_SIZE_M']} N{c['BLOCK_SIZE_N']} K{c['BLOCK_SIZE_K']} "
                  f"{'tuned' if r['vllm_fp8_config_source'].startswith('tuned') else 'default'}")
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['fp8_ms']:.4f} | {r['vllm_fp8_ms']:.4f} | "
                         f"{r['vs_vllm_fp8']:.2f} | {cs} | {r['vllm_fp8_rel_diff_vs_jitkiln']:.1e} |")
    b = [r for r in rows if "fp8b128_ms" in r]
    if b:  # the 128-block fp8 variant, same rows, same process
        lines += ["", "fp8b128 (e4m3, 128x128 weight blocks, 1x128 activations quantized on the GPU):", "",
                  "| shape | tokens | bf16 ms | fp8 ms | fp8b128 ms | TFLOP/s | fp8b128 x bf16 | fp8b128 x fp8 "
                  "| rel diff vs bf16 | instances (stage1, stage2) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in b:
            f8 = r.get("fp8_ms", float("nan"))
            tf = 6.0 * r["routed_rows"] * r["inter_dim"] * r["hidden"] / r["fp8b128_ms"] / 1e9
            inst = ", ".join(v.replace("moe2stage_", "") for v in r["fp8b128_instances"].values())
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['jitkiln_ms']:.3f} | {f8:.3f} | {r['fp8b128_ms']:.3f} | "
                         f"{tf:.1f} | {r['jitkiln_ms'] / r['fp8b128_ms']:.2f} | {f8 / r['fp8b128_ms']:.2f} | "
                         f"{r['fp8b128_rel_diff_vs_bf16']:.1e} | {inst} |")
    d = [r for r in rows if "dsl_ms" in r]
    if d:  # the CuTe DSL grouped GEMM (bf16-dsl), same rows, same process
        lines += ["", "bf16-dsl (the CuTe DSL grouped GEMM for the tiles; the same weight-stream units where the heuristic "
                  "takes them) against bf16 (CUTLASS C++ ptr-array grouped GEMM); time ratio = DSL ms / C++ ms (> 1: "
                  "DSL slower); x vLLM = vLLM ms / DSL ms (> 1: bf16-dsl faster):", "",
                  "| shape | tokens | C++ bf16 ms | DSL ms | time ratio | x vLLM | DSL TFLOP/s | rel diff vs C++ "
                  "| DSL instances |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in d:
            tf = 6.0 * r["routed_rows"] * r["inter_dim"] * r["hidden"] / r["dsl_ms"] / 1e9
            inst = ", ".join(v.replace("moe2stage_", "") for v in r["dsl_instances"].values())
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['jitkiln_ms']:.3f} | {r['dsl_ms']:.3f} | "
                         f"{r['dsl_time_ratio']:.2f} | {r.get('dsl_vs_vllm', float('nan')):.2f} | {tf:.1f} | "
                         f"{r['dsl_rel_diff_vs_bf16']:.1e} | {inst} |")
        ratios = sorted(r["dsl_time_ratio"] for r in d)
        lines += ["", f"time ratio over {len(d)} rows: min {ratios[0]:.2f}, median "
                  f"{statistics.median(ratios):.2f}, max {ratios[-1]:.2f}"]
        dv = [r for r in d if "dsl_vs_vllm" in r]
        if dv:
            below = [r for r in dv if r["dsl_vs_vllm"] < 1.0]
            lines += ["", f"bf16-dsl: {len(dv) - len(below)} of {len(dv)} rows at >= 1.0x vLLM" +
                      (": below at " + ", ".join(f"{r['shape']} T={r['tokens']} ({r['dsl_vs_vllm']:.2f})"
                                                 for r in below) if below else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
