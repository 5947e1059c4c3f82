"""The ck2stages variants: which module of AITER's generator each one is, and how AITER's runtime names it.

A variant is one invocation of AITER's generator (``gen_instances.py -a .. -b .. -c .. -q .. -act .. -m ..
[--preshuffle]``), i.e. one AITER ``module_moe_ck2stages_*`` module. The tag (``a4w4``, ``a8w8_gfx950``...)
is AITER's own, chosen by its generator from the dtypes, the quantisation and the arch.
"""
from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("gfx950", "gfx942")
DEFAULT_CU_NUM = {"gfx950": 256, "gfx942": 304}  # MI355X/MI350X, MI300X (override with CU_NUM, like AITER)
QUANT_INT = {"no": 0, "per_tensor": 1, "per_token": 2, "per_1x32": 3, "per_1x128": 4}
QUANT_NAME = {"no": "QuantType.No", "per_tensor": "QuantType.per_Tensor", "per_token": "QuantType.per_Token",
              "per_1x32": "QuantType.per_1x32", "per_1x128": "QuantType.per_1x128"}
CK_TYPE = {"fp4x2": "FP4X2", "f8": "F8", "i8": "I8", "i4": "I4", "b16": "B16", "f16": "F16"}


def torch_dtype(dt: str, arch: str) -> str:
    """The ``str(torch.dtype)`` AITER writes into its tuned CSVs for a generator dtype on ``arch``."""
    return {"fp4x2": "torch.float4_e2m1fn_x2", "f8": "torch.float8_e4m3fn" if arch == "gfx950"
            else "torch.float8_e4m3fnuz", "i8": "torch.int8", "i4": "torch.int4", "b16": "torch.bfloat16",
            "f16": "torch.float16"}[dt]


@dataclass(frozen=True)
class Variant:
    name: str
    a: str
    b: str
    c: str = "b16"
    quant: str = "no"
    act: str = "silu"
    mul_stage: int = 2  # routed weight applied in stage 2 (AITER's doweight_stage1=False)
    preshuffle: bool = False
    doc: str = ""

    def generator_args(self) -> tuple[str, ...]:
        args = ["-a", self.a, "-b", self.b, "-c", self.c, "-q", self.quant, "-act", self.act,
                "-m", str(self.mul_stage)]
        if self.preshuffle:
            args.append("--preshuffle")
        return tuple(args)

    @property
    def a_eff(self) -> str:
        return "f8" if self.b == "i4" else self.b  # AITER's generator derives the activation dtype from -b

    def dispatch_values(self, stage: int) -> dict:
        """The runtime arguments AITER's ``ck_moe_stage{1,2}`` pass to the heuristic dispatch for this module."""
        return {"x_dtype": CK_TYPE[self.a_eff], "w_dtype": CK_TYPE[self.b], "y_dtype": CK_TYPE[self.c],
                "act_op": int(self.act == "silu") if stage == 1 else 0, "quant": QUANT_INT[self.quant],
                "mul_routed_weight_stage": int(self.mul_stage == stage), "is_shuffled": int(self.preshuffle)}

    def csv_key(self, arch: str) -> dict[str, str]:
        """Columns of AITER's tuned fMoE CSV that identify this module (besides the shape)."""
        return {"act_type": "ActivationType." + self.act.capitalize(),
                "dtype": torch_dtype(self.c, arch), "q_dtype_a": torch_dtype(self.a_eff, arch),
                "q_dtype_w": torch_dtype(self.b, arch), "q_type": QUANT_NAME[self.quant],
                "doweight_stage1": str(int(self.mul_stage == 1))}


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("a4w4", "fp4x2", "fp4x2", quant="per_1x32", preshuffle=True,
            doc="MXFP4 x MXFP4 -> bf16, per_1x32, silu, routed weight in stage 2, preshuffled weights "
                "(the Kimi-K2.5-MXFP4 module)"),
    Variant("a4w4_bns", "fp4x2", "fp4x2", quant="per_1x32",
            doc="MXFP4 x MXFP4 -> bf16, per_1x32, weights not preshuffled"),
    Variant("a8w8", "f8", "f8", quant="per_token", doc="FP8 x FP8 -> bf16, per-token scales"),
    Variant("a8w8_pertensor", "f8", "f8", quant="per_tensor", doc="FP8 x FP8 -> bf16, per-tensor scales"),
    Variant("a8w8_i8", "i8", "i8", quant="per_token", doc="INT8 x INT8 -> bf16, per-token scales"),
    Variant("a8w8blkscale", "f8", "f8", quant="per_1x128", doc="FP8 x FP8 -> bf16, 1x128 block scales"),
    Variant("a8w4", "f8", "i4", quant="per_token", doc="FP8 x INT4 -> bf16, per-token scales"),
    Variant("a16w16", "b16", "b16", c="b16", doc="bf16 x bf16 -> bf16, no quantisation"),
    Variant("a16w16_f16", "f16", "f16", c="f16", doc="fp16 x fp16 -> fp16, no quantisation"),
]}
