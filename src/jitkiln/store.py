"""Content-addressed cache of compiled instances.

Layout under the cache root (``JITKILN_CACHE_DIR``, default ``~/.cache/jitkiln``)::

    v1/objects/ab/<key>/artifact   the loadable artifact (a shared object)
    v1/objects/ab/<key>/meta.json  its metadata: digest, compile seconds, peak memory, toolchain, flags...
    v1/manifests/cd/<ukey>.json    unit key -> the headers it read, with their digests, and the full key
    v1/locks/<ukey>.lock           per-unit flock: N processes compile a unit exactly once
    v1/tmp/                        entries being written (never read)
    v1/builds/                     build records and ninja logs

Two keys: the *unit key* covers the source text, the compiler fingerprint, flags and arch: everything known
before compiling. The *key* of an entry adds the content digest of every header the compiler read (from its
dependency output), found through the unit's manifest. An entry is published by renaming a complete,
fsynced directory into place, so readers see all of it or nothing; its artifact digest is checked before
every load, and anything that fails the check is moved aside and rebuilt, never loaded.

Longer than 400 lines: layout, lookup, verification, atomic publish and maintenance of one store.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import CorruptEntry, StoreError, StoreFull
from .keys import entry_key

LAYOUT = "v1"


def default_root() -> Path:
    env = os.environ.get("JITKILN_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "jitkiln"


@dataclass
class Entry:
    key: str
    path: Path  # the entry directory
    meta: dict[str, Any]
    data: bytes | None = field(default=None, repr=False, compare=False)  # the verified bytes, until loaded

    @property
    def artifact(self) -> Path:
        return self.path / "artifact"

    @property
    def name(self) -> str:
        return self.meta.get("name", "?")


class Store:
    """The local cache. :class:`jitkiln.fleet.FleetStore` wraps it with remote caches (same interface)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.base = Path(root) if root is not None else default_root()
        self.root = self.base / LAYOUT
        self._ready = False

    # --- layout ------------------------------------------------------------------------------------
    def check_root(self) -> None:
        """Raise a one-line StoreError unless the cache can at least be read: its root is a folder (a missing
        one is created). A read-only cache passes: it serves hits, and only a miss fails (in :meth:`ensure`)."""
        if self.root.is_dir():
            self._check_layout()
            self._sweep_once()
            return
        self.check_path()
        self.ensure()
        self._sweep_once()

    def check_path(self) -> None:
        """Raise a one-line StoreError if the cache root (or a folder above it) is a file; creates nothing."""
        for p in (self.root, self.base, *self.base.parents):
            if p.exists() and not p.is_dir():
                raise StoreError(f"cache directory {self.base} is not writable: {p} is a file, not a folder",
                                 hint="set JITKILN_CACHE_DIR (or --cache-dir) to a folder")
            if p.exists():
                break

    def _check_layout(self) -> None:
        for sub in ("objects", "manifests", "locks", "tmp", "builds"):
            p = self.root / sub
            if p.exists() and not p.is_dir():
                raise StoreError(f"cache directory {self.base} is damaged: {p} is a file, not a folder",
                                 hint=f"move {p} aside (or point JITKILN_CACHE_DIR elsewhere)")

    def _sweep_once(self) -> None:
        """Remove stale temporaries of killed writers (once per store, best effort; never on a read-only cache)."""
        if getattr(self, "_swept", False):
            return
        self._swept = True
        tmp = self.root / "tmp"
        if tmp.is_dir() and os.access(tmp, os.W_OK):
            sweep_stale_temporaries(tmp)

    def ensure(self) -> None:
        if self._ready:
            return
        try:
            for sub in ("objects", "manifests", "locks", "tmp", "builds", "logs", "corrupt"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / "tmp" / f".probe-{os.getpid()}-{os.urandom(4).hex()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(
                f"cache directory {self.base} is not writable ({e.strerror or e})",
                hint="set JITKILN_CACHE_DIR to a writable directory, or fix the permissions of this one "
                     "(a read-only cache serves only what it holds)") from None
        self._ready = True

    def obj_dir(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / key

    def manifest_path(self, ukey: str) -> Path:
        return self.root / "manifests" / ukey[:2] / f"{ukey}.json"

    def log_path(self, ukey: str) -> Path:
        return self.root / "logs" / f"{ukey}.log"

    # --- locking -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, ukey: str, what: str = "", on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Exclusive per-unit lock (flock): released by the kernel when its holder dies, so a killed
        build never blocks a later one."""
        self.ensure()
        path = self.root / "locks" / f"{ukey}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    try:
                        holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                    except OSError:
                        holder = ""
                    on_wait(holder or "another process")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}: {what}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # --- lookup ------------------------------------------------------------------------------------
    def read_manifest(self, ukey: str) -> list[dict]:
        p = self.manifest_path(ukey)
        try:
            recs = json.loads(p.read_text())
            if not isinstance(recs, list) or not all(isinstance(r, dict) and "key" in r and "deps" in r
                                                     for r in recs):
                raise ValueError("not a list of {key, deps}")
            return recs
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            self._quarantine(p, f"malformed manifest: {e}")
            return []

    def lookup(self, ukey: str, current_digest: Callable[[str], str | None]) -> Entry | None:
        """The verified entry of a unit whose recorded headers still have the recorded content, else None.

        ``current_digest(label)`` gives the digest a header has now (None if it is gone).
        """
        self.check_root()
        for rec in reversed(self.read_manifest(ukey)):
            if all(current_digest(lbl) == d for lbl, d in rec["deps"].items()):
                e = self.get(rec["key"])
                if e is not None:
                    return e
        return None

    def get(self, key: str) -> Entry | None:
        """A verified local entry, or None (a bad one is moved aside: a miss, rebuilt by the caller)."""
        self.check_root()
        if self.obj_dir(key).is_dir():
            try:
                return self.verify(key)
            except CorruptEntry:
                pass  # quarantined by verify
        return None

    def check(self, key: str, artifact: bytes, meta: dict, origin: str) -> None:
        """Raise CorruptEntry unless ``meta`` names ``key`` and records ``artifact``'s digest."""
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise CorruptEntry(f"entry {key[:16]} from {origin}: metadata names another key "
                               f"({str(meta.get('key') if isinstance(meta, dict) else meta)[:16]})")
        want = meta.get("artifact_sha256")
        got = hashlib.sha256(artifact).hexdigest()
        if want != got:
            raise CorruptEntry(f"entry {key[:16]} ({meta.get('name', '?')}) from {origin}: artifact digest "
                               f"{got[:16]} does not match the recorded {str(want)[:16]}")

    def verify(self, key: str) -> Entry:
        """Check an entry's metadata and artifact digest. A bad entry is moved aside; raises CorruptEntry."""
        d = self.obj_dir(key)
        try:
            meta = json.loads((d / "meta.json").read_text())
            artifact = (d / "artifact").read_bytes()
            self.check(key, artifact, meta, origin="the local cache")
        except (OSError, ValueError, CorruptEntry) as e:
            reason = e.reason if isinstance(e, CorruptEntry) else f"unreadable entry {key[:16]}: {e}"
            self._quarantine(d, reason)
            raise CorruptEntry(reason, hint="it was moved aside and will be rebuilt") from None
        return Entry(key, d, meta, artifact)

    def read_verified(self, entry: Entry) -> bytes:
        """The artifact's bytes, checked against the digest; these bytes (not the file) are what gets loaded.
        An entry that was just verified (or published) carries the bytes that were checked: no second read."""
        if entry.data is not None:
            data, entry.data = entry.data, None
            with contextlib.suppress(OSError):
                os.utime(entry.path)  # last use, for gc
            return data
        try:
            data = entry.artifact.read_bytes()
        except OSError as e:
            raise CorruptEntry(f"entry {entry.key[:16]} ({entry.name}) vanished: {e}") from None
        if hashlib.sha256(data).hexdigest() != entry.meta.get("artifact_sha256"):
            self._quarantine(entry.path, "artifact digest mismatch at load")
            raise CorruptEntry(f"entry {entry.key[:16]} ({entry.name}) failed its digest check at load; "
                               "it was moved aside and will be rebuilt")
        with contextlib.suppress(OSError):
            os.utime(entry.path)  # last use, for gc
        return data

    def _quarantine(self, path: Path, reason: str) -> None:
        dest = self.root / "corrupt" / f"{path.name}.{os.urandom(4).hex()}"
        with contextlib.suppress(OSError):
            os.rename(path, dest)
            (dest.with_suffix(dest.suffix + ".why") if dest.is_dir() else
             Path(str(dest) + ".why")).write_text(reason + "\n")
        _warn(f"cache: {reason}; moved aside to {dest}")

    # --- publish -----------------------------------------------------------------------------------
    def publish(self, ukey: str, deps: Mapping[str, str], artifact_path: str | os.PathLike | bytes,
                meta: dict[str, Any]) -> Entry:
        """Publish a compiled artifact atomically, then record the unit's manifest. Caller holds the lock."""
        key = entry_key(ukey, deps)
        data = artifact_path if isinstance(artifact_path, bytes) else Path(artifact_path).read_bytes()
        meta = dict(meta, key=key, ukey=ukey, artifact_sha256=hashlib.sha256(data).hexdigest(),
                    size=len(data), deps_count=len(deps), created=time.time())
        e = self.put_verified(key, data, meta)
        self.add_manifest(ukey, deps, key)
        return e

    def put_verified(self, key: str, data: bytes, meta: dict) -> Entry:
        """Publish an entry whose bytes the caller has verified against ``meta`` (a remote cache, a bundle):
        atomically, complete or not at all."""
        self.ensure()
        final = self.obj_dir(key)
        tmp = self.root / "tmp" / f"{key[:16]}.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            publish_entry_dir(tmp, final, data, meta)  # False: someone published the same key first
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(
                    f"disk full while publishing {meta.get('name', key[:16])} to {self.base}",
                    hint="free space or run `jitkiln cache gc --max-size SIZE`, then build again; "
                         "nothing partial was left in the cache") from None
            raise StoreError(f"could not publish {meta.get('name', key[:16])} to {self.base}: {e}",
                             hint="check that the cache directory is writable") from None
        return Entry(key, final, meta, data)

    def add_manifest(self, ukey: str, deps: Mapping[str, str], key: str) -> None:
        recs = [r for r in self.read_manifest(ukey) if r.get("key") != key]
        recs.append({"key": key, "deps": dict(deps)})
        p = self.manifest_path(ukey)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.{os.urandom(3).hex()}.tmp")
        try:
            write_durable(tmp, json.dumps(recs[-8:]).encode())
            os.replace(tmp, p)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"disk full while recording the manifest of unit {ukey[:16]}",
                                hint="free space, then build again") from None
            raise

    # --- maintenance -------------------------------------------------------------------------------
    def entries(self) -> Iterator[tuple[str, Path]]:
        self.check_root()
        objs = self.root / "objects"
        if not objs.is_dir():
            if objs.exists():
                raise StoreError(f"cache directory {self.base} is damaged: {objs} is not a folder",
                                 hint=f"move {objs} aside (or point JITKILN_CACHE_DIR elsewhere)")
            return
        for sub in sorted(objs.iterdir()):
            if sub.is_dir():
                for d in sorted(sub.iterdir()):
                    yield d.name, d

    def ls(self) -> list[dict]:
        """One row per entry. An entry whose metadata is unreadable or malformed gets a row with ``bad`` set
        (the reason): the caller reports it (``cache verify`` moves such entries aside)."""
        out = []
        for key, d in self.entries():
            bad = ""
            try:
                meta = json.loads((d / "meta.json").read_bytes().decode("utf-8"))
                if not isinstance(meta, dict):
                    bad, meta = f"metadata is JSON {type(meta).__name__}, not an object", {}
            except (OSError, ValueError) as e:
                bad, meta = f"unreadable metadata ({type(e).__name__})", {}
            row = {"key": key, "name": meta.get("name"), "family": meta.get("family"),
                   "size": meta.get("size"), "compile_s": meta.get("compile_s"),
                   "peak_rss": meta.get("peak_rss"), "toolchain": meta.get("toolchain"),
                   "arch": meta.get("arch")}
            types = {"name": str, "family": str, "size": int, "compile_s": (int, float), "peak_rss": int,
                     "toolchain": str, "arch": str}
            for f, t in types.items():
                v = row[f]
                if v is not None and (isinstance(v, bool) or not isinstance(v, t)):
                    bad = bad or f"metadata field {f!r} has the wrong type ({type(v).__name__})"
                    row[f] = None
            try:
                row["last_used"] = d.stat().st_mtime
            except OSError:
                row["last_used"] = None
            if bad:
                row["bad"] = bad
            out.append(row)
        return out

    def verify_all(self) -> tuple[int, list[str]]:
        ok, bad = 0, []
        for key, _ in list(self.entries()):
            try:
                self.verify(key)
                ok += 1
            except CorruptEntry as e:
                bad.append(e.reason)
        return ok, bad

    def size(self) -> int:
        total = 0
        for _, d in self.entries():
            for f in ("artifact", "meta.json"):
                with contextlib.suppress(OSError):
                    total += (d / f).stat().st_size
        return total

    def gc(self, max_bytes: int | None = None, max_age_s: float | None = None) -> list[str]:
        """Remove entries unused for longer than ``max_age_s``, then least recently used ones until the
        cache is under ``max_bytes``. Entries are immutable, so a concurrent reader either got its bytes
        already or sees a miss and rebuilds. Also clears stale temporary files."""
        self.ensure()
        now = time.time()
        items = []
        for key, d in self.entries():
            try:
                st = d.stat()
                sz = sum((d / f).stat().st_size for f in ("artifact", "meta.json") if (d / f).exists())
            except OSError:
                continue
            mtime = st.st_mtime
            if mtime > now + 60:  # dated in the future (clock skew, a copy): it ages from now, never immortal
                with contextlib.suppress(OSError):
                    os.utime(d, (now, now))
                mtime = now
            items.append((mtime, key, d, sz))
        items.sort()
        removed = []
        total = sum(i[3] for i in items)
        for mtime, key, d, sz in items:
            too_old = max_age_s is not None and now - mtime > max_age_s
            too_big = max_bytes is not None and total > max_bytes
            if too_old or too_big:
                if not remove_dir(d, self.root / "tmp"):
                    continue
                total -= sz
                removed.append(key)
        sweep_stale_temporaries(self.root / "tmp")
        return removed

    # --- build records ------------------------------------------------------------------------------
    def records_dir(self) -> Path:
        self.ensure()
        return self.root / "builds"

    def recorded_costs(self, ukey: str) -> tuple[float, int] | None:
        """(compile seconds, peak bytes) last recorded for this unit, from its newest entry."""
        for rec in reversed(self.read_manifest(ukey)):
            d = self.obj_dir(rec["key"])
            try:
                meta = json.loads((d / "meta.json").read_text())
                return float(meta["compile_s"]), int(meta.get("peak_rss", 0))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None


