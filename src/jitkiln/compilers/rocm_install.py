"""Install a HIP compiler on a machine without ROCm: Debian's ROCm (hipcc on Debian's clang) in a sid chroot.

Debian ships ROCm 7.2 in its ``experimental`` suite; it needs a newer glibc than Debian 12 has, so it lives in
a minimal Debian sid tree (``debootstrap --variant=minbase``) at ``DEST`` (e.g. ``/opt/jitkiln-rocm``, outside
any repository). The compiler runs there through :mod:`jitkiln.compilers.hipcc` in a private mount namespace
per compile (``bwrap``), with the host folders it needs bound at the same absolute paths.

``install(dest)`` is idempotent: a complete install (its manifest ``jitkiln-rocm.json`` matches this recipe and
the compiler's files are there) returns at once; a partial one (interrupted debootstrap or apt) is completed or,
when the base system itself is incomplete, redone. It needs root, ``apt-get`` on the host (for
``debootstrap``, ``bubblewrap``) and about 3 GB free. About 1.5 minutes (4 on a busy 2-core machine) and 1.1 GB.

Standalone: ``python -m jitkiln.compilers.rocm_install /opt/jitkiln-rocm``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ToolchainNotFound

RECIPE = 2  # bump when the package set or the layout changes: older installs are then completed again
MANIFEST = "jitkiln-rocm.json"
PARTIAL = ".jitkiln-rocm-partial"
DEFAULT_DEST = "/opt/jitkiln-rocm"
SUITE = "sid"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIN_FREE_BYTES = 3 << 30
LLVM = "22"

# libstdc++-12-dev: units are built against GCC 12's C++ headers (hipcc.py: --gcc-install-dir) so that they load
# where libstdc++ is older than sid's (Ubuntu 22.04: GLIBCXX_3.4.30).
# from experimental: the HIP compiler driver, the HIP runtime headers, the device libraries (bitcode), comgr,
# HSA headers, hipRTC, rocPRIM/rocThrust headers; python3-dev and pybind11-dev from sid (AITER units include
# torch/extension.h, which includes Python.h and pybind11).
EXPERIMENTAL_PACKAGES = ("hipcc", "libamdhip64-dev", f"rocm-device-libs-{LLVM}", "libamd-comgr-dev", "libamd-comgr3",
                         "libhsa-runtime-dev", "libhsa-runtime64-1", "libamdhip64-7", "libhiprtc7",
                         "libhiprtc-builtins7", "librocthrust-dev", "librocprim-dev")
SID_PACKAGES = ("python3-dev", "pybind11-dev", "libstdc++-12-dev")
REPORTED = ("hipcc", f"clang-{LLVM}", f"lld-{LLVM}", f"rocm-device-libs-{LLVM}", "libamdhip64-dev", "libamd-comgr3",
            "libstdc++6", "libstdc++-12-dev", "libc6", "python3-dev", "pybind11-dev")
# files that must exist in a complete install (relative to DEST)
REQUIRED = ("usr/bin/hipcc", f"usr/lib/llvm-{LLVM}/bin/clang", f"usr/lib/llvm-{LLVM}/bin/ld.lld",
            "usr/include/c++/12/iostream",
            f"usr/lib/llvm-{LLVM}/bin/clang-offload-bundler", "usr/include/hip/hip_runtime.h",
            "usr/bin/apt-get", "var/lib/dpkg/status")

Log = Callable[[str], None]


def _fail(reason: str, hint: str) -> ToolchainNotFound:
    return ToolchainNotFound(reason, hint=hint)


def read_manifest(dest: str | os.PathLike) -> dict | None:
    try:
        m = json.loads((Path(dest) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def is_complete(dest: str | os.PathLike) -> bool:
    """True when ``dest`` holds a complete install of this recipe (manifest written last, files present)."""
    d = Path(dest)
    m = read_manifest(d)
    if not m or m.get("recipe") != RECIPE or (d / PARTIAL).exists():
        return False
    return all((d / rel).exists() for rel in REQUIRED) and bool(device_bitcode_dir(d))


def device_bitcode_dir(dest: str | os.PathLike) -> str | None:
    """The folder of the AMD GPU device libraries (``ocml.bc``, ``oclc_*.bc``...) inside the install."""
    for rel in (f"usr/lib/llvm-{LLVM}/lib/clang/{LLVM}/amdgcn/bitcode", "usr/lib/x86_64-linux-gnu/amdgcn/bitcode"):
        p = Path(dest) / rel
        if (p / "ocml.bc").is_file():
            return str(p)
    hits = sorted(Path(dest).glob("usr/lib/**/amdgcn/bitcode/ocml.bc"))
    return str(hits[0].parent) if hits else None


def host_mirror() -> str:
    """The Debian mirror this host's apt uses (``JITKILN_DEBIAN_MIRROR`` overrides), else deb.debian.org."""
    env = os.environ.get("JITKILN_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + \
        sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^\s*(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            uri = m.group(1).rstrip("/")
            if uri.endswith("/debian") and "security" not in uri:
                return uri
    return DEFAULT_MIRROR


def _run(cmd: list[str], log: Log, what: str, env: dict | None = None) -> str:
    log(f"$ {' '.join(cmd)}")
    p = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if p.returncode != 0:
        tail = "\n".join(p.stdout.strip().splitlines()[-15:])
        if re.search(r"No space left on device", p.stdout):
            raise _fail(f"{what} failed: no space left on device", "free at least 3 GB where the install goes")
        raise ToolchainNotFound(f"{what} failed (exit {p.returncode})",
                                hint="re-run the install (a partial install is completed or redone); "
                                     "check the network access to the Debian mirror (JITKILN_DEBIAN_MIRROR)",
                                details=tail)
    return p.stdout


def _in_root(dest: Path, cmd: list[str], log: Log, what: str) -> str:
    """Run ``cmd`` chrooted in ``dest``, with /proc and /dev, in a private mount namespace (nothing leaks)."""
    script = ('set -e; mount -t proc proc "$R/proc"; mount --rbind /dev "$R/dev"; '
              'exec chroot "$R" "$@"')
    env = dict(os.environ, R=str(dest), DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8", LANG="C.UTF-8",
               PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    return _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd], log, what, env)


