"""vLLM's Triton fused MoE as a benchmark peer, read from the vLLM wheel at bench time (nothing of vLLM is stored in
this repository).

``scripts/vllm_fetch.sh DIR`` runs ``pip download vllm==<version> --no-deps`` and extracts two things from the wheel
into DIR: ``fused_moe.py`` (vLLM's ``vllm/model_executor/layers/fused_moe/fused_moe.py``) and its ``configs/``
folder (vLLM's tuned per-GPU kernel configs). :func:`load` parses that one source file and executes, by name,
its Triton kernel ``fused_moe_kernel`` (with the helper it calls, ``write_zeros_to_output``) and its config rule
``get_default_config``; vLLM's module-level imports (its C++ ops, logger, platform) are not executed, so
``envs`` and ``current_platform`` get two small stand-ins (batch-invariant mode off, not ROCm).

What is run, in the order of vLLM's ``fused_experts_impl`` (bf16, no expert map but ``ep`` masking as vLLM's
ignore-invalid-experts path):

1. config: vLLM's tuned ``E=..,N=..,device_name=NVIDIA_H200.json`` where the wheel ships one (the entry with the
   batch size nearest to T, vLLM's rule), else ``get_default_config(T, E, N, K, topk, None)``;
2. expert assignment: vLLM's naive per-pair blocks when ``T * topk * 4 <= E`` and there is no expert
   parallelism (its ``_prepare_expert_assignment``), else ``moe_align_block_size``'s outputs (sorted ids padded
   per expert to the block size, one expert id per block), computed here in torch -- vLLM does this in a CUDA
   op that is **not timed** (its work is done before the timed region: this favours vLLM);
3. timed: ``fused_moe_kernel`` on W13 into cache1 [T, topk, 2I]; SiLU(gate) * up into cache2 (vLLM's
   ``silu_and_mul`` CUDA op; here one Triton pass of the same traffic); with expert parallelism cache3 is
   zeroed (vLLM does it when an expert map is set); ``fused_moe_kernel`` on W2 with the routing weights
   (``MUL_ROUTED_WEIGHT``) into cache3 [T, topk, H]; the top-k sum into the output (vLLM's ``moe_sum`` CUDA op;
   here ``torch.sum`` over the top-k axis). Caches are allocated once, outside the timed region.

fp8 (w8a8, per-tensor static activation scales, per-expert weight scales; :meth:`VllmMoE.run_fp8`): vLLM's
``dtype=fp8_w8a8`` config files and default rule, its swap-AB choice for small M tiles on Hopper, the two
quantizations as Triton passes (see there).
"""
from __future__ import annotations

import ast
import json
import os
import tempfile
import types

KERNELS = ("write_zeros_to_output", "fused_moe_kernel")
CONFIG_RULE = "get_default_config"


class VllmUnavailable(RuntimeError):
    pass


def _extract(src: str, names) -> str:
    tree = ast.parse(src)
    found = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names}
    missing = [n for n in names if n not in found]
    if missing:
        raise VllmUnavailable(f"vLLM's fused_moe.py has no {', '.join(missing)}: another vLLM layout; "
                              f"fetch the version bench/vllm_moe.py was written for (scripts/vllm_fetch.sh)")
    lines = src.splitlines()
    parts = []
    for n in names:  # from the first decorator (@triton.jit) to the end of the function
        node = found[n]
        first = min([d.lineno for d in node.decorator_list] + [node.lineno])
        parts.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n\n".join(parts)