def publish_entry_dir(tmp: Path, final: Path, artifact: bytes, meta: dict) -> bool:
    """Write an entry (artifact + meta.json) into ``tmp``, fsync it, and rename it to ``final`` in one step, so
    readers see all of it or nothing. False if another writer published ``final`` first. OSError (disk
    full...) propagates; ``tmp`` is gone afterwards in every case."""
    try:
        tmp.mkdir(parents=True)
        write_durable(tmp / "artifact", artifact)
        write_durable(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False
        _fsync_dir(final.parent)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STALE_TMP_S = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def writer_pid(name: str, host: str | None = None) -> int | None:
    """The pid a temporary's name records (``KEY.PID.RAND``, ``KEY.HOST.PID.RAND``, ``.probe-PID-RAND``,
    ``.NAME.PID.tmp``), if it was written on this host; None when unknown."""
    import re
    host = host or os.uname().nodename
    m = re.fullmatch(r"\.probe-(\d+)-[0-9a-f]+", name) or re.fullmatch(r"[0-9a-f]{16}\.(\d+)\.[0-9a-f]+", name) \
        or re.fullmatch(r"\..+\.(\d+)\.tmp", name)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"[0-9a-f]{16}\.(.+)\.(\d+)\.[0-9a-f]+", name)
    if m and m.group(1) == host:
        return int(m.group(2))
    return None


