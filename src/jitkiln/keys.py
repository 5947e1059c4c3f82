"""Cache keys, in one place. Every key is a sha256 over length-prefixed parts (:func:`sha256_hex`).

* *unit key*: everything known before compiling: family, instance digest, source text, compiler fingerprint,
  flags, arch, artifact kind and compiler name. Include folders enter by content, through the entry key.
* *entry key*: the unit key plus (portable label, content digest) of every header the compiler read.
* *module key*: a plan's identity: family, variant, full or reduced, the instances, compiler, compile spec.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_hex(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def unit_key(family: str, instance_digest: str, source: str, compiler_fp: str, spec) -> str:
    return sha256_hex("jitkiln-unit-v1", family, instance_digest, source, compiler_fp,
                      canonical_json({"arch": spec.arch, "flags": list(spec.flags), "artifact": spec.artifact,
                                      "toolchain": spec.toolchain}))


def entry_key(ukey: str, deps: Mapping[str, str]) -> str:
    return sha256_hex("jitkiln-entry-v1", ukey, canonical_json(sorted(deps.items())))


def module_key(family: str, variant: str, full: bool, instance_digests: Iterable[str], compiler_fp: str,
               spec) -> str:
    return sha256_hex("jitkiln-module-v1", family, variant, "full" if full else "reduced",
                      canonical_json(sorted(instance_digests)), compiler_fp,
                      canonical_json(dataclasses.asdict(spec) | {"include_dirs": []}))
