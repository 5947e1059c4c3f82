"""Built-in kernel families: ``demo`` (a small tiled GEMM for the engine's tests), ``moe2stage`` (CUTLASS sm90
two-stage MoE) and ``ck2stages`` (AITER's CK two-stage MoE for AMD, planned from AITER's own generator)."""
