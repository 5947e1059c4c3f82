"""``fused_moe``: the two-stage MoE of the ``moe2stage`` family on torch CUDA tensors.

Layouts and dtypes (T tokens, H hidden, I per-rank intermediate, E local experts, k = top-k)::

    hidden_states  [T, H]        torch.bfloat16, CUDA, contiguous
    w13            [E, 2*I, H]   bf16 (variant bf16) or float8_e4m3fn (variant fp8); rows 0..I-1 are the gate
                                 projection, rows I..2I-1 the up projection (vLLM's w13 layout); H contiguous
    w2             [E, H, I]     same dtype as w13; I contiguous
    topk_weights   [T, k]        float32 (bf16/fp16 are converted)
    topk_ids       [T, k]        int32 (int64 is converted); ids outside [0, E) are skipped, which is how an
                                 expert-parallel rank drops the picks of other ranks' experts
    returns        [T, H]        bf16: sum_k topk_weights[t, k] * W2[e] (act(W13_gate[e] x) * (W13_up[e] x))

fp8 (e4m3) needs per-tensor activation scales ``a_scale`` (stage 1 input) and ``a2_scale`` (stage 2 input),
float32 tensors of one element, and per-expert weight scales ``w13_scale`` / ``w2_scale`` ([E] float32):
real = fp8 * scale. Activations are quantized on the GPU (saturating to +-448).

fp8 with 128-block scales (variant ``fp8b128``, DeepSeek-V3 style; H and I multiples of 128), chosen by
passing weight scales with 128x128 block shapes (contiguous float32, real = fp8 * scale of its block)::

    w13_scale      [E, 2*I/128, H/128]  w13 block (n, k) covers rows 128n..128n+127, columns 128k..128k+127
                                        (gate blocks first: I is a multiple of 128, so no block straddles)
    w2_scale       [E, H/128, I/128]
    hidden_states  [T, H] bfloat16: quantized on the GPU per token per 128 channels (scale = amax / 448), or
                   [T, H] float8_e4m3fn already quantized, with
    a_scale        [T, H/128] float32 (per token, per 128 channels: x[t, 128k + j] = fp8 * a_scale[t, k])
    a2_scale       must be None: stage 2's input is quantized on the GPU per routed row per 128 channels
                   (after act(gate) * up * routing weight), like stage 1's

Scale-shape or dtype mistakes raise ``UsageError`` before anything is launched.

Everything runs on the current stream without host synchronisation, so a call can be captured in a CUDA graph
once its kernels are built (the first call for a new shape class may compile or load them: do that before
capture, e.g. with ``jitkiln plan/build`` or one warm-up call).

Torch is imported lazily: importing this module needs no torch.

Longer than 400 lines: the torch call, its input checks, tier 0 and the references.
"""
from __future__ import annotations

import ctypes
from typing import Any

from ... import runtime
from ...errors import LaunchError, UsageError
from ...family import get_family
from .instances import BLOCK

FAMILY = "moe2stage"
ACTIVATIONS = {"silu": 0, "gelu": 1}

_modules: dict[tuple, Any] = {}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def module_for(variant: str, problems, policy: str = "compile", store=None):
    """The runtime module serving ``problems`` (one per variant, policy, store and instance set; cached).

    For a server: plan its whole deployment once, e.g. ``module_for("bf16", MoEShape.from_hf_config(...)
    problems, policy="tiered")``, and pass it to every :func:`fused_moe` call as ``module=``.
    """
    fam = get_family(FAMILY)
    problems = [dict(p) for p in problems]
    sel = sorted({i.digest for p in problems for i in fam.select(variant, p).values()})
    key = (variant, policy, id(store), tuple(sel))
    mod = _modules.get(key)
    if mod is None:
        mod = runtime.load(FAMILY, variant, problems, policy=policy, store=store)
        _modules[key] = mod
    return mod


def _ptr(t) -> int | None:
    return None if t is None else t.data_ptr()


def _call(fn, name: str, *args) -> None:
    rc = fn(*args)
    if rc != 0:
        what = f"CUTLASS status {rc - 10000}" if rc >= 10000 else f"CUDA error {rc}"
        raise LaunchError(f"moe2stage {name} launch failed: {what}",
                          hint="run with CUDA_LAUNCH_BLOCKING=1 to locate it; check shapes and the device")


def fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, activation: str = "silu", *,
              out=None, a_scale=None, w13_scale=None, a2_scale=None, w2_scale=None, ep: int = 1,
              module=None, policy: str = "compile", store=None):
    """Two-stage fused MoE (see the module docstring for layouts). Returns ``out`` ([T, H] bf16).

    ``module``: a runtime module from :func:`module_for` (else one is made for this shape with ``policy``).
    Under the ``tiered`` policy a call whose kernels are not loaded yet runs :func:`torch_moe` (tier 0)
    while they build in the background, and the tuned kernels from the first call after they load.
    """
    import torch

    x = hidden_states
    _check(isinstance(x, torch.Tensor) and x.dim() == 2, "hidden_states must be a 2-D tensor [T, H]")
    _check(x.is_cuda, f"hidden_states must be on a CUDA device, got {x.device}")
    dev = x.device
    _check(x.dtype == torch.bfloat16 or (x.dtype == getattr(torch, "float8_e4m3fn", None)
                                         and _is_block_scaled(w13_scale, w13)),
           f"hidden_states must be bfloat16 (or float8_e4m3fn with a_scale [T, H/128] for 128-block fp8 "
           f"weights), got {x.dtype}")
    _check(activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    for nm, t, nd in (("w13", w13, 3), ("w2", w2, 3), ("topk_weights", topk_weights, 2),
                      ("topk_ids", topk_ids, 2)):
        _check(isinstance(t, torch.Tensor) and t.dim() == nd, f"{nm} must be a {nd}-D tensor")
        _check(t.device == dev, f"{nm} is on {t.device}, hidden_states on {dev}: put them on one device")
    T, H = x.shape
    E, two_i, h1 = w13.shape
    _check(two_i % 2 == 0, f"w13 must be [E, 2*I, H]; its dim 1 ({two_i}) is odd")
    I = two_i // 2
    _check(h1 == H, f"w13 is [E, 2I, {h1}] but hidden_states has H={H}")
    _check(tuple(w2.shape) == (E, H, I), f"w2 must be [E, H, I] = [{E}, {H}, {I}], got {list(w2.shape)}")
    _check(w13.dtype == w2.dtype, f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must have one dtype")
    if w13.dtype == torch.bfloat16:
        variant = "bf16"
        _check(all(s is None for s in (a_scale, w13_scale, a2_scale, w2_scale)),
               "scales are for fp8 weights; bf16 weights take none")
    elif w13.dtype == getattr(torch, "float8_e4m3fn", None) and _is_block_scaled(w13_scale, w13):
        variant = "fp8b128"
        _check_b128(x, w13, w2, a_scale, w13_scale, a2_scale, w2_scale)
    elif w13.dtype == getattr(torch, "float8_e4m3fn", None):
        variant = "fp8"
        for nm, s, n in (("a_scale", a_scale, 1), ("a2_scale", a2_scale, 1), ("w13_scale", w13_scale, E),
                         ("w2_scale", w2_scale, E)):
            _check(isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.numel() == n
                   and s.device == dev and s.is_contiguous(),
                   f"fp8 needs {nm}: a contiguous float32 tensor of {n} element(s) on {dev}")
    else:
        raise UsageError(f"w13/w2 dtype {w13.dtype} is not supported: bfloat16 or float8_e4m3fn")
    _check(topk_ids.shape[0] == T and topk_weights.shape == topk_ids.shape,
           f"topk_ids and topk_weights must both be [T={T}, k]; got {list(topk_ids.shape)} and "
           f"{list(topk_weights.shape)}")
    k = topk_ids.shape[1]
    _check(k >= 1, "top-k must be >= 1")
    _check(H % 16 == 0 and I % 16 == 0, f"H={H} and I={I} must be multiples of 16 (16-byte rows for TMA)")
    for nm, t in (("hidden_states", x), ("w13", w13), ("w2", w2)):
        _check(t.is_contiguous(), f"{nm} must be contiguous (row-major; call .contiguous())")
    if topk_ids.dtype != torch.int32:
        _check(topk_ids.dtype in (torch.int64, torch.int16, torch.uint8), f"topk_ids dtype {topk_ids.dtype}")
        topk_ids = topk_ids.to(torch.int32)
    if topk_weights.dtype != torch.float32:
        _check(topk_weights.is_floating_point(), f"topk_weights dtype {topk_weights.dtype}")
        topk_weights = topk_weights.to(torch.float32)
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    if out is None:
        out = torch.empty((T, H), dtype=torch.bfloat16, device=dev)
    else:
        _check(out.shape == (T, H) and out.dtype == torch.bfloat16 and out.device == dev and out.is_contiguous(),
               f"out must be a contiguous bfloat16 [{T}, {H}] tensor on {dev}")
    if T == 0:
        return out

    problem = {"tokens": int(T), "hidden": int(H), "inter_dim": int(I), "experts": int(E), "topk": int(k),
               "ep": int(ep)}
    mod = module if module is not None else module_for(variant, [problem], policy=policy, store=store)
    if getattr(mod, "policy", None) == "tiered":
        r = mod.resolve(problem)
        if r.tier == 0:  # the tuned kernels are still compiling: the no-compile path, same function
            return torch_moe(x, w13, w2, topk_weights, topk_ids, activation, out=out, a_scale=a_scale,
                             w13_scale=w13_scale, a2_scale=a2_scale, w2_scale=w2_scale)
        fns = r.fns
    else:
        fns = mod.dispatch(problem)
    s1, s2 = fns["stage1"], fns["stage2"]

    rows = T * k
    act_dtype = torch.bfloat16 if variant == "bf16" else w13.dtype
    act = torch.empty((rows, I), dtype=act_dtype, device=dev)
    if variant == "fp8b128":  # stage 1 writes act's 1x128 scales here (grouped by expert); stage 2 reads them
        a2_scale = torch.empty((rows * (I // BLOCK),), dtype=torch.float32, device=dev)
    offsets = torch.empty((E + 1,), dtype=torch.int32, device=dev)
    sorted_pos = torch.empty((rows,), dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
    act_code = ACTIVATIONS[activation]

    ws1 = ctypes.c_size_t(0)
    _call(s1, "stage1 size query", x.data_ptr(), topk_ids.data_ptr(), topk_weights.data_ptr(), w13.data_ptr(),
          act.data_ptr(), offsets.data_ptr(), sorted_pos.data_ptr(), T, k, E, H, I, act_code,
          _ptr(a_scale), _ptr(w13_scale), _ptr(a2_scale), None, ctypes.byref(ws1), None)
    ws2 = ctypes.c_size_t(0)
    _call(s2, "stage2 size query", act.data_ptr(), w2.data_ptr(), out.data_ptr(), offsets.data_ptr(),
          sorted_pos.data_ptr(), T, k, E, H, I, _ptr(a2_scale), _ptr(w2_scale), None, ctypes.byref(ws2), None)
    ws = torch.empty((max(ws1.value, ws2.value),), dtype=torch.uint8, device=dev)
    ws1.value = ws2.value = ws.numel()
    _call(s1, "stage1", x.data_ptr(), topk_ids.data_ptr(), topk_weights.data_ptr(), w13.data_ptr(),
          act.data_ptr(), offsets.data_ptr(), sorted_pos.data_ptr(), T, k, E, H, I, act_code,
          _ptr(a_scale), _ptr(w13_scale), _ptr(a2_scale), ws.data_ptr(), ctypes.byref(ws1), stream)
    _call(s2, "stage2", act.data_ptr(), w2.data_ptr(), out.data_ptr(), offsets.data_ptr(),
          sorted_pos.data_ptr(), T, k, E, H, I, _ptr(a2_scale), _ptr(w2_scale), ws.data_ptr(),
          ctypes.byref(ws2), stream)
    return out


def _is_block_scaled(w13_scale, w13) -> bool:
    """True when ``w13_scale`` has the 128x128-block shape [E, 2I/128, H/128] (variant fp8b128)."""
    return getattr(w13_scale, "dim", lambda: 0)() == 3 and getattr(w13, "dim", lambda: 0)() == 3


def _check_b128(x, w13, w2, a_scale, w13_scale, a2_scale, w2_scale) -> None:
    import torch
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    dev = x.device
    _check(H % BLOCK == 0 and I % BLOCK == 0,
           f"128-block fp8 needs H={H} and I={I} to be multiples of {BLOCK} (the scale block)")
    for nm, s, shape in (("w13_scale", w13_scale, (E, two_i // BLOCK, H // BLOCK)),
                         ("w2_scale", w2_scale, (E, H // BLOCK, I // BLOCK))):
        _check(isinstance(s, torch.Tensor) and tuple(s.shape) == shape,
               f"128-block fp8 needs {nm} of shape {list(shape)} ([E, N/128, K/128]), got "
               f"{list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        _check(s.dtype == torch.float32 and s.device == dev and s.is_contiguous(),
               f"{nm} must be a contiguous float32 tensor on {dev}, got {s.dtype} on {s.device}")
    _check(a2_scale is None, "128-block fp8 quantizes stage 2's input on the GPU (per routed row, per 128 "
                             "channels): pass a2_scale=None")
    if x.dtype == torch.bfloat16:
        _check(a_scale is None, "hidden_states is bfloat16, so it is quantized on the GPU (per token, per 128 "
                                "channels): pass a_scale=None, or pass float8_e4m3fn hidden_states with "
                                "a_scale [T, H/128]")
    else:
        _check(isinstance(a_scale, torch.Tensor) and tuple(a_scale.shape) == (T, H // BLOCK),
               f"float8_e4m3fn hidden_states need a_scale of shape [T, H/128] = [{T}, {H // BLOCK}], got "
               f"{list(a_scale.shape) if isinstance(a_scale, torch.Tensor) else a_scale}")
        _check(a_scale.dtype == torch.float32 and a_scale.device == dev and a_scale.is_contiguous(),
               f"a_scale must be a contiguous float32 tensor on {dev}, got {a_scale.dtype} on {a_scale.device}")


def quantize_1x128(v, dtype=None):
    """Per-row, per-128-column e4m3 quantization the way the fp8b128 kernels do it: (q [.., K] float8_e4m3fn,
    scale [.., K/128] float32) with scale = amax / 448 (1 for an all-zero block) and q = v * (1 / scale)
    saturated to +-448, in float32."""
    import torch
    shp = v.shape
    f = v.float().reshape(*shp[:-1], shp[-1] // BLOCK, BLOCK)
    amax = f.abs().amax(dim=-1)
    # tensor / tensor: an IEEE division like the kernels' (torch divides a CUDA tensor by a python scalar as a
    # multiplication by its reciprocal, 1 ulp off for ~60 % of the blocks, enough to flip ~0.2 % of the e4m3
    # roundings of bf16 inputs, whose products often land exactly on rounding ties)
    s = torch.where(amax > 0, amax / torch.full_like(amax, 448.0), torch.ones_like(amax))
    inv = torch.ones_like(s) / s
    q = (f * inv[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(shp)
    return q, s


def dequant_blocks(w, scale, dtype=None):
    """Weights in ``dtype`` (float32) from e4m3 ``w`` [E, N, K] and 128x128 block scales [E, N/128, K/128]."""
    import torch
    dtype = dtype or torch.float32
    s = scale.to(dtype).repeat_interleave(BLOCK, dim=1).repeat_interleave(BLOCK, dim=2)
    return w.to(dtype) * s[:, :w.shape[1], :w.shape[2]]


def torch_moe(hidden_states, w13, w2, topk_weights, topk_ids, activation: str = "silu", *, out=None,
              a_scale=None, w13_scale=None, a2_scale=None, w2_scale=None):
    """Tier 0: the same function from what the installed torch ships, with nothing to compile.

    bf16 with ``torch._grouped_mm`` (torch >= 2.8 on Hopper): GPU routing (argsort, per-expert offsets), two
    grouped GEMMs and an ``index_add_`` combine, with no host sync, so it can be captured in a CUDA graph.
    Otherwise (fp8, 128-block fp8, or no grouped GEMM) a per-expert loop, weights dequantized per active expert
    (per-expert scales, or 128x128 block scales; e4m3 hidden states with a_scale [T, H/128] are dequantized
    too): correct, slower, and it synchronizes with the host once per call.
    """
    import torch
    F = torch.nn.functional
    act_fn = F.silu if activation == "silu" else F.gelu
    x = hidden_states
    T, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))  # skipped picks sort last
    order = torch.argsort(key, stable=True)
    tok = order // k
    if w13.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and x.is_cuda:
        counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device).scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.int32))
        offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
        h = torch._grouped_mm(x.index_select(0, tok), w13.transpose(-2, -1), offs=offs)
        a = act_fn(h[:, :I]) * h[:, I:] * topk_weights.reshape(-1)[order].to(h.dtype)[:, None]
        y = torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)
        y = torch.where((key[order] < E)[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
        res = torch.zeros_like(x) if out is None else out.zero_()
        return res.index_add_(0, tok, y)
    res = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()
    block = _is_block_scaled(w13_scale, w13)
    xf = x.float()
    if block and x.dtype != torch.bfloat16 and a_scale is not None:  # e4m3 input with 1x128 scales
        xf = xf * a_scale.float().repeat_interleave(BLOCK, dim=1)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        t = sel // k
        if block:
            a13 = dequant_blocks(w13[e:e + 1], w13_scale[e:e + 1])[0]
            a2 = dequant_blocks(w2[e:e + 1], w2_scale[e:e + 1])[0]
        else:
            a13 = w13[e].float() * (w13_scale[e].float() if w13_scale is not None else 1.0)
            a2 = w2[e].float() * (w2_scale[e].float() if w2_scale is not None else 1.0)
        h = xf[t] @ a13.t()
        a = act_fn(h[:, :I]) * h[:, I:] * topk_weights.reshape(-1)[sel].float()[:, None]
        res.index_add_(0, t, a @ a2.t())
    if out is None:
        return res.to(torch.bfloat16)
    return out.copy_(res)


def reference_moe(hidden_states, w13, w2, topk_weights, topk_ids, activation: str = "silu", *,
                  a_scale=None, w13_scale=None, a2_scale=None, w2_scale=None, dtype=None,
                  quantize_acts: bool = True):
    """Plain torch reference in float32 (or ``dtype``), per token-expert pair; ids outside [0, E) skipped.

    fp8: ``w13_scale``/``w2_scale`` dequantize the weights; given ``a_scale``/``a2_scale`` too, the reference
    also rounds x and the routed, weighted activation to e4m3 the way the kernels do (kernel-exact check).

    128-block fp8 (``w13_scale`` [E, 2I/128, H/128], ``w2_scale`` [E, H/128, I/128]): the weights are
    dequantized per 128x128 block; e4m3 ``hidden_states`` with ``a_scale`` [T, H/128] are dequantized. With
    ``quantize_acts`` (default) bf16 hidden states and the routed, weighted activation are quantized per row per
    128 channels exactly as the kernels do (:func:`quantize_1x128`; stage 1's output rounded to bf16 first):
    the kernel-exact reference. ``quantize_acts=False``: no activation quantization (the "model" reference).
    """
    import torch
    dtype = dtype or torch.float32
    if _is_block_scaled(w13_scale, w13):
        return _reference_b128(hidden_states, w13, w2, topk_weights, topk_ids, activation, a_scale, w13_scale,
                               w2_scale, dtype, quantize_acts)

    def q8(v, s):
        if s is None:
            return v
        s = s.to(dtype)
        return (v / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(dtype) * s
    E, two_i, H = w13.shape
    I = two_i // 2
    x = q8(hidden_states.to(dtype), a_scale)
    a = w13.to(dtype)
    b = w2.to(dtype)
    if w13_scale is not None:
        a = a * w13_scale.to(dtype).view(E, 1, 1)
        b = b * w2_scale.to(dtype).view(E, 1, 1)
    out = torch.zeros_like(x)
    ids = topk_ids.long()
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ a[e].t()
        if a2_scale is not None:  # the kernels keep stage 1's output in bf16 before quantizing the activation
            h = h.to(torch.bfloat16).to(dtype)
        g, u = h[:, :I], h[:, I:]
        act = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g)
        wts = topk_weights[tok, slot].to(dtype)[:, None]
        if a2_scale is None:
            out.index_add_(0, tok, ((act * u) @ b[e].t()) * wts)
        else:  # the kernels apply the routing weight before quantizing stage 2's input
            out.index_add_(0, tok, q8(act * u * wts, a2_scale) @ b[e].t())
    return out


def _reference_b128(x, w13, w2, topk_weights, topk_ids, activation, a_scale, w13_scale, w2_scale, dtype,
                    quantize_acts):
    import torch
    F = torch.nn.functional
    E, two_i, H = w13.shape
    I = two_i // 2

    def deq(q, s):
        return q.to(dtype) * s.to(dtype).repeat_interleave(BLOCK, dim=-1)
    if x.dtype != torch.bfloat16:  # e4m3 input with its 1x128 scales
        xd = deq(x, a_scale)
    elif quantize_acts:
        xd = deq(*quantize_1x128(x))
    else:
        xd = x.to(dtype)
    a = dequant_blocks(w13, w13_scale, dtype)
    b = dequant_blocks(w2, w2_scale, dtype)
    out = torch.zeros((x.shape[0], H), dtype=dtype, device=x.device)
    ids = topk_ids.long()
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xd[tok] @ a[e].t()
        if quantize_acts:  # the kernels keep stage 1's output in bf16
            h = h.to(torch.bfloat16).to(dtype)
        g, u = h[:, :I], h[:, I:]
        act = F.silu(g) if activation == "silu" else F.gelu(g)
        v = act * u * topk_weights[tok, slot].to(dtype)[:, None]
        if quantize_acts:  # the routing weight is applied before the 1x128 quantization of stage 2's input
            v = deq(*quantize_1x128(v))
        out.index_add_(0, tok, v @ b[e].t())
    return out