def _host_tool(exe: str, package: str, log: Log) -> str:
    path = shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/sbin:/usr/bin")
    if path:
        return path
    if not shutil.which("apt-get"):
        raise _fail(f"{exe} is missing and this host has no apt-get to install it",
                    f"install {package} with the host's package manager, then re-run")
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package], log, f"apt-get install {package}",
         env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    path = shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/sbin:/usr/bin")
    if not path:
        raise _fail(f"{exe} still missing after installing {package}", f"install {package} by hand")
    return path


def _check_host(dest: Path) -> None:
    if sys.platform != "linux":
        raise _fail("the ROCm chroot install works on Linux only", "use a Linux x86_64 machine")
    if os.uname().machine != "x86_64":
        raise _fail(f"the ROCm chroot install needs x86_64 (this is {os.uname().machine})", "use an x86_64 machine")
    if os.geteuid() != 0:
        raise _fail("installing the ROCm chroot needs root (debootstrap, chroot, mounts)",
                    f"run it as root: sudo jitkiln toolchain install rocm {dest}")
    probe = dest
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES and not (dest / "usr").exists():
        raise _fail(f"not enough space for the ROCm chroot at {dest}: {free >> 20} MiB free, about 3 GiB needed",
                    "free some space or choose another folder")


def _mounted_under(dest: Path) -> list[str]:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    d = str(dest.resolve())
    return [f.split()[4] for f in lines if f.split()[4] == d or f.split()[4].startswith(d + "/")]


