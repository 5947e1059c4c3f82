"""A signed bundle of one finished module, for front ends whose library loads a prebuilt ``.so`` (AITER's JIT
folder, FlashInfer's AOT folder): a plain tar of exactly three regular files::

    manifest.json   the front end's fields (format, version, what the module is for) and ``so``: name, sha256, size
    manifest.sig    ed25519 over the exact bytes of manifest.json (the builder's JITKILN_SIGNING_KEY / --key)
    <name>.so       the module

:func:`read` checks everything (members, signature by a trusted key, format and version, digest) before the
caller checks its own fields; nothing is written until the caller installs it with :func:`install` (temp file
beside the target, renamed into place).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

from ..errors import JitkilnError, UsageError
from . import signing

MAX_SO = 4 << 30


class BundleRefused(JitkilnError):
    exit_code = 8


def signer(key: str | None) -> signing.Signer:
    path = key or os.environ.get("JITKILN_SIGNING_KEY")
    if not path:
        raise UsageError("a bundle must be signed, and no signing key was given",
                         hint="create one with `jitkiln keygen -o KEY`, then pass --key KEY or set "
                              "JITKILN_SIGNING_KEY")
    return signing.Signer.from_file(path)


def trust(extra: list[str] | None = None) -> signing.TrustStore:
    t = signing.TrustStore.from_paths(os.environ.get("JITKILN_TRUST_KEYS"))
    for p in extra or []:
        for _kid, raw in signing.TrustStore.from_paths([p]).keys.items():
            t.add(raw, p)
    return t


def write(out: str | os.PathLike, manifest: dict, so_name: str, data: bytes, key: str | None = None) -> str:
    """Sign ``manifest`` (plus the module's digest) and write the bundle atomically."""
    sg = signer(key)
    man = dict(manifest, so={"name": so_name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    man.setdefault("created", time.time())
    mbytes = json.dumps(man, indent=2, sort_keys=True).encode()
    sig = json.dumps(sg.sign_bytes(mbytes)).encode()
    tmp = Path(f"{out}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w") as tf:
            for name, blob in (("manifest.json", mbytes), ("manifest.sig", sig), (so_name, data)):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(blob), 0o644, int(man["created"])
                tf.addfile(ti, io.BytesIO(blob))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out)


def read(path: str, trust_store, fmt: str, version: int, what: str) -> tuple[dict, bytes]:
    """Check a bundle completely; returns (manifest, module bytes). Writes nothing."""
    try:
        tf = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as e:
        raise BundleRefused(f"{path} is not a jitkiln {what} bundle ({e})") from None
    files: dict[str, bytes] = {}
    with tf:
        for m in tf.getmembers():
            if not m.isreg() or "/" in m.name or m.name.startswith(".") or m.name in files:
                raise BundleRefused(f"{path}: unexpected member {m.name!r} (only manifest.json, manifest.sig and "
                                    "one .so are allowed)")
            if m.size > MAX_SO:
                raise BundleRefused(f"{path}: member {m.name} is too large ({m.size} bytes)")
            files[m.name] = tf.extractfile(m).read()
    if "manifest.json" not in files or "manifest.sig" not in files:
        raise BundleRefused(f"{path}: manifest.json or manifest.sig is missing")
    try:
        sig = json.loads(files["manifest.sig"])
        man = json.loads(files["manifest.json"])
    except ValueError as e:
        raise BundleRefused(f"{path}: malformed manifest ({e})") from None
    if not trust_store:
        raise BundleRefused("no trusted keys: set JITKILN_TRUST_KEYS (or --trust) to the builders' .pub files",
                            hint="a bundle is only installed when its signature verifies")
    try:
        trust_store.verify_bytes(files["manifest.json"], sig, f"bundle {path}")
    except signing.SignatureError as e:
        raise BundleRefused(str(e), hint=e.hint) from None
    if man.get("format") != fmt or man.get("version") != version:
        raise BundleRefused(f"{path}: format {man.get('format')} v{man.get('version')}, expected {fmt} v{version}")
    so = man.get("so") if isinstance(man.get("so"), dict) else {}
    so_name = so.get("name", "")
    if so_name not in files or set(files) - {"manifest.json", "manifest.sig", so_name}:
        raise BundleRefused(f"{path}: members {sorted(files)} do not match the manifest's module {so_name!r}")
    data = files[so_name]
    if hashlib.sha256(data).hexdigest() != so.get("sha256") or len(data) != so.get("size"):
        raise BundleRefused(f"{path}: {so_name} does not match its signed digest")
    return man, data


def install(data: bytes, target: Path) -> Path:
    """The module at ``target``, whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
