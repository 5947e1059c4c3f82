"""Which of FlashInfer's fused-MoE source files a deployment needs, and why every other one is left out.

Decided from what the files themselves say, read at run time:

* generator output (``*.generated.cu``): the element types of every explicit instantiation in the file
  (``INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM(Sm90, act, weight, out, ...)``, ``template void
  sm80_generic_fused_moe_gemm_kernelLauncher<act, weight, ...>``, ``..._mixed_moe_..._kernelLauncher<act, weight,
  out, ...>``, ``sm90_generic_mixed_gemm_kernelLauncher<act, weight, scale, bias, out, ...>``). A file is needed
  when one of its instantiations has the deployment's (activation, weight, output) types. A file with an
  instantiation this module cannot read is kept (never wrongly dropped).
* runner files (``template class MoeGemmRunner<act, weight, out, ...>;``): needed when they instantiate the
  deployment's runner.
* ``fp8_blockscale_gemm.cu``: only for FP8 block-scale (DeepSeek-style) weights.
* every other file (the binding, the fused-MoE instantiation, common utilities): always.

The binding constructs a runner for every dtype pair; what a trimmed build leaves undefined is stubbed at link
time (:mod:`jitkiln.flashinfer.link`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

# C++ element type spellings -> short names
CTYPES = {
    "__nv_bfloat16": "bf16", "cutlass::bfloat16_t": "bf16", "bfloat16_t": "bf16",
    "half": "fp16", "cutlass::half_t": "fp16", "half_t": "fp16", "__half": "fp16",
    "__nv_fp8_e4m3": "fp8", "cutlass::float_e4m3_t": "fp8",
    "float": "fp32",
    "cutlass::uint4b_t": "int4", "uint4b_t": "int4",
    "uint8_t": "uint8",
    "SafeFP4": "fp4", "Fp4Type": "fp4", "__nv_fp4_e2m1": "fp4", "cutlass::float_e2m1_t": "fp4",
}
DTYPES = ("bf16", "fp16", "fp8", "fp32", "int4", "uint8", "fp4")
_T = r"\s*([\w:]+)\s*"
INSTANTIATION_RES = [
    # (kind, regex, group index of act, weight, out; None: out = act)
    ("sm90_grouped", re.compile(r"INSTANTIATE_TMA_WARP_SPECIALIZED_MOE_GEMM\(\s*\w+\s*," + _T + "," + _T + "," + _T + ","),
     (1, 2, 3)),
    ("sm80_fused_gated", re.compile(r"sm80_generic_fused_moe_gemm_kernelLauncher<" + _T + "," + _T + ","), (1, 2, None)),
    ("sm90_mixed_grouped", re.compile(r"sm90_generic_mixed_moe\w*_kernelLauncher<" + _T + "," + _T + "," + _T + ","),
     (1, 2, 3)),
    ("sm90_fpA_intB", re.compile(r"sm90_generic_mixed_gemm_kernelLauncher<" + _T + "," + _T + "," + _T + "," + _T
                                 + "," + _T + ","), (1, 2, 5)),
]
INSTANTIATION_MARKERS = re.compile(r"^\s*(template\s+void|INSTANTIATE_\w+\()", re.M)
RUNNER_RE = re.compile(r"template\s+class\s+MoeGemmRunner<" + _T + "," + _T + "," + _T + r"[,>]")
BLOCKSCALE_FILE = "fp8_blockscale_gemm.cu"

# Quantization modes this front end plans. ``verified``: checked against FlashInfer on a GPU (or the counts
# FlashInfer's own build gives); others follow the same rule, unverified on a GPU.
QUANTS = {
    "none": "weights and activations in the same 16/32-bit type",
    "fp8": "FP8 e4m3 activations and weights, per-tensor scales",
    "fp8-block": "FP8 e4m3 weights with 128x128 block scales (DeepSeek style); bf16 activations and output",
}


@dataclass(frozen=True)
class Deployment:
    act: str
    weight: str
    out: str
    quant: str = "none"

    @property
    def label(self) -> str:
        q = "" if self.quant == "none" else f", quant {self.quant}"
        return f"activation {self.act}, weight {self.weight}, output {self.out}{q}"

    def runner(self) -> tuple[str, str, str]:
        """MoeGemmRunner<A, W, Out> this deployment's binding constructs."""
        if self.quant == "fp8-block":
            return ("fp8", "fp8", self.out)
        return (self.act, self.weight, self.out)