class VllmMoE:
    """vLLM's Triton MoE kernel and config rule, loaded from a folder written by scripts/vllm_fetch.sh."""

    def __init__(self, folder: str):
        import torch
        path = os.path.join(folder, "fused_moe.py")
        if not os.path.isdir(folder) or not os.path.isfile(path):
            raise VllmUnavailable(f"{folder} is not a folder holding vLLM's fused_moe.py: run "
                                  f"scripts/vllm_fetch.sh {folder} (a pip download of vllm) first")
        if _silu_and_mul is None:
            raise VllmUnavailable("Triton is not installed: vLLM's Triton MoE cannot run here")
        src = open(path).read()
        self.version = open(os.path.join(folder, "VERSION")).read().strip() if os.path.exists(
            os.path.join(folder, "VERSION")) else "unknown"
        self.configs_dir = os.path.join(folder, "configs")
        ns = {"__name__": "vllm_fused_moe_extract", "triton": triton, "tl": tl, "torch": torch,
              "envs": types.SimpleNamespace(VLLM_BATCH_INVARIANT=False),
              "current_platform": types.SimpleNamespace(is_rocm=lambda: False),
              "next_power_of_2": lambda n: 1 << (max(int(n), 1) - 1).bit_length(),
              "should_moe_wna16_use_cuda": lambda *a, **k: False}
        # Triton reads a kernel's source back through its file: the extract is written to a file of its own
        code = f"# extracted at bench time from {path} (vLLM {self.version})\n" + _extract(src, KERNELS + (CONFIG_RULE,))
        xpath = os.path.join(tempfile.mkdtemp(prefix="vllm-moe-"), "vllm_fused_moe_extract.py")
        with open(xpath, "w") as f:
            f.write(code)
        exec(compile(code, xpath, "exec"), ns)  # noqa: S102 - vLLM's own code, from its wheel
        self.kernel = ns["fused_moe_kernel"]
        self.default_config = ns[CONFIG_RULE]
        self._tl = tl
        self._triton = triton
        self._act = _silu_and_mul

    # --- config (vLLM's rule) ----------------------------------------------------------------------------------
    def config(self, T: int, E: int, N: int, K: int, topk: int, device_name: str,
               dtype: str | None = None) -> tuple[dict, str]:
        """vLLM's rule: its tuned file for (E, N, device[, dtype]) at the nearest batch size, else its default."""
        dev = "NVIDIA_H200" if "H200" in device_name.replace(" ", "_").split("_") else device_name.replace(" ", "_")
        fname = f"E={E},N={N},device_name={dev}{f',dtype={dtype}' if dtype else ''}.json"
        p = os.path.join(self.configs_dir, fname)
        if os.path.exists(p):
            table = {int(k): v for k, v in json.load(open(p)).items() if k != "triton_version"}
            return dict(table[min(table, key=lambda m: abs(m - T))]), f"tuned {fname}"
        return dict(self.default_config(T, E, N, K, topk, dtype, None)), "get_default_config"

    # --- expert assignment (untimed) ---------------------------------------------------------------------------
    def assign(self, ids, block_m: int, e_global: int, ep: int):
        """(sorted_token_ids or None, expert_ids, num_tokens_post_padded, EM) as vLLM's kernel reads them."""
        import torch
        T, k = ids.shape
        n = ids.numel()
        dev = ids.device
        if ep == 1 and T * k * 4 <= e_global:  # vLLM's naive block assignment: one block per pair
            return None, ids.reshape(-1).to(torch.int32), torch.full((1,), n * block_m, dtype=torch.int32,
                                                                       device=dev), n * block_m
        flat = ids.reshape(-1).long()
        valid = flat >= 0
        max_pad = n + e_global * (block_m - 1)
        if n < e_global:
            max_pad = min(n * block_m, max_pad)
        sorted_ids = torch.full((max_pad,), n, dtype=torch.int32, device=dev)
        blocks = (max_pad + block_m - 1) // block_m
        expert_ids = torch.full((blocks,), -1, dtype=torch.int32, device=dev)
        key = torch.where(valid, flat, torch.full_like(flat, e_global))
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(flat[valid], minlength=e_global)
        padded = (counts + block_m - 1) // block_m * block_m
        starts = torch.cumsum(padded, 0) - padded
        cstarts = torch.cumsum(counts, 0) - counts
        nvalid = int(valid.sum())
        sk = key[order][:nvalid]
        pos = starts[sk] + (torch.arange(nvalid, device=dev) - cstarts[sk])
        sorted_ids[pos] = order[:nvalid].to(torch.int32)
        total = int(padded.sum())
        nb = total // block_m
        eb = torch.repeat_interleave(torch.arange(e_global, device=dev), padded // block_m)
        expert_ids[:nb] = eb.to(torch.int32)
        EM = max_pad
        if T < block_m:
            EM = min(max_pad, T * k * block_m)
        return sorted_ids, expert_ids, torch.tensor([total], dtype=torch.int32, device=dev), EM

    # --- the timed path ----------------------------------------------------------------------------------------
    def _gemm(self, A, B, C, topk_weights, assign, mul_routed_weight: bool, top_k: int, config: dict,
              a_scale=None, b_scale=None):
        sorted_ids, expert_ids, ntp, EM = assign
        fp8 = b_scale is not None
        cfg = dict(config)
        cfg["SPLIT_K"] = 1
        bk = cfg.pop("BLOCK_SIZE_K")
        grid = (self._triton.cdiv(EM, cfg["BLOCK_SIZE_M"]) * self._triton.cdiv(B.size(1), cfg["BLOCK_SIZE_N"]),)
        self.kernel[grid](
            A, B, C, None, a_scale, b_scale, topk_weights, sorted_ids, expert_ids, ntp,
            B.size(1), B.size(2), EM, A.size(0) * top_k,
            A.stride(0), A.stride(1), B.stride(0), B.stride(2), B.stride(1), C.stride(1), C.stride(2),
            0, 0, b_scale.stride(0) if fp8 else 0, 0, 0, 0, 0, 0, 0,
            MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=self._tl.bfloat16,
            use_fp8_w8a8=fp8, use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False,
            naive_block_assignment=sorted_ids is None, HAS_BIAS=False, BLOCK_SIZE_K=bk,
            # vLLM's enable_swap_ab (fp8 on Hopper, small M tile)
            SWAP_AB=fp8 and cfg["BLOCK_SIZE_M"] < 64 and cfg["BLOCK_SIZE_N"] >= 64,
            USE_TD=False, **cfg)

    def run(self, x, w13, w2, topk_w, ids, assign, config, caches, out, ep: int):
        T, H = x.shape
        k = ids.shape[1]
        two_i = w13.shape[1]
        c1, c2, c3 = caches
        self._gemm(x, w13, c1, topk_w, assign, False, k, config)
        n = T * k
        self._act[(n, self._triton.cdiv(two_i // 2, 1024))](c1, c2, two_i // 2, BLOCK=1024)
        if ep > 1:
            c3.zero_()
        self._gemm(c2, w2, c3, topk_w, assign, True, 1, config)
        return __import__("torch").sum(c3, dim=1, out=out)

    def run_fp8(self, x, w13, w2, topk_w, ids, assign, config, caches, out, ep: int, a1, s13, a2, s2):
        """vLLM's fp8 w8a8 per-tensor path: x quantized with the static a1 (one Triton pass, for vLLM's
        scaled_fp8_quant), fused_moe_kernel on e4m3 W13 with a1 and the per-expert s13, SiLU-and-mul and the static
        a2 quantization in one Triton pass (vLLM runs two ops: this favours it), fused_moe_kernel on e4m3 W2, sum."""
        T, H = x.shape
        k = ids.shape[1]
        two_i = w13.shape[1]
        c1, c2, c3, qx = caches
        n = x.numel()
        _quant_fp8[(self._triton.cdiv(n, 4096),)](x, qx, a1, n, BLOCK=4096)
        self._gemm(qx, w13, c1, topk_w, assign, False, k, config, a1, s13)
        _silu_mul_quant[(T * k, self._triton.cdiv(two_i // 2, 1024))](c1, c2, a2, two_i // 2, BLOCK=1024)
        if ep > 1:
            c3.zero_()
        self._gemm(c2, w2, c3, topk_w, assign, True, 1, config, a2, s2)
        return __import__("torch").sum(c3, dim=1, out=out)

    @staticmethod
    def caches_fp8(T, k, H, I, dev):
        import torch
        c1 = torch.empty((T, k, 2 * I), dtype=torch.bfloat16, device=dev)
        c2 = torch.empty((T * k, I), dtype=torch.float8_e4m3fn, device=dev)
        c3 = torch.empty((T, k, H), dtype=torch.bfloat16, device=dev)
        qx = torch.empty((T, H), dtype=torch.float8_e4m3fn, device=dev)
        return c1, c2, c3, qx

    @staticmethod
    def caches(T, k, H, I, dev):
        import torch
        c1 = torch.empty((T, k, 2 * I), dtype=torch.bfloat16, device=dev)
        c2 = torch.empty((T * k, I), dtype=torch.bfloat16, device=dev)
        c3 = torch.empty((T, k, H), dtype=torch.bfloat16, device=dev)
        return c1, c2, c3


try:  # the stand-in for vLLM's silu_and_mul CUDA op (one pass: read gate and up, write the product)
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_and_mul(inp, outp, n_half, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_half
        g = tl.load(inp + row * 2 * n_half + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(inp + row * 2 * n_half + n_half + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(outp + row * n_half + cols, (g / (1.0 + tl.exp(-g)) * u).to(tl.bfloat16), mask=m)

    @triton.jit
    def _quant_fp8(inp, outp, scale, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(inp + offs, mask=m, other=0.0).to(tl.float32) / tl.load(scale)
        tl.store(outp + offs, tl.clamp(v, -448.0, 448.0).to(tl.float8e4nv), mask=m)

    @triton.jit
    def _silu_mul_quant(inp, outp, scale, n_half, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_half
        g = tl.load(inp + row * 2 * n_half + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(inp + row * 2 * n_half + n_half + cols, mask=m, other=0.0).to(tl.float32)
        v = (g / (1.0 + tl.exp(-g)) * u).to(tl.bfloat16).to(tl.float32) / tl.load(scale)
        tl.store(outp + row * n_half + cols, tl.clamp(v, -448.0, 448.0).to(tl.float8e4nv), mask=m)
except ImportError:  # no Triton: load() fails with VllmUnavailable
    _silu_and_mul = _quant_fp8 = _silu_mul_quant = None


def load(folder: str) -> VllmMoE:
    return VllmMoE(folder)


def load_or_exit(folder: str, prog: str) -> VllmMoE:
    """``load``, or exit with ``prog: <why>`` in one line (the bench and probe scripts' --vllm)."""
    try:
        return VllmMoE(folder)
    except VllmUnavailable as e:
        raise SystemExit(f"{prog}: {e}") from None
