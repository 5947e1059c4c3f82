"""AITER's ``blob_gen_cmd`` for a jitkiln reduced module: ``python -m jitkiln.aiter.blobcmd --spec SPEC -w DIR``.

AITER runs the command with ``os.system`` and ignores its exit status, so this command never leaves a partial
blob: on any failure it removes what it wrote, records the one-line reason in ``DIR/jitkiln_blob_error.txt``
(the hook's build guard reads it and stops AITER's build with it) and exits non-zero.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..errors import JitkilnError
from .planner import ERROR_FILE


def run(spec_path: str, out: str) -> None:
    from .planner import Spec, write_reduced_blob
    write_reduced_blob(Spec.load(spec_path), out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jitkiln.aiter.blobcmd", description=__doc__)
    p.add_argument("--spec", required=True)
    p.add_argument("-w", "--working_path", dest="out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        run(a.spec, a.out)
        (out / ERROR_FILE).unlink(missing_ok=True)
        return 0
    except Exception as e:  # noqa: BLE001 - every failure must leave no blob and one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        for sub in ("instances",):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in out.glob("*.h*"):
            f.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).write_text(f"jitkiln: {reason}\n")
        print(f"jitkiln: {reason}", file=sys.stderr)
        if isinstance(e, JitkilnError) and e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