def parse_dtype(spec: str) -> Deployment:
    """``bf16`` | ``fp16`` | ``fp32`` | ``fp8`` | ``fp8-block`` | ``act=bf16,weight=bf16,out=bf16[,quant=...]``."""
    s = spec.strip().lower().replace("bfloat16", "bf16").replace("float16", "fp16")
    short = {
        "bf16": Deployment("bf16", "bf16", "bf16"), "fp16": Deployment("fp16", "fp16", "fp16"),
        "fp32": Deployment("fp32", "fp32", "fp32"),
        "fp8": Deployment("fp8", "fp8", "bf16", "fp8"), "fp8-block": Deployment("bf16", "fp8", "bf16", "fp8-block"),
        "fp8_block": Deployment("bf16", "fp8", "bf16", "fp8-block"),
    }
    if s in short:
        return short[s]
    kv = {}
    for part in s.split(","):
        k, eq, v = part.partition("=")
        if not eq:
            raise UsageError(f"bad --dtype {spec!r}", hint="give bf16, fp16, fp32, fp8, fp8-block or "
                                                           "act=bf16,weight=bf16,out=bf16[,quant=none]")
        kv[k.strip()] = v.strip()
    unknown = set(kv) - {"act", "weight", "out", "quant"}
    if unknown:
        raise UsageError(f"bad --dtype {spec!r}: unknown key(s) {', '.join(sorted(unknown))}",
                         hint="keys: act, weight, out, quant")
    act = kv.get("act", "bf16")
    d = Deployment(act, kv.get("weight", act), kv.get("out", act if act in ("bf16", "fp16", "fp32") else "bf16"),
                   kv.get("quant", "none"))
    for k in ("act", "weight", "out"):
        if getattr(d, k) not in DTYPES:
            raise UsageError(f"bad --dtype {spec!r}: {k}={getattr(d, k)!r} is not a dtype; known: {', '.join(DTYPES)}")
    if d.quant not in QUANTS:
        raise UsageError(f"bad --dtype {spec!r}: quant={d.quant!r}; known: {', '.join(QUANTS)}")
    return d


# model names this front end knows without a config file -> the dtype their public checkpoints use
MODEL_DTYPES = {"kimi-k2": "fp8-block", "deepseek-v3": "fp8-block", "deepseek-r1": "fp8-block",
                "qwen3-moe": "bf16", "qwen3-30b-a3b": "bf16", "qwen3-235b-a22b": "bf16", "mixtral": "bf16"}


def deployment_from_model(model: str) -> tuple[Deployment, str]:
    """A deployment from an HF ``config.json`` (path, or folder holding one) or a known model name."""
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read model config {p}: {e}") from None
        q = cfg.get("quantization_config") or {}
        dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        base = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}.get(dt)
        if base is None:
            raise UsageError(f"model config {p}: torch_dtype {dt!r} is not one FlashInfer's fused MoE serves")
        if not q:
            return parse_dtype(base), f"{p}: torch_dtype {dt}, no quantization_config"
        method = str(q.get("quant_method", "")).lower()
        if method == "fp8" and q.get("weight_block_size"):
            return (Deployment(base if base != "fp32" else "bf16", "fp8", base if base != "fp32" else "bf16",
                               "fp8-block"), f"{p}: fp8 with weight_block_size {q.get('weight_block_size')}")
        if method == "fp8":
            return Deployment("fp8", "fp8", base, "fp8"), f"{p}: fp8 per-tensor"
        raise UsageError(f"model config {p}: quant_method {method!r} is not planned by this front end "
                         f"(known: none, fp8, fp8 with weight_block_size)",
                         hint="give --dtype explicitly, or build the full module with FlashInfer's own JIT")
    key = model.strip().lower().split("/")[-1]
    for name, dt in MODEL_DTYPES.items():
        if key.startswith(name):
            return parse_dtype(dt), f"known model {name}: {dt}"
    raise UsageError(f"--model {model!r} is neither a config.json (or a folder holding one) nor a known name",
                     hint=f"known names: {', '.join(sorted(MODEL_DTYPES))}; or give --dtype")


# --- reading the files -------------------------------------------------------------------------------------
def _short(ctype: str) -> str:
    return CTYPES.get(ctype, CTYPES.get(ctype.split("::")[-1], f"?{ctype}"))


def instantiations(text: str) -> tuple[set[tuple[str, str, str, str]], int]:
    """({(kind, act, weight, out)}, instantiations left unread) of a generated file."""
    found: set[tuple[str, str, str, str]] = set()
    read = 0
    for kind, rx, (ia, iw, io) in INSTANTIATION_RES:
        for m in rx.finditer(text):
            a, w = _short(m.group(ia)), _short(m.group(iw))
            found.add((kind, a, w, _short(m.group(io)) if io else a))
            read += 1
    return found, max(0, len(INSTANTIATION_MARKERS.findall(text)) - read)


def runners(text: str) -> set[tuple[str, str, str]]:
    return {(_short(a), _short(w), _short(o)) for a, w, o in RUNNER_RE.findall(text)}


@dataclass
class FileDecision:
    source: str  # absolute path
    name: str  # portable name (gen/..., csrc/...)
    needed: bool
    reason: str
    kind: str  # generated | runner | blockscale | support


