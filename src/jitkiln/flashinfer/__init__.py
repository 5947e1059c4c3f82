"""Front end for FlashInfer's CUTLASS fused MoE (``fused_moe_90``, what ``flashinfer.fused_moe.cutlass_fused_moe``
JIT-compiles on Hopper): plan the files a deployment needs from FlashInfer's own spec and generator output, build
each once through jitkiln's content-addressed store, link the module with generated stubs for what was not built,
and place it where FlashInfer's own loader looks for a prebuilt module (``flashinfer/data/aot/<name>/<name>.so``).

Modules:

* :mod:`.source`  - the installed FlashInfer: version gate, its ``JitSpec`` and ``build.ninja`` compile edges
* :mod:`.planner` - deployment (activation, weight, output dtypes, quantization) -> needed files, with reasons
* :mod:`.objcache` - one compile command -> a content-addressed object (source text, headers read, normalized
  flags, compiler bytes); shared by the builder and the ``jitkiln-cc`` launcher
* :mod:`.link`    - undefined-symbol stubs, link, atomic placement
* :mod:`.cc`      - the compiler launcher for ``FLASHINFER_NVCC_LAUNCHER`` / ``FLASHINFER_CXX_LAUNCHER``
* :mod:`.cli`     - ``jitkiln flashinfer plan|build|cc``
"""
from __future__ import annotations

# FlashInfer versions whose fused-MoE file list, generator output and binding this front end was checked on.
VERIFIED_VERSIONS = ("0.7.2.post1",)
