"""nvcc pipelined: nvcc's own steps (from ``--dryrun``) run as two chains side by side, host front end beside
the device chain, for the same artifact bytes and a shorter critical path when a second core is free.

Its policy (:data:`RULE`, :func:`should_pipeline`) lives here too: the builder only says how many cores would
idle while a job runs.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path

from .base import CompileResult, parse_depfile, raise_for_exit, run_measured

RULE = ("an nvcc unit compiles pipelined (host front end beside the device chain: same commands, same "
        "bytes, shorter critical path, one more core) when, at its start, a core would otherwise idle "
        "(units running + units waiting < min(jobs, cores)); else sequentially (the second core is better spent "
        "on another unit). JITKILN_NVCC_PIPELINE=0|1 forces it.")


def should_pipeline(spare_cores: int) -> bool:
    """Whether a job that would leave ``spare_cores`` cores idle should compile pipelined (see :data:`RULE`)."""
    forced = os.environ.get("JITKILN_NVCC_PIPELINE")
    if forced in ("0", "1"):
        return forced == "1"
    return spare_cores > 0


class PipelineUnsupported(Exception):
    """nvcc's plan (``--dryrun``) has a shape :func:`nvcc_pipeline` does not handle: run nvcc itself."""


def _dryrun_steps(cmd: list[str], cwd: str | None) -> tuple[list[str], list[str]]:
    """nvcc ``--dryrun`` -> (environment assignments, commands), both as shell text, in nvcc's order."""
    r = subprocess.run(cmd + ["--dryrun"], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise PipelineUnsupported(r.stderr[-500:])
    env, steps = [], []
    for line in (r.stdout + r.stderr).splitlines():
        if not line.startswith("#$ "):
            continue
        line = line[3:]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
            env.append(line)
        else:
            steps.append(line)
    return env, steps


def _step_kind(step: str) -> str:
    tool = shlex.split(step)[0] if step.strip() and not step.startswith("--") else step
    base = os.path.basename(tool.replace("$CICC_PATH/", ""))
    if step.startswith("-- Filter Dependencies --"):
        return "deps"
    if base == "gcc" and " -E " in step:
        return "gcc (preprocessing 1)" if "-D__CUDA_ARCH__=" in step else "gcc (preprocessing 4)"
    if base in ("cudafe++", "cicc", "ptxas", "nvlink", "rm"):
        return base
    if base == "fatbinary":
        return "fatbinary (link)" if " -link " in step else "fatbinary"
    if base == "gcc" and " -c " in step:
        return "gcc (compiling)"
    if base in ("g++", "gcc"):
        return "g++ (linking)"
    return "?"


def _quoted_arg(step: str, opt: str) -> str | None:
    m = re.search(rf'{re.escape(opt)}\s+"([^"]+)"', step)
    return m.group(1) if m else None


def _pch_cleanup(pch_step: str, cwd: str | None) -> None:
    out = _quoted_arg(pch_step, "-o")
    if out:
        try:
            os.unlink(os.path.join(cwd or ".", out))
        except OSError:
            pass


def _host_pch_steps(host: list, tail_gcc: str, cwd: str | None) -> list:
    """Steps that let the host gcc compile (7-10 s, after cicc) start early: once cudafe++ has written
    ``X.cudafe1.cpp``, its text up to the ``#include`` of cicc's stub becomes ``X.cudafe1.head.hpp``,
    precompiled (gcc PCH, same flags) beside cicc; ``X.cudafe1.cpp`` becomes ``#include "X.cudafe1.head.hpp"``
    plus the rest. The host compile after cicc then loads the PCH (~2 s instead of ~10 s). Same file name,
    same flags: the same object code (gcc ignores a PCH it cannot use and reads the header as text)."""
    cudafe = next((s for s, k in host if k == "cudafe++"), "")
    gen = _quoted_arg(cudafe, "--gen_c_file_name")
    stub = _quoted_arg(cudafe, "--stub_file_name")
    if not gen or not stub or f'"{gen}"' not in tail_gcc or " -c -x c++ " not in tail_gcc:
        return []
    path = os.path.join(cwd or ".", gen)
    head_name = os.path.basename(gen)[:-len(".cpp")] + ".head.hpp"
    head = os.path.join(os.path.dirname(gen), head_name)
    marker = f'#include "{stub}"'

    def split() -> bool:
        try:
            text = Path(path).read_text()
        except OSError:
            return False
        i = text.rfind(marker)
        if i < 0 or "\n#include" in text[i + len(marker):]:
            return False
        Path(cwd or ".", head).write_text(text[:i])
        Path(path).write_text(f'#include "{head_name}"\n' + text[i:])
        return True

    pch = tail_gcc.replace(" -c -x c++ ", " -x c++-header ").replace(f'"{gen}"', f'"{head}"')
    obj = _quoted_arg(tail_gcc, "-o")
    if not obj:
        return []
    pch = pch.replace(f'-o "{obj}"', f'-o "{head}.gch"')
    return [(split, "pch split"), (pch, "gcc (pch)")]


def run(cmd: list[str], src: str, out: str, deps_path: str, cwd: str | None = None,
                  log_path: str | None = None, timeout: float | None = None,
                  hold_fd: int | None = None) -> CompileResult:
    """Run the steps nvcc would run for ``cmd`` (one ``.cu`` to a ``.so``), as two chains in parallel:

    * host front end: preprocessing + cudafe++ (13 s of a 66 s CUTLASS instance on a 16-core host),
    * device: preprocessing, cicc (the long pole), ptxas, fatbinary,

    then what needs both (host gcc on cudafe++'s output, which includes cicc's stub and the fatbin; nvlink,
    the final link). The host gcc's parsing moves onto the host chain too: a gcc precompiled header of
    cudafe++'s output up to the stub (:func:`_host_pch_steps`), so what runs after cicc is ~2 s, not ~10.
    Each step is nvcc's own command line from ``--dryrun`` (with ``-keep``: fixed names), so the artifact
    is byte-for-byte the one nvcc makes (checked: a CUTLASS moe2stage unit and the demo units).
    Two changes: cicc generates the module id itself
    (as it does for ``-cubin``) instead of reading cudafe++'s, and both ids must be equal (else
    :class:`PipelineUnsupported`, and the caller runs nvcc); the dependency list comes from the two
    preprocessors' ``-MD`` (their union, as nvcc's filter gives). Phases are the wall seconds of each step.
    """
    env_lines, steps = _dryrun_steps(cmd, cwd)
    kinds = [_step_kind(s) for s in steps]
    if "?" in kinds or kinds.count("cicc") != 1 or kinds.count("cudafe++") != 1 or "deps" not in kinds:
        raise PipelineUnsupported(f"unknown nvcc plan: {kinds}")
    i_tail = kinds.index("gcc (compiling)") if "gcc (compiling)" in kinds else -1
    if i_tail < 0 or any(k in ("cicc", "cudafe++", "ptxas") for k in kinds[i_tail:]):
        raise PipelineUnsupported(f"unknown nvcc plan: {kinds}")
    host, device, prelude = [], [], []
    mod_host = mod_dev = None
    for s, k in zip(steps[:i_tail], kinds[:i_tail]):
        if k == "deps":
            continue
        if k == "rm":
            prelude.append((re.sub(r"^rm ", "rm -f ", s), k))
        elif k in ("gcc (preprocessing 4)", "cudafe++"):
            if k == "gcc (preprocessing 4)":
                s += f" -MD -MF {shlex.quote(deps_path)}"
            else:
                m = re.search(r'--module_id_file_name "([^"]+)"', s)
                if not m or "--gen_module_id_file" not in s:
                    raise PipelineUnsupported("cudafe++ does not generate the module id")
                mod_host = m.group(1)
            host.append((s, k))
        else:
            if k == "cicc":
                m = re.search(r'--module_id_file_name "([^"]+)"', s)
                if not m:
                    raise PipelineUnsupported("cicc reads no module id")
                mod_dev = m.group(1) + ".cicc"
                s = s.replace(m.group(0), f'--gen_module_id_file --module_id_file_name "{mod_dev}"')
            if k == "gcc (preprocessing 1)":
                s += f" -MD -MF {shlex.quote(deps_path + '.dev')}"
            device.append((s, k))
    tail = list(zip(steps[i_tail:], kinds[i_tail:]))
    if os.environ.get("JITKILN_NVCC_PCH", "1") != "0":
        host += _host_pch_steps(host, tail[0][0], cwd)
    env = dict(os.environ)
    for line in env_lines:  # nvcc's settings (PATH with nvvm/bin, CICC_PATH, LD_LIBRARY_PATH, ...)
        name, _, value = line.partition("=")
        try:
            env[name] = " ".join(shlex.split(value))
        except ValueError:
            env[name] = value.strip()
    phases: dict[str, float] = {}
    logs: list[str] = []
    peaks = {"host": 0, "device": 0, "tail": 0}
    cpu = [0.0]
    lock = threading.Lock()
    t0 = time.monotonic()

    def run_chain(chain, name):
        for s, k in chain:
            if callable(s):  # a step of our own (the PCH split): never fatal, it only costs time if skipped
                t = time.monotonic()
                ok = s()
                with lock:
                    phases[k] = round(phases.get(k, 0.0) + time.monotonic() - t, 4)
                if not ok:
                    break
                continue
            rc, log, wall, peak, c = run_measured(["bash", "-c", s], cwd=cwd, env=env, timeout=timeout,
                                                  hold_fd=hold_fd)
            if k == "gcc (pch)" and rc != 0:  # no PCH: the host compile reads the header as text
                with lock:
                    logs.append(f"(PCH not built, exit {rc}; compiling without it)\n{log}")
                _pch_cleanup(s, cwd)
                break
            with lock:
                phases[k] = round(phases.get(k, 0.0) + wall, 4)
                peaks[name] = max(peaks[name], peak)
                cpu[0] += c
                if log.strip():
                    logs.append(log)
            if rc != 0:
                return rc, s
        return 0, ""

    run_chain(prelude, "tail")
    results: dict[str, tuple[int, str]] = {}
    th = threading.Thread(target=lambda: results.__setitem__("host", run_chain(host, "host")))
    th.start()
    try:
        results["device"] = run_chain(device, "device")
    finally:
        th.join()
    failed = [r for r in (results["host"], results["device"]) if r[0] != 0]
    if not failed:
        mh = Path(cwd or ".", mod_host).read_text() if mod_host else ""
        md = Path(cwd or ".", mod_dev).read_text() if mod_dev else ""
        if mh != md:
            raise PipelineUnsupported(f"module ids differ: cudafe++ {mh!r}, cicc {md!r}")
        failed = [r for r in [run_chain(tail, "tail")] if r[0] != 0]
    wall = time.monotonic() - t0
    log = "\n".join(logs)
    if log_path:
        Path(log_path).write_text(f"$ {shlex.join(cmd)}  (pipelined: host front end beside device)\n{log}")
    if failed:
        raise_for_exit(failed[0][0], src, log, log_path)
    deps: list[str] = []
    for p in (deps_path, deps_path + ".dev"):  # what nvcc's filter gives: host and device headers, once
        if os.path.exists(p):
            deps += [d for d in parse_depfile(Path(p).read_text()) if d not in deps]
    return CompileResult(seconds=wall, peak_rss=peaks["host"] + peaks["device"], cpu_s=cpu[0], deps=deps,
                         phases=phases, log=log, command=cmd + ["(pipelined)"])

