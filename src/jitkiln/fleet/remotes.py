"""Remote caches behind the local store (see :mod:`jitkiln.fleet.store`): a shared directory and Redis.

Namespacing: entries live under the compiler fingerprint and arch that built them, so an old compiler's
entries can be dropped as a whole (``SCAN MATCH jitkiln:v1:<toolchain>:*`` or ``rm -r <dir>/v1/ns/<ns>``).

Failure model: a remote that is down or slow (a *transport* failure: connection refused, timeout, an I/O
error of the file system) costs one short timeout, one warning, and then it is skipped for ``retry_s`` seconds
(a circuit breaker); the build goes on locally. A bad *entry* (garbage, half written, a Redis key of the wrong
type) is a miss for that key only, never a reason to skip the remote, and :meth:`Remote.put` replaces it.

Configuration from the environment: :mod:`jitkiln.fleet.config`.

Longer than 400 lines: two remotes (shared directory, Redis) with one failure model.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import JitkilnError, UsageError
from ..store import publish_entry_dir, remove_dir, sweep_stale_temporaries, write_durable

NS_VERSION = "v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class RemoteDown(JitkilnError):
    """A remote failed recently; it is skipped until its retry time."""

    quiet = True  # the failure that tripped the breaker was reported; skipping is silent


Keep = Callable[[bytes, Any], bool]  # (artifact, meta) of an entry already there -> may it stay?


class Remote:
    """A remote cache. Everything it returns is verified by the fleet store before it is used."""

    name = "remote"

    def get(self, key: str) -> tuple[bytes, Any] | None:
        raise NotImplementedError

    def put(self, key: str, artifact: bytes, meta: dict, keep: Keep | None = None) -> None:
        """Write an entry; an entry already at ``key`` stays only if ``keep(artifact, meta)`` says so."""
        raise NotImplementedError

    def get_manifest(self, ukey: str) -> list[dict]:
        return []

    def put_manifest(self, ukey: str, records: list[dict]) -> None:
        pass


def _ns(meta: dict) -> str:
    """The namespace of an entry: toolchain fingerprint and arch, safe for file names and Redis keys."""
    raw = f"{meta.get('toolchain') or 'unknown'}:{meta.get('arch') or 'unknown'}"
    return re.sub(r"[^A-Za-z0-9._:+-]", "_", raw)


def _check_key(key: str) -> str:
    if not _HEX64.fullmatch(key or ""):
        raise ValueError(f"not a cache key: {key!r}")
    return key


# errors that concern one entry (a file where a folder should be, a name too long...), not the file system
_ENTRY_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY}


def _note(msg: str) -> None:
    print(f"jitkiln: note: {msg}", file=sys.stderr)


class _Breaker:
    """After a failure, refuse calls for ``retry_s`` seconds so a dead remote costs one timeout, not one per unit."""

    def __init__(self, name: str, retry_s: float):
        self.name, self.retry_s = name, retry_s
        self.down_until = 0.0
        self.lock = threading.Lock()

    def check(self) -> None:
        if time.monotonic() < self.down_until:
            raise RemoteDown(f"{self.name} is skipped after a recent failure (retrying in "
                           f"{self.down_until - time.monotonic():.0f} s)")

    def trip(self) -> None:
        with self.lock:
            self.down_until = time.monotonic() + self.retry_s


# --- shared directory --------------------------------------------------------------------------------------
class SharedDirRemote(Remote):
    """A directory shared by many machines (NFS, a cluster filesystem). No locks across machines: an entry
    is written into ``tmp/`` and renamed into place complete (rename is atomic on NFS too); the first writer
    wins and later ones discard their copy. Manifest records are one file each, so writers never lose each
    other's records. Layout::

        <dir>/v1/ns/<toolchain:arch>/obj/<ab>/<key>/{artifact,meta.json}
        <dir>/v1/manifests/<ab>/<ukey>/<key>.json
        <dir>/v1/tmp/
    """

    name = "shared-dir"

    def __init__(self, path: str | os.PathLike, max_bytes: int | None = None,
                 max_entry_bytes: int | None = None, retry_s: float = 30.0):
        self.base = Path(path)
        self.root = self.base / NS_VERSION
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.name = f"shared-dir {self.base}"
        self.breaker = _Breaker(self.name, retry_s)
        self._last_gc = 0.0
        self._skipped_big = False
        self._swept = False

    def _candidates(self, key: str) -> list[Path]:
        ns_root = self.root / "ns"
        try:
            spaces = sorted(os.listdir(ns_root))
        except FileNotFoundError:
            return []
        return [ns_root / ns / "obj" / key[:2] / key for ns in spaces]

    def _read(self, d: Path) -> tuple[bytes, Any] | None:
        """An entry directory's (artifact, meta); None if absent. A half-written or malformed entry comes back
        as (bytes, a marker the fleet store refuses): a miss for this key, which a writer then replaces."""
        try:
            meta_raw = (d / "meta.json").read_bytes()
        except FileNotFoundError:
            if not d.exists():
                return None
            return b"", {"key": "(entry without meta.json)"}
        except (IsADirectoryError, NotADirectoryError, PermissionError):
            return b"", {"key": "(unreadable meta.json)"}
        try:
            meta = json.loads(meta_raw)
        except ValueError:
            meta = {"key": "(malformed meta.json)"}
        try:
            data = (d / "artifact").read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            return b"", {"key": "(entry without its artifact)"}
        return data, meta

    def _sweep_once(self) -> None:
        """At first use: remove temporaries that killed writers left (older than an hour, or written by a
        process of this host that is gone). Best effort: a read-only mount is simply not swept."""
        if self._swept:
            return
        self._swept = True
        tmp = self.root / "tmp"
        with contextlib.suppress(OSError):
            if tmp.is_dir() and os.access(tmp, os.W_OK):
                sweep_stale_temporaries(tmp)

    def get(self, key: str) -> tuple[bytes, Any] | None:
        _check_key(key)
        self.breaker.check()
        self._sweep_once()
        try:
            for d in self._candidates(key):
                got = self._read(d)
                if got is None:
                    continue
                with contextlib.suppress(OSError):
                    os.utime(d)  # last use, for gc
                return got
        except OSError as e:
            if e.errno in _ENTRY_ERRNOS:
                return None
            self.breaker.trip()  # the file system itself failed (I/O error, stale handle...): skip it a while
            raise
        return None

    def put(self, key: str, artifact: bytes, meta: dict, keep: Keep | None = None) -> None:
        _check_key(key)
        self.breaker.check()
        if self.max_entry_bytes is not None and len(artifact) > self.max_entry_bytes:
            if not self._skipped_big:
                self._skipped_big = True
                _note(f"{meta.get('name', key[:16])} ({len(artifact) >> 20} MB) is over the {self.name} entry "
                      "limit; such entries stay local")
            return
        final = self.root / "ns" / _ns(meta) / "obj" / key[:2] / key
        try:
            for d in self._candidates(key):
                got = self._read(d)
                if got is None:
                    continue
                if keep is None or keep(*got):
                    return  # a valid entry is there already
                self._remove(d)  # a bad one (or one this writer cannot vouch for): replaced below
            tmp = self.root / "tmp" / f"{key[:16]}.{os.uname().nodename}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            publish_entry_dir(tmp, final, artifact, meta)  # first writer wins: False is fine
        except OSError as e:
            if e.errno not in _ENTRY_ERRNOS:
                self.breaker.trip()
            raise
        self._maybe_gc()

    def _remove(self, d: Path) -> None:
        gone = self.root / "tmp" / f"discard-{d.name[:16]}-{uuid.uuid4().hex[:8]}"
        gone.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.rename(d, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def get_manifest(self, ukey: str) -> list[dict]:
        _check_key(ukey)
        self.breaker.check()
        self._sweep_once()
        d = self.root / "manifests" / ukey[:2] / ukey
        try:
            names = sorted(os.listdir(d), key=lambda n: (d / n).stat().st_mtime if (d / n).exists() else 0)
        except FileNotFoundError:
            return []
        except OSError:
            self.breaker.trip()
            raise
        recs = []
        for n in names:
            if not n.endswith(".json"):
                continue
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads((d / n).read_bytes())
                if isinstance(rec, dict) and rec.get("key") == n[:-5]:
                    recs.append(rec)
        return recs

    def put_manifest(self, ukey: str, records: list[dict]) -> None:
        _check_key(ukey)
        self.breaker.check()
        d = self.root / "manifests" / ukey[:2] / ukey
        try:
            d.mkdir(parents=True, exist_ok=True)
            for rec in records:
                key = _check_key(str(rec.get("key")))
                p = d / f"{key}.json"
                if p.exists():
                    continue
                tmp = d / f".{key[:16]}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp"
                write_durable(tmp, json.dumps({"key": key, "deps": rec.get("deps", {})}).encode())
                os.replace(tmp, p)
        except OSError:
            self.breaker.trip()
            raise

    # size limit: least recently used entries go first; stale temporary directories are cleared
    def gc(self, max_bytes: int | None = None) -> list[str]:
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        items, total = [], 0
        for ns_obj in (self.root / "ns").glob("*/obj"):
            for d in ns_obj.glob("??/*"):
                try:
                    sz = sum(f.stat().st_size for f in d.iterdir())
                    items.append((d.stat().st_mtime, d, sz))
                    total += sz
                except OSError:
                    continue
        removed = []
        for mtime, d, sz in sorted(items, key=lambda i: i[0]):
            if max_bytes is None or total <= max_bytes:
                break
            if not remove_dir(d, self.root / "tmp"):
                continue
            total -= sz
            removed.append(d.name)
        sweep_stale_temporaries(self.root / "tmp")
        return removed

    def _maybe_gc(self) -> None:
        if self.max_bytes is not None and time.monotonic() - self._last_gc > 60:
            self._last_gc = time.monotonic()
            with contextlib.suppress(OSError):
                self.gc()


# --- Redis ---------------------------------------------------------------------------------------------------
class RedisRemote(Remote):
    """Redis (redis-py). Keys::

        jitkiln:v1:<toolchain>:<arch>:obj:<key>   hash {artifact, meta}  (written in one MULTI)
        jitkiln:v1:loc:<key>                      "<toolchain>:<arch>": where the entry lives
        jitkiln:v1:man:<ukey>                     hash {key: deps json}  (HSET: writers never lose records)

    Every key has a TTL, refreshed on use. Short connect and socket timeouts; a failure trips a breaker.
    Configure the server with ``maxmemory`` and ``maxmemory-policy allkeys-lru`` for a hard size limit.
    """

    name = "redis"

    def __init__(self, url: str, ttl_s: int = 30 * 86400, max_entry_bytes: int = 256 << 20,
                 connect_timeout: float = 0.5, socket_timeout: float = 3.0, retry_s: float = 30.0,
                 prefix: str = "jitkiln"):
        try:
            import redis
        except ImportError:
            raise UsageError("JITKILN_REDIS_URL is set but the `redis` package is not installed",
                             hint="pip install 'jitkiln[fleet]' (or unset JITKILN_REDIS_URL)") from None
        self._redis = redis
        self.url = url
        self.ttl_s = int(ttl_s)
        self.max_entry_bytes = max_entry_bytes
        self.prefix = f"{prefix}:{NS_VERSION}"
        self.name = f"redis {_redact(url)}"
        self.breaker = _Breaker(self.name, retry_s)
        self._skipped_big = False
        try:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout,
                                               socket_timeout=socket_timeout, retry_on_timeout=False,
                                               health_check_interval=0)
        except ValueError as e:
            raise UsageError(f"bad JITKILN_REDIS_URL {_redact(url)!r}: {e}",
                             hint="give it as redis://HOST:PORT/DB (rediss:// for TLS)") from None

    def _call(self, fn, *a, default=None):
        """Run a Redis call. Transport failures (connection, timeout) trip the breaker; a reply error about one
        key (e.g. WRONGTYPE: a key holding another type) is a miss for that key: ``default``."""
        self.breaker.check()
        try:
            return fn(*a)
        except (self._redis.ConnectionError, self._redis.TimeoutError):
            self.breaker.trip()
            raise
        except self._redis.ResponseError:
            return default

    def _obj(self, ns: str, key: str) -> str:
        return f"{self.prefix}:{ns}:obj:{key}"

    def get(self, key: str) -> tuple[bytes, dict] | None:
        _check_key(key)

        def do():
            loc = self.client.get(f"{self.prefix}:loc:{key}")
            if loc is None:
                return None
            okey = self._obj(loc.decode(), key)
            h = self.client.hgetall(okey)
            if not h or b"artifact" not in h or b"meta" not in h:
                return None
            p = self.client.pipeline(transaction=False)
            p.expire(okey, self.ttl_s)
            p.expire(f"{self.prefix}:loc:{key}", self.ttl_s)
            p.execute()
            try:
                meta = json.loads(h[b"meta"])
            except ValueError:
                meta = {"key": "(unreadable metadata)"}
            return h[b"artifact"], meta
        return self._call(do)

    def put(self, key: str, artifact: bytes, meta: dict, keep: Keep | None = None) -> None:
        # an entry already there is overwritten in one transaction (a bad one, or the same bytes again)
        _check_key(key)
        if len(artifact) > self.max_entry_bytes:
            if not self._skipped_big:
                self._skipped_big = True
                _note(f"{meta.get('name', key[:16])} ({len(artifact) >> 20} MB) is over the Redis entry limit "
                      f"({self.max_entry_bytes >> 20} MB, JITKILN_REDIS_MAX_ENTRY); such entries stay out of Redis")
            return
        ns = _ns(meta)

        def do():
            p = self.client.pipeline(transaction=True)
            okey = self._obj(ns, key)
            p.delete(okey)
            p.hset(okey, mapping={"artifact": artifact, "meta": json.dumps(meta, sort_keys=True)})
            p.expire(okey, self.ttl_s)
            p.set(f"{self.prefix}:loc:{key}", ns, ex=self.ttl_s)
            p.execute()
        self._call(do)

    def get_manifest(self, ukey: str) -> list[dict]:
        _check_key(ukey)
        h = self._call(self.client.hgetall, f"{self.prefix}:man:{ukey}", default={}) or {}
        recs = []
        for k, v in h.items():
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                deps = json.loads(v)
                if isinstance(deps, dict):
                    recs.append({"key": k.decode(), "deps": deps})
        return recs

    def put_manifest(self, ukey: str, records: list[dict]) -> None:
        _check_key(ukey)
        mapping = {str(r["key"]): json.dumps(r.get("deps", {}), sort_keys=True) for r in records if r.get("key")}
        if not mapping:
            return

        mkey = f"{self.prefix}:man:{ukey}"

        def do():
            if self.client.type(mkey) not in (b"hash", b"none", "hash", "none"):
                self.client.delete(mkey)  # a key of another type (damaged or foreign): replace it
            p = self.client.pipeline(transaction=True)
            p.hset(mkey, mapping=mapping)
            p.expire(mkey, self.ttl_s)
            p.execute()
        self._call(do)


def _redact(url: str) -> str:
    return re.sub(r"//([^@/]*)@", "//***@", url)


