"""The resident CuTe DSL compile worker (``python -m jitkiln.compilers.cutedsl_worker``).

It imports the DSL once (the ~2-5 s of Python and MLIR imports), then serves compile requests, one JSON object
per line on stdin, one JSON reply per line on stdout (its own prints go to stderr)::

    {"kernel_path": ..., "kernel_sha256": ..., "entry": "compile_for", "params": {...}, "outdir": ..., "prefix": ...}
    -> {"ok": true, "seconds": ..., "export_s": ..., "cpu_s": ..., "peak_rss": ..., "files": [...]}
    -> {"ok": false, "kind": "compile"|"api"|"usage", "error": "...", "traceback": "..."}

The kernel module is loaded from its file (keyed by path and content digest, so an edited module is reloaded)
and its ``entry(params)`` returns the compiled callable, exported with ``export_to_c(outdir, prefix, prefix)``.
The worker exits at the end of its input (its parent died or let it go) or after ``JITKILN_CUTEDSL_MAX_JOBS``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import resource
import sys
import time
import traceback

_modules: dict[tuple[str, str], object] = {}


def _load(path: str, sha: str):
    key = (path, sha)
    mod = _modules.get(key)
    if mod is None:
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != sha:
            raise ValueError(f"kernel module {path} changed since the unit was planned (content digest differs)")
        name = f"_jk_dsl_{sha[:16]}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _modules[key] = mod
    return mod


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def serve(inp, out) -> None:
    t0 = time.monotonic()
    import cutlass  # noqa: F401 - the imports this worker exists to pay once
    import cutlass.cute  # noqa: F401
    version = getattr(cutlass, "__version__", "?")
    out.write(json.dumps({"ready": True, "version": version, "import_s": round(time.monotonic() - t0, 3),
                          "pid": os.getpid()}) + "\n")
    out.flush()
    max_jobs = int(os.environ.get("JITKILN_CUTEDSL_MAX_JOBS", "64") or 64)
    for n, line in enumerate(inp):
        if not line.strip():
            continue
        req = json.loads(line)
        t, c = time.monotonic(), _cpu()
        try:
            mod = _load(req["kernel_path"], req["kernel_sha256"])
            entry = getattr(mod, req.get("entry", "compile_for"))
            compiled = entry(req["params"])
            t1 = time.monotonic()
            os.makedirs(req["outdir"], exist_ok=True)
            compiled.export_to_c(file_path=req["outdir"], file_name=req["prefix"], function_prefix=req["prefix"])
            rep = {"ok": True, "seconds": round(time.monotonic() - t, 4), "compile_s": round(t1 - t, 4),
                   "export_s": round(time.monotonic() - t1, 4),
                   "files": sorted(os.listdir(req["outdir"]))}
        except (AttributeError, ImportError, TypeError) as e:  # the DSL's API is not the one the kernel uses
            rep = {"ok": False, "kind": "api", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        except ValueError as e:
            rep = {"ok": False, "kind": "usage", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}
        except Exception as e:  # noqa: BLE001 - the DSL's own compile errors (DSLRuntimeError, MLIR errors...)
            rep = {"ok": False, "kind": "compile", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}
        rep["cpu_s"] = round(_cpu() - c, 4)
        rep["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.write(json.dumps(rep) + "\n")
        out.flush()
        if n + 1 >= max_jobs:
            break


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the DSL's prints must not corrupt the reply stream
    serve(sys.stdin, out)


if __name__ == "__main__":
    main()