@dataclass
class Plan:
    module: str
    version: str
    deployment: Deployment
    files: list[FileDecision]
    notes: list[str] = field(default_factory=list)

    @property
    def needed(self) -> list[FileDecision]:
        return [f for f in self.files if f.needed]

    @property
    def left_out(self) -> list[FileDecision]:
        return [f for f in self.files if not f.needed]

    def to_json(self) -> dict:
        return {"module": self.module, "flashinfer": self.version, "deployment": self.deployment.__dict__,
                "needed": [{"file": f.name, "why": f.reason} for f in self.needed],
                "left_out": [{"file": f.name, "reason": f.reason} for f in self.left_out],
                "counts": {"total": len(self.files), "needed": len(self.needed),
                           "generated_total": sum(f.kind == "generated" for f in self.files),
                           "generated_needed": sum(f.kind == "generated" and f.needed for f in self.files)},
                "notes": self.notes}


def plan_files(sources: list[str], name_of, generated_of, deployment: Deployment, module: str = "",
               version: str = "") -> Plan:
    """Decide every file. ``name_of(src)``: portable name; ``generated_of(src)``: whether the generator wrote it."""
    d = deployment
    texts = {s: Path(s).read_text(errors="replace") for s in sources}
    all_runners: set[tuple[str, str, str]] = set()
    for s in sources:
        all_runners |= runners(texts[s])
    want = d.runner()
    if d.quant == "fp8-block" and not any(os.path.basename(s) == BLOCKSCALE_FILE for s in sources):
        raise UsageError(f"FlashInfer {version} has no FP8 block-scale GEMM ({BLOCKSCALE_FILE}) in {module}")
    if want not in all_runners:
        pairs = sorted({f"{a} x {w} -> {o}" for a, w, o in all_runners})
        raise UsageError(f"FlashInfer {version} has no sm90 fused-MoE kernels for {d.label} "
                         f"(no MoeGemmRunner<{', '.join(want)}>)",
                         hint="activation x weight -> output it has: " + "; ".join(pairs))
    if d.quant == "none" and d.act != d.weight:
        raise UsageError(f"{d.label}: a mixed-input deployment (weight-only or W4A8 quantization) is not planned "
                         "by this front end yet",
                         hint="build the full module with FlashInfer's own JIT (optionally with "
                              "FLASHINFER_NVCC_LAUNCHER='jitkiln flashinfer cc')")
    files = []
    for s in sources:
        nm, text = name_of(s), texts[s]
        if generated_of(s):
            inst, unread = instantiations(text)
            if unread or not inst:
                files.append(FileDecision(s, nm, True, f"kept: {unread or 'all'} instantiation(s) this front end "
                                                       "cannot read", "generated"))
                continue
            if d.quant == "fp8-block":
                files.append(FileDecision(s, nm, False, "FP8 block-scale MoE runs the block-scale GEMM "
                                          f"({BLOCKSCALE_FILE}), not generated CUTLASS kernels", "generated"))
                continue
            hit = sorted(k for k, a, w, o in inst if (a, w, o) == (d.act, d.weight, d.out))
            if hit:
                files.append(FileDecision(s, nm, True, f"{', '.join(hit)} kernels for {d.act} x {d.weight} -> {d.out}",
                                          "generated"))
            else:
                has = sorted({f"{k} {a}x{w}->{o}" for k, a, w, o in inst})
                files.append(FileDecision(s, nm, False, "only " + "; ".join(has), "generated"))
            continue
        r = runners(text)
        if r:
            if want in r:
                files.append(FileDecision(s, nm, True, f"MoeGemmRunner<{', '.join(want)}>", "runner"))
            else:
                has = "; ".join(sorted(f"{a}x{w}->{o}" for a, w, o in r))
                files.append(FileDecision(s, nm, False, f"only MoeGemmRunner {has} (stubbed at link)", "runner"))
            continue
        if os.path.basename(s) == BLOCKSCALE_FILE:
            if d.quant == "fp8-block":
                files.append(FileDecision(s, nm, True, "FP8 block-scale GEMM", "blockscale"))
            else:
                files.append(FileDecision(s, nm, False, "FP8 block-scale GEMM: only for block-scaled FP8 weights",
                                          "blockscale"))
            continue
        files.append(FileDecision(s, nm, True, "binding / support unit (every deployment)", "support"))
    return Plan(module, version, d, files)


def plan_module(src, deployment: Deployment) -> Plan:
    """Plan the files of a :class:`~jitkiln.flashinfer.source.ModuleSource`."""
    p = plan_files(src.sources, src.rel, src.generated, deployment, src.name, src.version)
    p.notes.append("--tp/--ep change the GEMM shapes, not the file set: every tile configuration of a dtype pair "
                   "is in the same files and FlashInfer's profiler picks among them at run time")
    return p
