"""ck2stages: AITER's CK two-stage MoE module, planned per deployment shape (see docs/ck2stages.md)."""
from .family import CK2Stages  # noqa: F401  (registers the family)


def write_blob(variant, problems, out_dir, arch=None, aiter_root=None, **kw):
    """Write a reduced (or full) module in AITER's blob layout; see :mod:`.blob`."""
    from .blob import write_blob as _w
    return _w(variant, problems, out_dir, arch, aiter_root, **kw)


def add_cli(subparsers):
    """Register the ``aiter-blob`` subcommand on an argparse subparsers object."""
    from .blob import add_cli as _a
    return _a(subparsers)
