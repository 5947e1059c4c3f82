"""Signed bundles: ``jitkiln prebuild`` writes exactly a plan's instances; ``jitkiln seed`` imports them.

A bundle is an uncompressed tar (artifacts are already dense)::

    manifest.json                  format, family, variant, arch, toolchain, module key, and per instance:
                                   name, unit key, key, header deps, artifact and meta digests and sizes
    manifest.sig                   {"key_id", "sig"}: ed25519 over the exact bytes of manifest.json
    objects/<key>/artifact         the loadable artifact
    objects/<key>/meta.json        its metadata, itself signed (as entries in the remote caches are)

``seed`` checks everything before it writes anything: only regular files with the names above (no links,
no absolute or ``..`` paths, no duplicates, nothing else), the manifest signature by a trusted key, the
toolchain and arch, every digest and size, every key (recomputed from unit key and deps) and every entry
signature. Only then are the entries published, each atomically, so a refused bundle leaves the cache
exactly as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from ..errors import JitkilnError, UsageError
from ..family import get_family
from ..headers import HeaderLabels
from ..keys import entry_key
from ..plan import find_compiler
from ..store import Store, remove_dir
from .signing import SignatureError, Signer, TrustStore

FORMAT = "jitkiln-bundle"
VERSION = 1
_NAME = re.compile(r"(manifest\.json|manifest\.sig|objects/([0-9a-f]{64})/(artifact|meta\.json))")
MAX_MANIFEST = 64 << 20


class BundleRefused(JitkilnError):
    exit_code = 8


def signer_for(path: str | None) -> Signer:
    path = path or os.environ.get("JITKILN_SIGNING_KEY")
    if not path:
        raise UsageError("a bundle must be signed, and no signing key was given",
                         hint="create one with `jitkiln keygen -o ~/.config/jitkiln/signing.key`, then pass "
                              "--key PATH or set JITKILN_SIGNING_KEY")
    return Signer.from_file(path)


def trust_for(extra: list[str] | None, signer_path: str | None = None) -> TrustStore:
    ts = TrustStore.from_paths(os.environ.get("JITKILN_TRUST_KEYS"))
    for t in extra or []:
        for kid, raw in TrustStore.from_paths([t]).keys.items():
            ts.add(raw, t)
    sk = signer_path or os.environ.get("JITKILN_SIGNING_KEY")
    if sk and os.path.exists(sk):
        s = Signer.from_file(sk)
        ts.add(s.raw_public, sk)
    return ts


# --- write -------------------------------------------------------------------------------------------------
def write_bundle(out: str | os.PathLike, plan, store: Store, signer) -> dict[str, Any]:
    """Write every unit of ``plan`` (all must be in ``store``) into a signed bundle at ``out``."""
    labels = HeaderLabels(plan.spec, plan.compiler)
    entries, files = [], []
    for u in plan.units:
        e = store.lookup(u.ukey, labels.digest)
        if e is None:
            raise JitkilnError(f"{u.instance.name} is not in the cache after the build",
                               hint="run the build again; see `jitkiln report`")
        data = store.read_verified(e)
        deps = next((r["deps"] for r in reversed(store.read_manifest(u.ukey)) if r.get("key") == e.key), None)
        if deps is None:
            raise JitkilnError(f"the cache has no manifest record for {u.instance.name}",
                               hint="run the build again to record it")
        meta = signer.sign_meta(dict(e.meta))
        meta_bytes = json.dumps(meta, indent=1, sort_keys=True).encode()
        entries.append({"name": u.instance.name, "ukey": u.ukey, "key": e.key, "deps": deps,
                        "artifact_sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                        "meta_sha256": hashlib.sha256(meta_bytes).hexdigest(), "meta_size": len(meta_bytes)})
        files.append((f"objects/{e.key}/artifact", data))
        files.append((f"objects/{e.key}/meta.json", meta_bytes))
    manifest = {"format": FORMAT, "version": VERSION, "family": plan.family.name, "variant": plan.variant,
                "arch": plan.spec.arch, "toolchain": plan.compiler_fp, "module_key": plan.module_key,
                "created": time.time(), "host": os.uname().nodename, "instances": entries}
    mbytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    sig = json.dumps(signer.sign_bytes(mbytes)).encode()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for name, data in [("manifest.json", mbytes), ("manifest.sig", sig)] + files:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, int(manifest["created"])
                tf.addfile(ti, io.BytesIO(data))
        os.replace(tmp, out)
    except OSError as e:
        raise UsageError(f"cannot write the bundle {out}: {e.strerror or e}",
                         hint="give -o a file path in an existing, writable folder") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return manifest


# --- read and check ------------------------------------------------------------------------------------------
def read_bundle(path: str | os.PathLike, trust, precheck=None) -> tuple[dict, dict[str, tuple[bytes, dict]]]:
    """Open and fully verify a bundle: (manifest, {key: (artifact, meta)}). Raises BundleRefused.

    Bounded: the manifest and its signature come first and are checked before any other member is read; every
    member then must be one the signed manifest lists, and is read only up to the size the manifest gives it
    (a member of another size is refused without reading it)."""
    path = Path(path)
    what = f"bundle {path}"
    if path.is_dir():
        raise UsageError(f"{what} is a folder, not a bundle file")
    try:
        tf = tarfile.open(path, "r:")
    except FileNotFoundError:
        raise UsageError(f"{what} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleRefused(f"{what} is not a readable bundle ({e})",
                            hint="it may be truncated or not a bundle at all: copy it again") from None
    blobs: dict[str, bytes] = {}
    head: dict[str, bytes] = {}
    manifest: dict | None = None
    signer_id = ""
    limits: dict[str, int] = {}  # member name -> the size the signed manifest gives it
    names: dict[str, str] = {}  # member name -> its instance's name
    try:
        with tf:
            for m in tf:
                name = m.name
                if not m.isfile():
                    kind = "a symbolic link" if m.issym() else "a hard link" if m.islnk() else \
                        "a directory" if m.isdir() else "a special file"
                    raise BundleRefused(f"{what} contains {kind}, {name!r}; bundles hold regular files only",
                                        hint="do not seed it: rebuild it with `jitkiln prebuild`")
                if name.startswith("/") or ".." in name.split("/") or "\\" in name or not _NAME.fullmatch(name):
                    raise BundleRefused(f"{what} contains an unexpected path {name!r} (absolute, '..', or not "
                                        "a bundle file)",
                                        hint="do not seed it: rebuild it with `jitkiln prebuild`")
                if name in blobs or name in head:
                    raise BundleRefused(f"{what} contains {name!r} twice", hint="rebuild it with `jitkiln prebuild`")
                if name.startswith("manifest"):
                    if manifest is not None:
                        raise BundleRefused(f"{what}: {name} after the objects", hint="rebuild it with `jitkiln prebuild`")
                    if m.size > MAX_MANIFEST:
                        raise BundleRefused(f"{what}: {name} is implausibly large ({m.size} bytes)")
                    head[name] = _read_member(tf, m, what)
                    if len(head) == 2:
                        manifest, signer_id = _check_manifest(head, trust, what)
                        if precheck is not None:
                            precheck(manifest)  # toolchain and arch: the most actionable refusal, first
                        limits = _member_limits(manifest, what)
                        names = {f"objects/{e['key']}/{f}": e["name"] for e in manifest["instances"]
                                 for f in ("artifact", "meta.json")}
                    continue
                if manifest is None:
                    raise BundleRefused(f"{what}: {name} comes before the signed manifest (or the bundle is not "
                                        "signed)", hint="bundles are written by `jitkiln prebuild --key ...`; "
                                                         "rebuild it")
                if name not in limits:
                    raise BundleRefused(f"{what} contains a file its manifest does not list: {name}",
                                        hint="do not use this bundle; rebuild it with `jitkiln prebuild`")
                if m.size != limits[name]:
                    kind = "metadata" if name.endswith("meta.json") else "artifact"
                    raise BundleRefused(f"{what}: {names[name]}: the {kind} does not match its signed digest "
                                        f"({m.size} bytes, the signed manifest says {limits[name]}: tampered or "
                                        "damaged)", hint="do not use this bundle; rebuild it with `jitkiln prebuild`")
                blobs[name] = _read_member(tf, m, what)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleRefused(f"{what} is truncated or damaged ({type(e).__name__}: {e})",
                            hint="copy it again (compare its size and sha256 with the original)") from None
    if manifest is None:
        if "manifest.json" not in head:
            raise BundleRefused(f"{what} has no manifest.json", hint="it is not a jitkiln bundle, or it is truncated")
        raise BundleRefused(f"{what} is not signed (no manifest.sig)",
                            hint="bundles must be written by `jitkiln prebuild --key ...`")
    out: dict[str, tuple[bytes, dict]] = {}
    for ent in manifest["instances"]:
        key, name = ent["key"], ent["name"]
        art_n, meta_n = f"objects/{key}/artifact", f"objects/{key}/meta.json"
        if art_n not in blobs or meta_n not in blobs:
            raise BundleRefused(f"{what}: {name}: files missing from the archive", hint="it may be truncated")
        art, mb = blobs[art_n], blobs[meta_n]
        if hashlib.sha256(art).hexdigest() != ent.get("artifact_sha256"):
            raise BundleRefused(f"{what}: {name}: the artifact does not match its signed digest (tampered or "
                                "damaged)", hint="do not use this bundle; rebuild it with `jitkiln prebuild`")
        if hashlib.sha256(mb).hexdigest() != ent.get("meta_sha256"):
            raise BundleRefused(f"{what}: {name}: the metadata does not match its signed digest (tampered)",
                                hint="do not use this bundle; rebuild it with `jitkiln prebuild`")
        try:
            meta = json.loads(mb)
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("key") != key or \
                meta.get("toolchain") != manifest.get("toolchain") or meta.get("arch") != manifest.get("arch"):
            raise BundleRefused(f"{what}: {name}: metadata disagrees with the manifest (key, toolchain or arch)",
                                hint="do not use this bundle; rebuild it with `jitkiln prebuild`")
        try:
            trust.verify_meta(art, meta)
        except JitkilnError as e:
            raise BundleRefused(f"{what}: {name}: {e.reason}", hint=e.hint) from None
        out[key] = (art, meta)
    manifest["_signer"] = signer_id
    return manifest, out


def _read_member(tf: tarfile.TarFile, m: tarfile.TarInfo, what: str) -> bytes:
    f = tf.extractfile(m)
    data = f.read(m.size) if f is not None else b""
    if len(data) != m.size:
        raise BundleRefused(f"{what} is truncated (in {m.name})", hint="copy it again")
    return data


def _check_manifest(head: dict[str, bytes], trust, what: str) -> tuple[dict, str]:
    """The signature over manifest.json, then its content (format, instances): (manifest, signer key id)."""
    try:
        sig = json.loads(head["manifest.sig"])
    except ValueError:
        raise BundleRefused(f"{what}: manifest.sig is not valid JSON") from None
    try:
        signer_id = trust.verify_bytes(head["manifest.json"], sig, f"{what}: its manifest")
    except SignatureError as e:
        raise BundleRefused(e.reason, hint=e.hint) from None
    try:
        manifest = json.loads(head["manifest.json"])
    except ValueError:
        raise BundleRefused(f"{what}: manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise BundleRefused(f"{what}: manifest.json is not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BundleRefused(f"{what} has format {manifest.get('format')} v{manifest.get('version')}; this jitkiln "
                            f"reads {FORMAT} v{VERSION}", hint="seed it with the jitkiln version that wrote it")
    return manifest, signer_id


def _member_limits(manifest: dict, what: str) -> dict[str, int]:
    """Every member the manifest lists -> its size; checks each instance record's fields and key."""
    insts = manifest.get("instances")
    if not isinstance(insts, list):
        raise BundleRefused(f"{what}: the manifest lists no instances")
    limits: dict[str, int] = {}
    for ent in insts:
        ok = isinstance(ent, dict) and isinstance(ent.get("deps"), dict) and isinstance(ent.get("name"), str) \
            and all(isinstance(ent.get(f), int) and not isinstance(ent.get(f), bool) and ent.get(f) >= 0
                    for f in ("size", "meta_size"))
        if not ok:
            raise BundleRefused(f"{what}: a malformed instance record in the manifest",
                                hint="rebuild it with `jitkiln prebuild`")
        key, name = str(ent.get("key")), ent["name"]
        if entry_key(str(ent.get("ukey")), ent["deps"]) != key:
            raise BundleRefused(f"{what}: {name}: key does not match its unit key and header deps")
        limits[f"objects/{key}/artifact"] = ent["size"]
        limits[f"objects/{key}/meta.json"] = ent["meta_size"]
    return limits


