"""``jitkiln toolchain install rocm DIR``: set up a compiler where the machine lacks one (see
:mod:`jitkiln.compilers.rocm_install`)."""
from __future__ import annotations

from ..errors import UsageError
from . import rocm_install

INSTALLERS = {"rocm": rocm_install}


def cmd_toolchain(args) -> int:
    if args.action != "install":
        raise UsageError(f"unknown toolchain action {args.action!r}; try `jitkiln toolchain install rocm DIR`")
    mod = INSTALLERS.get(args.what)
    if mod is None:
        raise UsageError(f"no installer for {args.what!r}; known: {', '.join(INSTALLERS)}")
    path = mod.install(args.dir or mod.DEFAULT_DEST)
    print(f"{args.what} compiler ready in {path}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("toolchain", help="install a compiler this machine lacks (ROCm's hipcc in a chroot)")
    p.add_argument("action", choices=("install",))
    p.add_argument("what", choices=sorted(INSTALLERS), help="which compiler")
    p.add_argument("dir", nargs="?", help=f"where (default {rocm_install.DEFAULT_DEST})")
    p.set_defaults(fn=cmd_toolchain)