def _wipe(dest: Path, log: Log) -> None:
    mounts = _mounted_under(dest)
    if mounts:
        raise _fail(f"cannot redo the partial install at {dest}: something is mounted under it ({mounts[0]})",
                    f"unmount it (umount -R {mounts[0]}), then re-run")
    log(f"removing the incomplete base system in {dest}")
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def installed_versions(dest: Path) -> dict[str, str]:
    versions: dict[str, str] = {}
    try:
        status = (dest / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return versions
    for block in status.split("\n\n"):
        name = re.search(r"^Package: (\S+)", block, re.MULTILINE)
        ver = re.search(r"^Version: (\S+)", block, re.MULTILINE)
        ok = re.search(r"^Status: .* installed$", block, re.MULTILINE)
        if name and ver and ok and name.group(1) in REPORTED:
            versions[name.group(1)] = ver.group(1)
    return versions


def install(dest: str | os.PathLike = DEFAULT_DEST, log: Log = print, mirror: str | None = None) -> Path:
    """Install (or complete) the ROCm chroot at ``dest``; return the folder to give ``JITKILN_ROCM_CHROOT``."""
    dest = Path(dest).absolute()
    for p in (dest, *dest.parents):
        if p.exists():
            if not p.is_dir():
                raise _fail(f"cannot install into {dest}: {p} is a file", "give a folder (e.g. /opt/jitkiln-rocm)")
            break
    if is_complete(dest):
        log(f"ROCm chroot at {dest} is complete ({read_manifest(dest).get('versions', {}).get('hipcc', '?')})")
        return dest
    _check_host(dest)
    t0 = time.monotonic()
    mirror = (mirror or host_mirror()).rstrip("/")
    if dest.exists() and any(dest.iterdir()) and not (dest / PARTIAL).exists() and read_manifest(dest) is None:
        raise _fail(f"{dest} is not empty and is not a jitkiln ROCm install",
                    "choose an empty or new folder (e.g. /opt/jitkiln-rocm)")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / PARTIAL).write_text(f"started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")

    # 1. the base system; debootstrap leaves debootstrap/ behind until it has finished
    base_ok = (dest / "usr/bin/apt-get").exists() and (dest / "var/lib/dpkg/status").exists() and \
        not (dest / "debootstrap").exists()
    if not base_ok:
        debootstrap = _host_tool("debootstrap", "debootstrap", log)
        if any(p.name != PARTIAL for p in dest.iterdir()):
            _wipe(dest, log)
            (dest / PARTIAL).write_text("redoing the base system\n")
        log(f"debootstrap {SUITE} into {dest} from {mirror} (about a minute)")
        _run([debootstrap, "--variant=minbase", SUITE, str(dest), mirror], log, "debootstrap")
    _host_tool("bwrap", "bubblewrap", log)  # what runs the compiler (see hipcc.py)

    # 2. apt sources: sid + experimental (whose Release file is past Valid-Until)
    (dest / "etc/apt/sources.list").write_text(f"deb {mirror} {SUITE} main\ndeb {mirror} experimental main\n")
    (dest / "etc/apt/apt.conf.d/99jitkiln").write_text('Acquire::Check-Valid-Until "false";\n'
                                                       'APT::Install-Recommends "false";\n')
    for rc in ("/etc/resolv.conf",):
        try:
            shutil.copyfile(rc, dest / rc.lstrip("/"))
        except OSError:
            pass
    _in_root(dest, ["dpkg", "--configure", "-a"], log, "dpkg --configure -a")  # completes an interrupted apt
    _in_root(dest, ["apt-get", "update", "-q"], log, "apt-get update (in the chroot)")
    log("installing ROCm from experimental (about a minute)")
    _in_root(dest, ["apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confdef", "-t", "experimental",
                    *EXPERIMENTAL_PACKAGES, *SID_PACKAGES], log, "apt-get install (in the chroot)")
    missing = [rel for rel in REQUIRED if not (dest / rel).exists()]
    if missing or not device_bitcode_dir(dest):  # installed but files gone (removed by hand): reinstall once
        log(f"{missing[0] if missing else 'device bitcode'} is missing: reinstalling the packages")
        _in_root(dest, ["apt-get", "install", "-y", "-q", "--reinstall", "-t", "experimental",
                        *EXPERIMENTAL_PACKAGES], log, "apt-get install --reinstall (in the chroot)")
    _in_root(dest, ["apt-get", "clean"], log, "apt-get clean")

    missing = [rel for rel in REQUIRED if not (dest / rel).exists()]
    if missing or not device_bitcode_dir(dest):
        raise _fail(f"the ROCm chroot at {dest} lacks {missing[0] if missing else 'the device bitcode libraries'} "
                    "after installing", "the Debian packages may have changed layout; report it")
    out = subprocess.run(["bwrap", "--bind", str(dest), "/", "--proc", "/proc", "--dev", "/dev", "hipcc",
                          "--version"], check=False, capture_output=True, text=True)
    m = re.search(r"HIP version:\s*(\S+)", out.stdout)
    if out.returncode != 0 or not m:
        raise _fail(f"hipcc in {dest} does not run: {(out.stderr or out.stdout).strip()[:200]}",
                    "re-run the install; if it persists, remove the folder and install again")
    manifest = {"recipe": RECIPE, "suite": SUITE, "mirror": mirror, "hip_version": m.group(1),
                "versions": installed_versions(dest), "packages": list(EXPERIMENTAL_PACKAGES + SID_PACKAGES),
                "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.monotonic() - t0, 1)}
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, dest / MANIFEST)
    (dest / PARTIAL).unlink()
    log(f"ROCm chroot ready at {dest}: hipcc {m.group(1)}, clang {manifest['versions'].get(f'clang-{LLVM}', '?')} "
        f"({manifest['seconds']} s)")
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m jitkiln.compilers.rocm_install",
                                 description="Install Debian's ROCm (hipcc) in a sid chroot for jitkiln.")
    ap.add_argument("dest", nargs="?", default=DEFAULT_DEST)
    ap.add_argument("--mirror", default=None, help="Debian mirror (default: the one this host's apt uses)")
    ap.add_argument("--check", action="store_true", help="only say whether DEST holds a complete install")
    a = ap.parse_args(argv)
    if a.check:
        ok = is_complete(a.dest)
        print(f"{a.dest}: {'complete' if ok else 'not a complete install'}")
        return 0 if ok else 1
    try:
        path = install(a.dest, mirror=a.mirror)
    except ToolchainNotFound as e:
        print(e.full(), file=sys.stderr)
        return e.exit_code
    print(f"export JITKILN_ROCM_CHROOT={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
