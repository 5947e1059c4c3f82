"""``jitkiln flashinfer cc``: a content-addressed compiler launcher for ``FLASHINFER_NVCC_LAUNCHER`` and
``FLASHINFER_CXX_LAUNCHER`` (any FlashInfer module, any version)::

    export FLASHINFER_NVCC_LAUNCHER="python -m jitkiln.flashinfer.cc"
    export FLASHINFER_CXX_LAUNCHER="python -m jitkiln.flashinfer.cc"

FlashInfer's ninja then runs ``LAUNCHER nvcc ... -c SRC -o OUT``: the object comes from jitkiln's store (local
cache, and the shared directory / Redis / signed entries :func:`jitkiln.fleet.config.store_from_env`
configures) or is compiled once (per-unit lock: concurrent processes and machines sharing the lock folder wait
for the one compile) and published. Compiles are bounded by memory across every process of the machine
(``JITKILN_CC_SLOTS`` or free memory / expected peak, never more than the cores), and each one prints one
progress line. Anything that is not a single-file compile (a link) runs unchanged.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time

from ..build import available_memory, default_jobs
from ..errors import JitkilnError
from . import objcache


def slots(expected_mem: int) -> int:
    env = os.environ.get("JITKILN_CC_SLOTS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(default_jobs(), int(available_memory() * 0.9) // max(expected_mem, 1)))


@contextlib.contextmanager
def machine_slot(root, n: int):
    """One of ``n`` machine-wide compile slots (flock files): held for the compile, released by the kernel if the
    process dies."""
    d = root / "locks" / "cc-slots"
    d.mkdir(parents=True, exist_ok=True)
    fds = []
    try:
        while True:
            for i in range(n):
                fd = os.open(d / f"{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fds.append(fd)
                    break
                except BlockingIOError:
                    os.close(fd)
            if fds:
                break
            time.sleep(0.2)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def run(argv: list[str], store=None, out=sys.stderr) -> int:
    if not argv:
        print("jitkiln: error: jitkiln cc needs a compiler command (`jitkiln flashinfer cc nvcc ... -c SRC -o OUT`)",
              file=sys.stderr)
        return 2
    try:
        cmd = objcache.Command.parse(argv)
    except JitkilnError:
        os.execvp(argv[0], argv)  # not a compile (a link, a query): run it as given
    if store is None:
        from ..fleet.config import store_from_env
        store = store_from_env()
    is_cuda = "nvcc" in os.path.basename(cmd.compiler)
    c, fp, root, ukey, labels = objcache.prepare(argv)
    rec = store.recorded_costs(ukey)
    need = rec[1] if rec and rec[1] else (6 << 30 if is_cuda else 1 << 30)
    store.ensure()
    t0 = time.monotonic()
    o = objcache._compile_prepared(c, fp, root, ukey, labels, store, os.path.basename(cmd.source), None, None,
                                   None, lambda: machine_slot(store.root, slots(need)))
    print(f"jitkiln cc: {o.status:8s} {os.path.basename(cmd.source)} ({time.monotonic() - t0:.1f} s"
          + (f", {o.cpu_s:.0f} CPU-s, {o.peak_rss >> 20} MiB" if o.status == "compiled" else "") + ")",
          file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        return run(argv)
    except JitkilnError as e:
        print(f"jitkiln: error: {e.full()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
