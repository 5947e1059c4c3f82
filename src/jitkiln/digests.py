"""Content digests of headers, remembered across processes.

A warm start looks up every planned unit, and each lookup needs the current digest of every header the unit
read (a CUTLASS unit reads ~1,000 of them, ~30 MB). Hashing them all again in every process would cost more
than the rest of a warm start, so digests are remembered per file under the cache root, keyed by the file's
path, size, inode, and both its modification and status-change times (``st_ctime`` changes on any write and
cannot be set back by a user, unlike ``st_mtime``): any change to a header means a new key and a new hash.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from .compilers.base import file_digest

_lock = threading.Lock()
_memo: dict[str, dict[str, list]] = {}  # memo file -> {realpath: [stamp..., digest]}
_dirty: set[str] = set()


_memo_path_of: tuple[tuple, str] = ((), "")  # (the settings it depends on, the path): a warm start asks ~1,000 times


def _memo_path() -> str:
    global _memo_path_of
    env = (os.environ.get("JITKILN_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))
    if _memo_path_of[0] != env:
        from .store import LAYOUT, default_root
        _memo_path_of = (env, str(default_root() / LAYOUT / "header-digests.json"))
    return _memo_path_of[1]


def _stamp(st: os.stat_result) -> list:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def digest(path: str) -> str | None:
    """sha256 of ``path`` (None if it is gone), from the memo when the file has not changed."""
    mp = _memo_path()
    try:
        st = os.stat(path)
    except OSError:
        return None
    with _lock:
        memo = _memo.get(mp)
        if memo is None:
            try:
                memo = json.loads(Path(mp).read_text())
                if not isinstance(memo, dict):
                    memo = {}
            except (OSError, ValueError):
                memo = {}
            _memo[mp] = memo
        rec = memo.get(path)
        if isinstance(rec, list) and rec[:-1] == _stamp(st):
            return rec[-1]
    try:
        d = file_digest(path)
    except OSError:
        return None
    with _lock:
        memo[path] = _stamp(st) + [d]
        _dirty.add(mp)
    return d


def flush() -> None:
    """Write new digests back (merged with what other processes wrote meanwhile; losing a race only costs a
    re-hash later). A cache that cannot be written is fine: digests are then recomputed next time."""
    with _lock:
        todo = [mp for mp in _dirty]
        _dirty.clear()
        for mp in todo:
            p = Path(mp)
            try:
                try:
                    disk = json.loads(p.read_text())
                    if not isinstance(disk, dict):
                        disk = {}
                except (OSError, ValueError):
                    disk = {}
                disk.update(_memo[mp])
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_suffix(f".{os.getpid()}.{os.urandom(3).hex()}.tmp")
                try:
                    tmp.write_text(json.dumps(disk))
                    os.replace(tmp, p)
                finally:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
            except OSError:
                pass
