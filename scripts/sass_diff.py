#!/usr/bin/env python3
"""Compare the machine code (SASS) of two CUDA artifacts, kernel by kernel.

    python scripts/sass_diff.py A B [--subset] [--kernel REGEX] [--no-encodings] [--json]

A and B are anything ``cuobjdump -sass`` reads: a ``.so`` (jitkiln's artifact), an object with host code
(``nvcc -c``), a ``.cubin`` or a ``.fatbin``. For each kernel the SASS text is normalised:

* instruction addresses (``/*0a40*/``) are dropped;
* non-semantic lines are dropped: the fatbin banner (``arch``, ``code version``, ``host``, ``compile_size``,
  ``identifier`` = the source file name), blank lines and separators;
* the hash nvcc gives an anonymous namespace (``<len>_GLOBAL__N__<hash>_<n>_<file>_<hash>``, derived from the
  file name and module id) is replaced by ``_GLOBAL__N_``, so the same kernel compiled from two file names
  compares; ``--rename PATTERN=REPL`` adds renames of your own (a packed unit's per-member namespace).

The instruction text *and* its encoding (``/* 0x... */``, the instruction's bytes) are compared unless
``--no-encodings`` is given. Kernels are matched by normalised name. ``--subset``: every kernel of A must be
in B with the same code (B may hold more, e.g. a packed unit holding several instances).

Exit status: 0 identical, 1 different (per-kernel unified diff printed), 2 usage or tool error.
cuobjdump is found on ``$CUOBJDUMP``, ``PATH``, ``$CUDA_HOME/bin`` or the PyPI ``nvidia-cuda-cuobjdump`` wheel
(nvcc 13 ships none: ``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``).
"""
from __future__ import annotations

import argparse
import difflib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

_ANON = re.compile(r"(\d+)(_GLOBAL__N__\w+)")
_ADDR = re.compile(r"^\s*/\*[0-9a-fA-F]{4,}\*/\s*")
_ENC = re.compile(r"\s*/\*\s*0x[0-9a-fA-F]{16}\s*\*/")
_BANNER = re.compile(r"^\s*(arch|code version|host|compile_size|identifier|producer)\s*=")


def find_cuobjdump() -> str:
    cands = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    for sp in sys.path:
        for pat in ("nvidia/cu*/bin/cuobjdump", "nvidia/cuda_cuobjdump/bin/cuobjdump"):
            cands += glob.glob(os.path.join(sp, pat))
    cands.append("/usr/local/cuda/bin/cuobjdump")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("cuobjdump not found: pip install nvidia-cuda-cuobjdump, or set CUOBJDUMP")


