"""ed25519 signatures for everything that leaves one machine: remote-cache entries and bundles.

A signature covers the entry's identity, not its file layout::

    {"v": 1, "key": ..., "artifact_sha256": ..., "name": ..., "toolchain": ..., "arch": ...}

serialized as canonical JSON. The *key* already binds the unit key (source, compiler, flags, arch) and the
content digest of every header, so a valid signature says: the holder of this private key built exactly
these bytes for exactly this unit. It is stored in the entry's metadata as ``meta["signature"] =
{"key_id": ..., "sig": base64}``.

Keys: ``jitkiln keygen -o PATH`` writes the private key ``PATH`` (PEM, mode 0600) and the public key
``PATH.pub`` (one line: ``jitkiln-ed25519 <base64 raw key> <comment>``). Builders that write to a shared
cache or a bundle need the private key (``JITKILN_SIGNING_KEY``); every machine that reads lists the
public keys it trusts (``JITKILN_TRUST_KEYS``: files or directories of ``*.pub``, separated by ``:``).
A machine always trusts its own signing key.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Iterable

from ..errors import CorruptEntry, JitkilnError, UsageError
from ..keys import canonical_json

PUB_TAG = "jitkiln-ed25519"
SIGNED_FIELDS = ("key", "artifact_sha256", "name", "toolchain", "arch")


class SignatureError(CorruptEntry):
    """An entry or bundle whose signature is missing, made by an untrusted key, or does not verify.

    ``discard`` is True when the entry is certainly bad (a forged or broken signature), False when it may
    simply be signed by a key this machine was not told to trust."""

    def __init__(self, reason: str, hint: str = "", details: str = "", discard: bool = True):
        super().__init__(reason, hint, details)
        self.discard = discard


def _crypto():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise JitkilnError("signing needs the `cryptography` package",
                           hint="pip install 'jitkiln[fleet]' (or pip install cryptography)") from None
    return ed25519, serialization


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def signed_message(meta: dict) -> bytes:
    return canonical_json({"v": 1, **{f: meta.get(f) for f in SIGNED_FIELDS}}).encode()


# --- keys ------------------------------------------------------------------------------------------------
def generate_keypair(path: str | os.PathLike, comment: str = "", force: bool = False) -> tuple[Path, Path, str]:
    """Write a new private key at ``path`` (0600) and its public key at ``path.pub``; return (priv, pub, id)."""
    ed25519, serialization = _crypto()
    priv_path = Path(path)
    pub_path = Path(str(path) + ".pub")
    if not force and (priv_path.exists() or pub_path.exists()):
        raise UsageError(f"{priv_path} or {pub_path} already exists",
                         hint="choose another path, or pass --force to overwrite it")
    priv = ed25519.Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    comment = comment or f"{os.environ.get('USER', 'jitkiln')}@{os.uname().nodename}"
    try:
        priv_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(priv_path, 0o600)
        pub_path.write_text(f"{PUB_TAG} {base64.b64encode(raw).decode()} {comment}\n")
    except OSError as e:
        raise UsageError(f"cannot write the key pair at {priv_path}: {e.strerror or e}",
                         hint="give a path in a writable folder (-o DIR/NAME.key)") from None
    return priv_path, pub_path, key_id(raw)


class Signer:
    """Signs entry metadata (and bundle manifests) with one ed25519 private key."""

    def __init__(self, private_key, source: str = ""):
        _, serialization = _crypto()
        self._key = private_key
        self.raw_public = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)
        self.key_id = key_id(self.raw_public)
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Signer":
        ed25519, serialization = _crypto()
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read the signing key {path}: {e.strerror or e}",
                             hint="create one with `jitkiln keygen -o PATH`, and point JITKILN_SIGNING_KEY "
                                  "(or --key) at it") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{path} is not an unencrypted PEM private key ({e})",
                             hint="give the private key written by `jitkiln keygen` (not the .pub file)") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise UsageError(f"{path} is not an ed25519 key", hint="create one with `jitkiln keygen -o PATH`")
        return cls(key, str(path))

    def sign_bytes(self, data: bytes) -> dict:
        return {"key_id": self.key_id, "sig": base64.b64encode(self._key.sign(data)).decode()}

    def sign_meta(self, meta: dict) -> dict:
        """A copy of ``meta`` carrying a signature over its signed fields."""
        out = {k: v for k, v in meta.items() if k != "signature"}
        out["signature"] = self.sign_bytes(signed_message(out))
        return out


def parse_public_key(text: str, origin: str) -> bytes:
    parts = text.strip().split()
    if len(parts) < 2 or parts[0] != PUB_TAG:
        raise UsageError(f"{origin} is not a jitkiln public key (expected '{PUB_TAG} <base64> [comment]')",
                         hint="give the .pub file written by `jitkiln keygen`")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"{origin}: the public key is not 32 bytes of base64",
                         hint="copy the .pub file again; it may have been truncated")
    return raw


class TrustStore:
    """The public keys this machine trusts; verifies remote entries (Store's ``verify_remote`` hook)."""

    def __init__(self, keys: Iterable[bytes] = (), sources: dict[str, str] | None = None):
        self.keys: dict[str, bytes] = {}
        self.sources: dict[str, str] = dict(sources or {})
        for raw in keys:
            self.add(raw)

    def add(self, raw: bytes, source: str = "") -> str:
        kid = key_id(raw)
        self.keys[kid] = raw
        if source:
            self.sources.setdefault(kid, source)
        return kid

    @classmethod
    def from_paths(cls, spec: str | Iterable[str] | None) -> "TrustStore":
        """``spec``: files or directories of ``*.pub`` (a string is split on ``:``)."""
        ts = cls()
        if not spec:
            return ts
        items = spec.split(os.pathsep) if isinstance(spec, str) else list(spec)
        for item in items:
            item = item.strip()
            if not item:
                continue
            p = Path(item).expanduser()
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            if p.is_dir() and not files:
                raise UsageError(f"trusted-keys directory {p} holds no *.pub file",
                                 hint="copy the builders' .pub files there (see docs/fleet.md)")
            for f in files:
                try:
                    raw = f.read_bytes()
                except OSError as e:
                    raise UsageError(f"cannot read trusted key {f}: {e.strerror or e}",
                                     hint="fix JITKILN_TRUST_KEYS (files or directories of .pub, ':'-separated)"
                                     ) from None
                if len(raw) > 64 << 10:
                    raise UsageError(f"{f} is not a jitkiln public key (it is {len(raw)} bytes)",
                                     hint="give the .pub file written by `jitkiln keygen`")
                try:
                    text = raw.decode("ascii")
                except UnicodeDecodeError:
                    raise UsageError(f"{f} is not a jitkiln public key (not text)",
                                     hint="give the .pub file written by `jitkiln keygen`") from None
                ts.add(parse_public_key(text, str(f)), str(f))
        return ts

    def __bool__(self) -> bool:
        return bool(self.keys)

    def verify_bytes(self, data: bytes, sig: dict | None, what: str) -> str:
        """Check a detached signature; return the signer's key id or raise SignatureError."""
        ed25519, _ = _crypto()
        from cryptography.exceptions import InvalidSignature
        if not isinstance(sig, dict) or not sig.get("sig") or not sig.get("key_id"):
            raise SignatureError(f"{what} is not signed",
                                 hint="entries from remote caches and bundles must be signed by a trusted key: "
                                      "the builder needs JITKILN_SIGNING_KEY (or --key)")
        kid = str(sig["key_id"])
        raw = self.keys.get(kid)
        if raw is None:
            known = ", ".join(sorted(self.keys)) or "none"
            raise SignatureError(f"{what} is signed by key {kid[:16]}, which this machine does not trust "
                                 f"(trusted: {known})",
                                 hint="add the builder's .pub file to JITKILN_TRUST_KEYS if you trust it",
                                 discard=False)
        try:
            signature = base64.b64decode(str(sig["sig"]), validate=True)
            ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            raise SignatureError(f"{what}: the signature by key {kid[:16]} does not verify (content altered "
                                 "after signing, or a forged signature)",
                                 hint="the entry is refused and rebuilt; if this repeats, check who writes "
                                      "to the shared cache") from None
        return kid

    def verify_meta(self, artifact: bytes, meta: dict) -> str:
        """Digest AND signature of an entry not built here; raises CorruptEntry/SignatureError."""
        name = f"entry {str(meta.get('key', '?'))[:16]} ({meta.get('name', '?')})"
        got = hashlib.sha256(artifact).hexdigest()
        if meta.get("artifact_sha256") != got:
            raise CorruptEntry(f"{name}: artifact digest {got[:16]} does not match the signed "
                               f"{str(meta.get('artifact_sha256'))[:16]}")
        return self.verify_bytes(signed_message(meta), meta.get("signature"), name)

    def __call__(self, artifact: bytes, meta: dict) -> None:  # Store.verify_remote
        self.verify_meta(artifact, meta)
