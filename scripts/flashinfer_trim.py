"""Pack a trimmed copy of the installed FlashInfer for the GPU machine (whose calls carry at most 64 MiB).

Kept: every Python/config file of the package (so ``import flashinfer`` and its generator behave as installed),
the include trees FlashInfer's fused_moe_90 compile commands name (cutlass, cccl, spdlog, data/include,
nv_internal), and under data/csrc the module's own sources plus every header file (not the other kernels'
``.cu`` sources or binary payloads). Dropped: compiled payloads (.so, .cubin, .a, ...) and the other modules'
sources, docs and data. Writes a .tar.xz whose members are ``flashinfer/...`` (untar into a site folder), and
prints what it kept and dropped.

    python scripts/flashinfer_trim.py -o .gpu/fi/flashinfer.tar.xz
"""
from __future__ import annotations

import argparse
import lzma
import os
import sys
import tarfile
from pathlib import Path

TEXT = {".py", ".json", ".jinja", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".typed", ".j2", ".in"}
HEADERS = {".h", ".hpp", ".cuh", ".hh", ".inl", ".inc", ".hxx", ".tcc", ".ipp", ""}
INCLUDE_TREES = ["include", "cutlass/include", "cutlass/tools/util/include", "cccl", "spdlog/include",
                 "csrc/nv_internal", "csrc/fused_moe/cutlass_backend"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from jitkiln.flashinfer import source
    pkg = source.package_dir()
    src = source.load_module_source()
    keep: set[Path] = set()
    for s in src.sources:
        p = Path(s)
        if str(p).startswith(str(pkg.resolve())):
            keep.add(p)
    data = pkg / "data"
    for t in INCLUDE_TREES:
        root = data / t
        for f in root.rglob("*"):
            if f.is_file() and (f.suffix in HEADERS or f.suffix in {".cu", ".cpp", ".cc"}):
                keep.add(f.resolve())
    for f in (data / "csrc").rglob("*"):
        if f.is_file() and f.suffix in HEADERS - {""}:
            keep.add(f.resolve())
    dropped = 0
    for f in pkg.rglob("*"):
        if not f.is_file() or "__pycache__" in f.parts:
            continue
        rel = f.relative_to(pkg)
        if rel.parts[0] != "data" and (f.suffix in TEXT or f.name == "py.typed"):
            keep.add(f.resolve())
        elif f.resolve() not in keep:
            dropped += f.stat().st_size
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    size = 0
    with lzma.open(tmp, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for f in sorted(keep):
            try:
                rel = f.relative_to(pkg.resolve())
            except ValueError:
                continue
            size += f.stat().st_size
            tar.add(str(f), arcname=f"flashinfer/{rel}", recursive=False)
        dist = next(pkg.parent.glob("flashinfer_python-*.dist-info"), None)
        if dist is not None:
            tar.add(str(dist), arcname=dist.name)
    os.replace(tmp, out)
    print(f"kept {len(keep)} files ({size / 2**20:.1f} MiB), dropped {dropped / 2**20:.1f} MiB; "
          f"{out} is {out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