def dump(path: str, tool: str | None = None) -> str:
    tool = tool or find_cuobjdump()
    env = dict(os.environ)  # cuobjdump runs nvdisasm: the wheels put both in one bin directory
    env["PATH"] = os.path.dirname(tool) + os.pathsep + env.get("PATH", "")
    r = subprocess.run([tool, "-sass", path], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return r.stdout


_RENAMES: list[tuple[re.Pattern, str]] = []


def _anon(m: re.Match) -> str:
    # the mangled length prefix says exactly how long nvcc's anonymous-namespace identifier is
    n, rest = int(m.group(1)), m.group(2)
    return "_GLOBAL__N_" + rest[n:] if n <= len(rest) else m.group(0)


def normalise_name(name: str) -> str:
    name = _ANON.sub(_anon, name)
    for rx, repl in _RENAMES:
        name = rx.sub(repl, name)
    return name


def add_rename(spec: str) -> None:
    """``PATTERN=REPL`` (a regex): applied to kernel names and instruction text of both artifacts."""
    pat, _, repl = spec.partition("=")
    _RENAMES.append((re.compile(pat), repl))


def kernels(sass: str, encodings: bool = True) -> dict[str, list[str]]:
    """cuobjdump -sass text -> {normalised kernel name: normalised lines}."""
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    arch = ""
    for raw in sass.splitlines():
        line = raw.rstrip()
        m = re.match(r"^\s*arch\s*=\s*(\S+)", line)
        if m:
            arch = m.group(1)
        if _BANNER.match(line):
            continue
        m = re.match(r"^\s*Function\s*:\s*(\S+)", line)
        if m:
            key = normalise_name(m.group(1)) + (f" [{arch}]" if arch and arch != "sm_90a" else "")
            n, k = 1, key
            while k in out:  # the same kernel twice (two fatbin entries): keep both
                n += 1
                k = f"{key} #{n}"
            cur = out[k] = []
            continue
        if cur is None:
            continue
        if line.strip().startswith("Fatbin") or line.strip().startswith("code for"):
            cur = None
            continue
        text = _ADDR.sub("", line)
        if not encodings:
            text = _ENC.sub("", text)
        text = re.sub(r"\s+", " ", normalise_name(text)).strip()  # column alignment is not code
        if not text or set(text) <= set("/*. "):
            continue
        if re.fullmatch(r"/\*\s*0x[0-9a-fA-F]{16}\s*\*/", text):  # encoding continuation line
            if not encodings:
                continue
        cur.append(text)
    return out


def compare(a: dict[str, list[str]], b: dict[str, list[str]], subset: bool = False,
            kernel_re: str | None = None) -> dict:
    if kernel_re:
        rx = re.compile(kernel_re)
        a = {k: v for k, v in a.items() if rx.search(k)}
        b = {k: v for k, v in b.items() if rx.search(k)}
    only_a = sorted(set(a) - set(b))
    only_b = [] if subset else sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    same = sorted(k for k in set(a) & set(b) if a[k] == b[k])
    return {"identical": not (only_a or only_b or differ), "kernels_a": len(a), "kernels_b": len(b),
            "same": len(same), "only_a": only_a, "only_b": only_b, "differ": differ,
            "instructions_a": sum(len(v) for v in a.values()),
            "digest_a": hashlib.sha256("\n".join(f"{k}\n" + "\n".join(a[k]) for k in sorted(a)).encode())
            .hexdigest()[:16]}


def sass_identical(path_a: str, path_b: str, subset: bool = False, kernel_re: str | None = None,
                   encodings: bool = True) -> dict:
    """Library entry point (used by bench/instance_cost.py): the comparison summary of two artifacts."""
    tool = find_cuobjdump()
    ka, kb = kernels(dump(path_a, tool), encodings), kernels(dump(path_b, tool), encodings)
    return compare(ka, kb, subset, kernel_re)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--subset", action="store_true", help="A's kernels must be in B; B may hold more")
    ap.add_argument("--kernel", help="compare only kernels whose (normalised) name matches this regex")
    ap.add_argument("--rename", action="append", default=[], metavar="PATTERN=REPL",
                    help="regex rename of names in both (e.g. a packed unit's per-member namespace: "
                         "'\\d+jk[0-9a-f]{12}=2jk')")
    ap.add_argument("--no-encodings", action="store_true", help="compare instruction text only")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--context", type=int, default=3)
    args = ap.parse_args(argv)
    _RENAMES.clear()
    for r in args.rename:
        add_rename(r)
    try:
        tool = find_cuobjdump()
        ka = kernels(dump(args.a, tool), not args.no_encodings)
        kb = kernels(dump(args.b, tool), not args.no_encodings)
    except (OSError, RuntimeError) as e:
        print(f"sass_diff: {e}", file=sys.stderr)
        return 2
    if not ka:
        print(f"sass_diff: no SASS found in {args.a}", file=sys.stderr)
        return 2
    res = compare(ka, kb, args.subset, args.kernel)
    if not args.json:
        for k in res["only_a"]:
            print(f"only in {args.a}: {k}")
        for k in res["only_b"]:
            print(f"only in {args.b}: {k}")
        for k in res["differ"]:
            print(f"--- kernel {k}")
            sys.stdout.writelines(l + "\n" for l in difflib.unified_diff(
                ka[k], kb[k], args.a, args.b, n=args.context, lineterm=""))
        print(f"{'IDENTICAL' if res['identical'] else 'DIFFERENT'}: {res['same']} kernels identical, "
              f"{len(res['differ'])} differ, {len(res['only_a'])} only in A, {len(res['only_b'])} only in B "
              f"({res['instructions_a']} instructions in A)")
    else:
        print(json.dumps(res, indent=1))
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
