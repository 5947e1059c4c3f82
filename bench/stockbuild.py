"""The baseline users have today: every unit of a module written out and built by ninja into one shared object,
MAX_JOBS = cores (what AITER's JIT and torch cpp_extension do), optionally with ccache as the compiler launcher.

Used by bench/coldstart.py. The units are the family's own rendered instances (the same text jitkiln compiles),
compiled to objects with the same nvcc flags, then linked into one module and dlopen-ed. No torch-header unit is
added (upstream has one, ~20 s), so the baseline is, if anything, flattering to the stock path.
"""
from __future__ import annotations

import ctypes
import os
import resource
import shlex
import shutil
import subprocess
import time
from pathlib import Path


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def write_ninja(build_dir: Path, plan, instances, launcher: str | None = None) -> Path:
    """A build.ninja that compiles each instance's unit to an object and links one module."""
    from jitkiln.compilers.nvcc import Nvcc
    tc = plan.compiler or Nvcc.find()
    spec = plan.spec
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    objs = []
    lines = [
        f"nvcc = {shlex.quote(tc.path)}",
        f"launcher = {launcher or ''}",
        "cflags = " + " ".join(shlex.quote(x) for x in
                               [*tc.gencode(spec.arch), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
                                "-Xcompiler", "-fvisibility=hidden", *spec.flags,
                                *[f"-I{d}" for d in spec.include_dirs]]),
        "rule cc",
        "  command = $launcher $nvcc $cflags -c $in -o $out",
        "  description = CC $out",
        "rule link",
        "  command = $nvcc -shared $in -o $out",
        "  description = LINK $out",
    ]
    for inst in instances:
        f = src / f"{inst.name}.cu"
        f.write_text(plan.family.render(inst))
        o = f"obj/{inst.name}.o"
        objs.append(o)
        lines.append(f"build {o}: cc src/{f.name}")  # relative: ccache (with CCACHE_BASEDIR) shares across dirs
    lines.append(f"build module.so: link {' '.join(objs)}")
    lines.append("default module.so")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    return build_dir


def ninja_build(build_dir: Path, jobs: int, env: dict | None = None) -> dict:
    """Run ninja; return wall seconds (build + dlopen of the module), compiler CPU seconds and the ninja log."""
    ninja = shutil.which("ninja")
    if not ninja:
        raise SystemExit("ninja not found: `pip install ninja` or `apt-get install ninja-build`")
    cpu0, t0 = _children_cpu(), time.monotonic()
    p = subprocess.run([ninja, "-j", str(jobs), "-C", str(build_dir)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"stock ninja build failed:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}")
    build_s = time.monotonic() - t0
    ctypes.CDLL(str(build_dir / "module.so"), mode=os.RTLD_LOCAL)  # the load a server then does
    wall = time.monotonic() - t0
    return {"wall_s": round(wall, 3), "build_s": round(build_s, 3), "cpu_s": round(_children_cpu() - cpu0, 3),
            "ninja_log": parse_ninja_log(build_dir / ".ninja_log")}


def parse_ninja_log(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        start, end, _, out, _ = line.split("\t")
        rows.append({"name": Path(out).stem, "start": int(start) / 1000, "end": int(end) / 1000,
                     "seconds": (int(end) - int(start)) / 1000})
    return rows


def as_record(title: str, variant: str, log: list[dict], wall_s: float, jobs: int, unused=()) -> dict:
    """A ninja log shaped like a jitkiln build record, for the timeline picture."""
    units = [{"name": r["name"], "status": "compiled", "start": r["start"], "end": r["end"],
              "seconds": r["seconds"], "peak_rss": 0, "urgent": False} for r in log]
    return {"family": title, "variant": variant, "units": units, "wall_s": wall_s, "jobs": jobs,
            "critical_path_s": max([u["seconds"] for u in units] + [0]), "unused": list(unused),
            "module_key": "-" * 16}
