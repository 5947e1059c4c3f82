"""Stage-by-stage look at the bf16-dsl units on the GPU: the workspace is filled with a sentinel, each stage is
called alone through its C ABI, and the routing, gather, tile numbering, GEMM output and activation are compared
with torch (which intermediate goes wrong first, and whether the GEMM wrote its output at all).

    python scripts/moe_dsl_diag.py [--cache .gpu/cache] [--one]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from moe_dsl_load import load_dsl  # noqa: E402

from jitkiln.families.moe2stage.torch_ops import _call  # noqa: E402

SENT = 0x3F  # bf16 0x3F3F = 0.7461, int32 0x3F3F3F3F


def bump(sizes):
    off, out = 0, []
    for n in sizes:
        off = (off + 255) & ~255
        out.append(off)
        off += n
    return out, off


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def diag(mod, s1, s2, T, H, I, E, k, gen):
    dev = "cuda"
    x = torch.randn(T, H, generator=gen, device=dev).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, generator=gen, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=gen, device=dev) / I ** 0.5).to(torch.bfloat16)
    ids = torch.rand(T, E, generator=gen, device=dev).topk(k, dim=1).indices.to(torch.int32)
    w = torch.softmax(torch.randn(T, k, generator=gen, device=dev), dim=1).float()
    rows = T * k
    act = torch.full((rows, I), float("nan"), dtype=torch.bfloat16, device=dev)
    offsets = torch.full((E + 1,), -7, dtype=torch.int32, device=dev)
    sp = torch.full((rows,), -7, dtype=torch.int32, device=dev)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=dev)
    (o_cnt, o_rank, o_w, o_xs, o_h, o_toff), end = bump([4 * E, 4 * rows, 4 * rows, 2 * rows * H, 4 * rows * I,
                                                        4 * (E + 1)])
    ws = torch.full((end + 4096,), SENT, dtype=torch.uint8, device=dev)
    n = ctypes.c_size_t(ws.numel())
    stream = torch.cuda.current_stream().cuda_stream
    f1 = mod.launcher(s1)
    f2 = mod.launcher(s2)
    _call(f1, "stage1", x.data_ptr(), ids.data_ptr(), w.data_ptr(), w13.data_ptr(), act.data_ptr(),
          offsets.data_ptr(), sp.data_ptr(), T, k, E, H, I, 0, None, None, None, ws.data_ptr(), ctypes.byref(n),
          stream)
    torch.cuda.synchronize()
    cnt = torch.bincount(ids.reshape(-1).long(), minlength=E)
    exp_off = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    exp_off[1:] = cnt.cumsum(0)
    tag = f"{s1.name[10:]} T={T} H={H} I={I} E={E} k={k}"
    print(f"[{tag}] offsets ok: {bool((offsets.long() == exp_off).all())}", flush=True)
    tm, cm = s1.tile_m, s1.cluster_m
    tiles = ((cnt + tm - 1) // tm + cm - 1) // cm * cm
    exp_toff = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    exp_toff[1:] = tiles.cumsum(0)
    toff = ws[o_toff:o_toff + 4 * (E + 1)].view(torch.int32).long()
    print(f"   tile_off ok: {bool((toff == exp_toff).all())} (got {toff[:6].tolist()}.. total {toff[-1].item()}, "
          f"want total {exp_toff[-1].item()})", flush=True)
    xs = ws[o_xs:o_xs + 2 * rows * H].view(torch.bfloat16).view(rows, H)
    h = ws[o_h:o_h + 4 * rows * I].view(torch.bfloat16).view(rows, 2 * I)
    flat = ids.reshape(-1).long()
    pos = sp.long()
    xs_ref = torch.empty_like(xs)
    xs_ref[pos] = x[torch.arange(rows, device=dev) // k]
    print(f"   gather xs ok: {bool((xs == xs_ref).all())}", flush=True)
    h_ref = torch.empty(rows, 2 * I, dtype=torch.float32, device=dev)
    e_of = torch.empty(rows, dtype=torch.long, device=dev)
    e_of[pos] = flat
    for e in range(E):
        r = e_of == e
        h_ref[r] = xs_ref[r].float() @ w13[e].float().t()
    sent = (h.view(torch.int16) == 0x3F3F).float().mean().item()
    print(f"   GEMM h: rel err {rel(h.float().nan_to_num(1e9), h_ref):.3e}, finite {bool(torch.isfinite(h).all())}, "
          f"sentinel (never written) {100 * sent:.1f}%", flush=True)
    if rel(h.float().nan_to_num(1e9), h_ref) > 1e-2:
        for e in range(min(E, 4)):
            r = (e_of == e).nonzero().flatten()
            if r.numel():
                print(f"     expert {e}: rows {r.numel()} rel {rel(h[r].float().nan_to_num(1e9), h_ref[r]):.3e} "
                      f"got {h[r[0], :4].tolist()} want {h_ref[r[0], :4].tolist()}", flush=True)
        # is it another expert's weights, or B transposed / k-tile 0 only?
        r = (e_of == 0).nonzero().flatten()
        if r.numel():
            for e2 in range(1, min(E, 3)):
                alt = xs_ref[r].float() @ w13[e2].float().t()
                print(f"     expert 0 rows vs expert {e2}'s weights: rel {rel(h[r].float().nan_to_num(1e9), alt):.3e}")
            k0 = xs_ref[r].float()[:, :64] @ w13[0].float()[:, :64].t()
            print(f"     expert 0 rows vs first 64 of K only: rel {rel(h[r].float().nan_to_num(1e9), k0):.3e}")
    ws.fill_(SENT)
    act_ref = act.clone()
    _call(f2, "stage2", act.data_ptr(), w2.data_ptr(), out.data_ptr(), offsets.data_ptr(), sp.data_ptr(), T, k, E,
          H, I, None, None, ws.data_ptr(), ctypes.byref(n), stream)
    torch.cuda.synchronize()
    y = ws[:2 * rows * H].view(torch.bfloat16).view(rows, H)
    y_ref = torch.empty(rows, H, dtype=torch.float32, device=dev)
    for e in range(E):
        r = e_of == e
        y_ref[r] = act_ref[r].float() @ w2[e].float().t()
    sent = (y.view(torch.int16) == 0x3F3F).float().mean().item()
    print(f"   [{s2.name[10:]}] GEMM y: rel err {rel(y.float().nan_to_num(1e9), y_ref):.3e}, sentinel {100 * sent:.1f}%",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=".gpu/cache")
    ap.add_argument("--one", action="store_true")
    a = ap.parse_args()
    mod, info = load_dsl(a.cache)
    gen = torch.Generator(device="cuda").manual_seed(1)
    c = mod.family.candidates("bf16-dsl")
    s1s = [i for i in c if i.stage == 1]
    s2s = [i for i in c if i.stage == 2]
    shapes = [(64, 512, 256, 4, 2), (16, 7168, 256, 384, 8), (300, 2048, 768, 64, 8)]
    if a.one:
        shapes, s1s, s2s = shapes[:1], s1s[:1], s2s[:1]
    for sh in shapes:
        for i, s1 in enumerate(s1s):
            try:
                diag(mod, s1, s2s[i % len(s2s)], *sh, gen)
            except Exception as e:  # noqa: BLE001
                print(f"   ERROR {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
