"""A fleet store: the local store, wrapped with remote caches (a shared directory, Redis), the way a remote
cache manager wraps a file cache.

Order of lookup: local cache, then each remote in turn. Anything a remote returns is checked (its digest, and
its ed25519 signature by a trusted key: :mod:`jitkiln.fleet.signing`) before it is published locally through
the local store's :meth:`~jitkiln.store.Store.put_verified`, and copied into the nearer remotes. A unit compiled
here is published locally first, then written back, signed, to every remote (only by a machine holding a
signing key; others read only).

A remote that is down or slow costs one short timeout and is skipped for a while (its circuit breaker); a bad
*entry* (garbage, half written, tampered, signed by an unknown key) is a miss for that key only, and a machine
allowed to write replaces it with its own verified build.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

from ..errors import CorruptEntry
from ..keys import entry_key
from ..store import Entry, Store
from .remotes import Remote

Verifier = Callable[[bytes, dict], None]  # raises CorruptEntry when a remote entry may not be trusted
Signer = Callable[[dict], "dict | None"]  # meta -> signed meta for the remotes; None: do not write


class FleetStore:
    """Same interface as :class:`~jitkiln.store.Store` (what the builder, runtime and bundles use)."""

    def __init__(self, local: Store, remotes: Sequence[Remote], verify: Verifier, sign: Signer | None = None):
        self.local = local
        self.remotes = list(remotes)
        self.verify_remote = verify
        self.sign_remote = sign

    # --- the local store's interface, delegated -----------------------------------------------------------
    @property
    def base(self):
        return self.local.base

    @property
    def root(self):
        return self.local.root

    def __getattr__(self, name: str) -> Any:
        # everything else (lock, log_path, records_dir, read_verified, ls, gc, ...) is the local store's
        if name in ("local",):
            raise AttributeError(name)
        return getattr(self.local, name)

    # --- reads through the remotes ---------------------------------------------------------------------------
    def lookup(self, ukey: str, current_digest: Callable[[str], str | None]) -> Entry | None:
        e = self.local.lookup(ukey, current_digest)
        if e is not None:
            return e
        for remote in self.remotes:
            recs = _safe(remote, "get_manifest", ukey) or []
            for rec in reversed(recs):
                if not isinstance(rec, dict) or not isinstance(rec.get("deps"), dict):
                    continue
                if all(current_digest(lbl) == d for lbl, d in rec["deps"].items()):
                    if entry_key(ukey, rec["deps"]) != rec.get("key"):
                        continue  # a manifest record that does not hash to its key is ignored
                    e = self.get(rec["key"])
                    if e is not None:
                        self.local.add_manifest(ukey, rec["deps"], rec["key"])
                        return e
        return None

    def get(self, key: str) -> Entry | None:
        e = self.local.get(key)
        if e is not None:
            return e
        for i, remote in enumerate(self.remotes):
            got = _safe(remote, "get", key)
            if not got:
                continue
            artifact, meta = got
            try:
                self.local.check(key, artifact, meta, origin=remote.name)
                self.verify_remote(artifact, meta)
            except CorruptEntry as err:
                _warn(f"refused entry {key[:16]} from {remote.name}: {err.reason}; it will be rebuilt")
                continue
            e = self.local.put_verified(key, artifact, meta)
            for nearer in self.remotes[:i]:  # back-fill the nearer remotes
                _safe(nearer, "put", key, artifact, meta, self._valid)
            return e
        return None

    def _valid(self, artifact: bytes, meta: Any) -> bool:
        """Whether an entry already in a remote may stay (else a writer replaces it)."""
        try:
            self.verify_remote(artifact, meta)
            return isinstance(meta, dict)
        except (CorruptEntry, AttributeError, TypeError):
            return False

    # --- writes back to the remotes --------------------------------------------------------------------------
    def publish(self, ukey: str, deps: Mapping[str, str], artifact, meta: dict) -> Entry:
        e = self.local.publish(ukey, deps, artifact, meta)
        signed = self.sign_remote(e.meta) if self.sign_remote is not None else None
        if signed is None:
            return e  # no signing key here: the remotes are read-only for this machine
        data = e.data if e.data is not None else self.local.read_verified(e)
        if e.data is None:
            e.data = data
        for remote in self.remotes:
            _safe(remote, "put", e.key, data, signed, self._valid)
            recs = _safe(remote, "get_manifest", ukey) or []
            if not any(isinstance(r, dict) and r.get("key") == e.key for r in recs):
                _safe(remote, "put_manifest", ukey, [{"key": e.key, "deps": dict(deps)}])
        return e


_warned: set[str] = set()


def _warn(msg: str) -> None:
    print(f"jitkiln: warning: {msg}", file=sys.stderr)


def _safe(remote: Remote, method: str, *args):
    """Call a remote; one that is down or slow warns once and is skipped (work goes on locally)."""
    try:
        return getattr(remote, method)(*args)
    except Exception as e:  # noqa: BLE001 - any remote failure must not stop a local build
        if getattr(e, "quiet", False):  # a remote skipped after a failure that was already reported
            return None
        tag = f"{remote.name}:{type(e).__name__}"
        if tag not in _warned:
            _warned.add(tag)
            _warn(f"remote cache {remote.name} unavailable ({type(e).__name__}: {e}); continuing locally")
        return None
