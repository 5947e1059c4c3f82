"""The fleet store as the environment configures it (:func:`store_from_env`).

=========================== =========================================================================
``JITKILN_CACHE_DIR``       local cache root (default ``~/.cache/jitkiln``)
``JITKILN_SHARED_DIR``      a directory every machine mounts (NFS, ...): the shared-directory remote
``JITKILN_SHARED_MAX_SIZE`` its size limit (e.g. ``200G``; least recently used entries go first)
``JITKILN_REDIS_URL``       ``redis://host:6379/0`` (``rediss://`` for TLS): the Redis remote
``JITKILN_REDIS_TTL``       seconds an entry lives in Redis after its last use (default 30 days; >= 1)
``JITKILN_REDIS_MAX_ENTRY`` largest artifact written to Redis (default ``256M``)
``JITKILN_REDIS_TIMEOUT``   seconds a Redis call may take (default 3; connecting: 0.5)
``JITKILN_SIGNING_KEY``     private key (``jitkiln keygen``) that signs what this machine writes
``JITKILN_TRUST_KEYS``      ``:``-separated ``.pub`` files or directories: whose entries are accepted
=========================== =========================================================================
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import JitkilnError, UsageError
from ..sizes import parse_size
from ..store import Store
from .remotes import RedisRemote, Remote, SharedDirRemote
from .signing import Signer, TrustStore
from .store import FleetStore


def _size(s: str | None, var: str) -> int | None:
    if not s:
        return None
    try:
        return parse_size(s)
    except JitkilnError:
        raise UsageError(f"bad {var}={s!r}", hint="give a size such as 500M or 200G") from None


def _positive(env, var: str, kind=int):
    raw = env.get(var)
    if not raw:
        return None
    try:
        v = kind(raw)
    except ValueError:
        v = None
    if v is None or v <= 0:
        raise UsageError(f"bad {var}={raw!r}: it must be a positive number",
                         hint="e.g. JITKILN_REDIS_TTL=2592000 (30 days), JITKILN_REDIS_TIMEOUT=3")
    return v


_config_noted: set[str] = set()


def _note_once(tag: str, msg: str) -> None:
    if tag not in _config_noted:
        _config_noted.add(tag)
        print(f"jitkiln: note: {msg}", file=sys.stderr)


def remotes_from_env(env: dict | None = None) -> list[Remote]:
    env = os.environ if env is None else env
    remotes: list[Remote] = []
    if env.get("JITKILN_SHARED_DIR"):
        shared = Path(env["JITKILN_SHARED_DIR"])
        for p in (shared, *shared.parents):
            if p.exists():
                if not p.is_dir():
                    raise UsageError(f"JITKILN_SHARED_DIR={shared} is unusable: {p} is a file, not a folder",
                                     hint="point JITKILN_SHARED_DIR at the folder every machine mounts")
                break
        remotes.append(SharedDirRemote(env["JITKILN_SHARED_DIR"],
                                       max_bytes=_size(env.get("JITKILN_SHARED_MAX_SIZE"), "JITKILN_SHARED_MAX_SIZE")))
    if env.get("JITKILN_REDIS_URL"):
        kw: dict[str, Any] = {}
        ttl = _positive(env, "JITKILN_REDIS_TTL")
        if ttl:
            kw["ttl_s"] = ttl
        timeout = _positive(env, "JITKILN_REDIS_TIMEOUT", float)
        if timeout:
            kw["socket_timeout"] = timeout
        big = _size(env.get("JITKILN_REDIS_MAX_ENTRY"), "JITKILN_REDIS_MAX_ENTRY")
        if big:
            kw["max_entry_bytes"] = big
        remotes.append(RedisRemote(env["JITKILN_REDIS_URL"], **kw))
    return remotes


def store_from_env(root: str | os.PathLike | None = None, env: dict | None = None) -> Store | FleetStore:
    """The local store, wrapped with the remotes, signing key and trusted keys the environment configures."""
    env = os.environ if env is None else env
    local = Store(root)
    remotes = remotes_from_env(env)
    if not remotes:
        return local
    signer = Signer.from_file(env["JITKILN_SIGNING_KEY"]) if env.get("JITKILN_SIGNING_KEY") else None
    trust = TrustStore.from_paths(env.get("JITKILN_TRUST_KEYS"))
    if signer is not None:
        trust.add(signer.raw_public, signer.source)
    if not trust:
        _note_once("no-trust", "remote caches are configured but no trusted key is: every remote entry will "
                               "be refused and rebuilt here. Set JITKILN_TRUST_KEYS to the builders' .pub files "
                               "(see docs/fleet.md)")
    if signer is None:
        _note_once("no-signer", "no JITKILN_SIGNING_KEY: units compiled here are not shared (the remotes are "
                                "read-only for this machine)")
    return FleetStore(local, remotes, verify=trust, sign=signer.sign_meta if signer is not None else None)