def _local_arch() -> str | None:
    import shutil
    import subprocess
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        cc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                            text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"sm_{cc[0].replace('.', '')}" if cc else None


def seed(path: str | os.PathLike, store: Store, trust, arch: str | None = None) -> dict[str, Any]:
    """Verify a bundle completely, check toolchain and arch, then publish its entries into ``store``."""
    found: dict[str, Any] = {}

    def precheck(manifest: dict) -> None:
        try:
            fam = get_family(str(manifest.get("family")))
            spec = fam.compile_spec(manifest.get("variant"), manifest.get("arch"))
        except JitkilnError as e:
            raise BundleRefused(f"bundle {path} is for {manifest.get('family')}/{manifest.get('variant')}, which "
                                f"this jitkiln cannot plan: {e.reason}", hint="seed it with a matching jitkiln") from None
        tc, fp, _ = find_compiler(spec, required=False)
        if fp != manifest.get("toolchain"):
            raise BundleRefused(f"bundle {path} was built with toolchain {manifest.get('toolchain')}; this machine "
                                f"has {fp}", hint="its entries would never be used here: rebuild the bundle with this "
                                                  "machine's compiler (`jitkiln prebuild` here), or install the same one")
        want = arch or os.environ.get("JITKILN_ARCH") or _local_arch()
        if want is None:
            print(f"jitkiln: note: no GPU found and no --arch given: not checking the bundle's arch "
                  f"({manifest.get('arch')})", file=sys.stderr)
        elif not (manifest.get("arch") == want or str(manifest.get("arch")).rstrip("af") == want.rstrip("af")):
            raise BundleRefused(f"bundle {path} targets {manifest.get('arch')}, this machine {want}",
                                hint="rebuild the bundle with --arch " + want)
        found.update(spec=spec, tc=tc)

    manifest, entries = read_bundle(path, trust, precheck)
    spec, tc = found["spec"], found["tc"]
    labels = HeaderLabels(spec, tc)
    local = getattr(store, "local", store)  # seeding fills the local cache only
    local.ensure()
    new, present, stale = [], [], []
    for ent in manifest["instances"]:
        if any(labels.digest(lbl) != d for lbl, d in ent["deps"].items()):
            stale.append(ent["name"])
    added: list[Any] = []  # (entry dir) published by this seed: removed again if the seed cannot complete
    try:
        for ent in manifest["instances"]:
            key = ent["key"]
            art, meta = entries[key]
            with local.lock(ent["ukey"], f"seed {ent['name']}"):
                # what is there is verified, not trusted by its name: a damaged entry is moved aside and replaced
                if local.obj_dir(key).exists() and local.get(key) is not None:
                    present.append(ent["name"])
                else:
                    e = local.put_verified(key, art, meta)
                    added.append(e.path)
                    new.append(ent["name"])
                local.add_manifest(ent["ukey"], ent["deps"], key)
    except BaseException:
        for d in added:  # leave the cache as it was (its manifests only name entries; a missing one is a miss)
            remove_dir(d, local.root / "tmp")
        raise
    return {"bundle": str(path), "family": manifest["family"], "variant": manifest["variant"],
            "arch": manifest["arch"], "toolchain": manifest["toolchain"], "signer": manifest["_signer"],
            "seeded": new, "already_present": present, "header_mismatch": stale, "cache": str(store.base)}