def sweep_stale_temporaries(tmp: Path, max_age_s: float = STALE_TMP_S) -> list[str]:
    """Remove what killed writers left in ``tmp``: anything older than ``max_age_s``, or written by a process
    of this host that is gone. A live writer's fresh temporary is never touched. Best effort."""
    removed = []
    now = time.time()
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for n in names:
        t = tmp / n
        try:
            age = now - t.lstat().st_mtime
        except OSError:
            continue
        pid = writer_pid(n)
        if age > max_age_s or (pid is not None and pid != os.getpid() and not _pid_alive(pid)):
            with contextlib.suppress(OSError):
                shutil.rmtree(t) if t.is_dir() and not t.is_symlink() else t.unlink()
                removed.append(n)
    return removed


def remove_dir(d: Path, tmp_root: Path) -> bool:
    """Remove an entry directory atomically for readers: rename it aside first (a reader sees the whole
    entry or none), then delete it. False if it could not be moved (gone already, or busy)."""
    gone = tmp_root / f"gone-{d.name[:16]}-{os.urandom(3).hex()}"
    try:
        os.rename(d, gone)
    except OSError:
        return False
    shutil.rmtree(gone, ignore_errors=True)
    return True


def write_durable(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn(msg: str) -> None:
    print(f"jitkiln: warning: {msg}", file=sys.stderr)
