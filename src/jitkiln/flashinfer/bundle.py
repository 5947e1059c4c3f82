"""``jitkiln flashinfer prebuild`` / ``seed``: ship a built trimmed module signed, install it where FlashInfer's
loader finds a prebuilt module, with no compiler, no ninja and no FlashInfer import on the seeding machine.

The manifest names the module, the FlashInfer version, the arch, the deployment (dtypes) and the sha256 of every
FlashInfer source file the module was compiled from (paths relative to the package). ``seed`` refuses a bundle
whose signature, digest, FlashInfer version or any of those sources differ from this machine's FlashInfer, before
writing anything; then the module and its side file are renamed into FlashInfer's ``data/aot/<module>/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..fleet import modbundle
from ..fleet.modbundle import BundleRefused
from . import source

FORMAT = "jitkiln-flashinfer-bundle"
VERSION = 1


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def prebuild(plan, src: source.ModuleSource, store, out: str, key: str | None = None, jobs: int | None = None) -> dict:
    from . import build
    modbundle.signer(key)  # refuse before compiling when there is no key
    with tempfile.TemporaryDirectory(prefix="jk-fi-prebuild-") as d:
        s = build.build(plan, src, store, jobs=jobs, out=d)
        so = Path(s["path"])
        pkg = source.package_dir().resolve()
        sources = {}
        for f in plan.needed:
            p = Path(f.source).resolve()
            if str(p).startswith(str(pkg) + os.sep):
                sources[str(p.relative_to(pkg))] = _digest(p)
        man = {"format": FORMAT, "version": VERSION, "module": src.name, "flashinfer": src.version,
               "arch": "sm_90a", "deployment": plan.deployment.__dict__, "sources": sources,
               "files": s["files"], "stubbed": s["stubbed"],
               "side": {k: v for k, v in s.items() if k not in ("results", "path")}}
        modbundle.write(out, man, so.name, so.read_bytes(), key)
    return {"bundle": out, "module": src.name, "files": s["files"], "compiled": s["compiled"],
            "cache_hits": s["cache_hits"], "wall_s": s["wall_s"]}


def seed(path: str, trust_paths: list[str] | None = None) -> dict:
    man, data = modbundle.read(path, modbundle.trust(trust_paths), FORMAT, VERSION, "FlashInfer")
    here = source.flashinfer_version()
    if here != man.get("flashinfer"):
        raise BundleRefused(f"the bundle was built for FlashInfer {man.get('flashinfer')}, this machine has {here}",
                            hint="build the bundle with the FlashInfer version the servers run")
    pkg = source.package_dir()
    for rel, want in sorted((man.get("sources") or {}).items()):
        p = pkg / rel
        if not p.is_file() or _digest(p) != want:
            raise BundleRefused(f"this machine's FlashInfer differs from the builder's: {rel} "
                                f"{'is missing' if not p.is_file() else 'has other content'}",
                                hint="install the same FlashInfer build on both, or rebuild here with "
                                     "`jitkiln flashinfer build`")
    target = source.aot_path(man["module"])
    if man["so"]["name"] != target.name:
        raise BundleRefused(f"{path}: the module file {man['so']['name']} is not {target.name}")
    side = target.with_suffix(".jitkiln.json")
    modbundle.install(json.dumps(dict(man["side"], seeded_from=str(path)), indent=1).encode(), side)
    modbundle.install(data, target)
    return {"installed": str(target), "module": man["module"], "deployment": man["deployment"]}
