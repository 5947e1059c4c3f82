"""moe2stage: two-stage fused MoE for Hopper (CUTLASS sm90 ptr-array grouped GEMM), bf16, fp8 and fp8b128.

Importing this package registers the family; it imports neither torch nor a compiler.
``fused_moe`` / ``module_for`` (:mod:`.torch_ops`) run it on torch CUDA tensors.
"""
from .family import MoE2Stage, cutlass_include_dirs  # noqa: F401  (registers the family)
from .heuristic import SMALL_INTER_DIM, candidates, select  # noqa: F401
from .instances import MoEGemm, MoEStage1, MoEStage2  # noqa: F401
from .shapes import MoEShape, expand_token_range, example_models, parse_tokens  # noqa: F401
from .torch_ops import fused_moe, module_for, reference_moe, torch_moe  # noqa: F401

__all__ = ["MoE2Stage", "MoEShape", "MoEGemm", "MoEStage1", "MoEStage2", "expand_token_range",
           "parse_tokens", "example_models", "candidates", "select", "SMALL_INTER_DIM",
           "cutlass_include_dirs", "fused_moe", "module_for", "reference_moe", "torch_moe"]
