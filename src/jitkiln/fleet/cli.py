"""Command line of the fleet: ``prebuild`` (a signed bundle of a plan), ``seed`` (import one), ``keygen``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..build import Builder
from ..cliargs import add_plan_args, positive_int, executor_from_args, plan_from_args, store_from_args
from ..errors import UsageError
from .bundle import seed, signer_for, trust_for, write_bundle
from .signing import generate_keypair


def _check_output(path: str) -> None:
    """The bundle path must be writable before any build: a file in an existing folder."""
    out = Path(path)
    if not path or out.is_dir():
        raise UsageError(f"-o {path!r} is a folder, not a bundle file", hint="give a file path such as kimi.bundle")
    if not out.parent.is_dir():
        raise UsageError(f"-o {path}: the folder {out.parent} does not exist or is not a folder",
                         hint="create the folder first, or write the bundle elsewhere")


def cmd_prebuild(args) -> int:
    _check_output(args.output)
    signer = signer_for(args.key)
    plan = plan_from_args(args, require_compiler=True)
    store = store_from_args(args)
    executor = executor_from_args(args)
    Builder(store, jobs=args.jobs, progress=not args.json, executor=executor).build(plan)
    manifest = write_bundle(args.output, plan, store, signer)
    size = Path(args.output).stat().st_size
    if args.json:
        print(json.dumps({"bundle": args.output, "instances": [e["name"] for e in manifest["instances"]],
                          "toolchain": manifest["toolchain"], "arch": manifest["arch"], "bytes": size,
                          "key_id": signer.key_id}))
    else:
        print(f"wrote {args.output}: {len(manifest['instances'])} instances, {size / 2**20:.1f} MB, "
              f"{manifest['arch']}, {manifest['toolchain']}, signed by key {signer.key_id}")
    return 0


def cmd_seed(args) -> int:
    trust = trust_for(args.trust)
    if not trust:
        raise UsageError("no trusted key to check the bundle's signature with",
                         hint="pass --trust BUILDER.pub or set JITKILN_TRUST_KEYS (see docs/fleet.md)")
    r = seed(args.bundle, store_from_args(args), trust, arch=args.arch)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"seeded {len(r['seeded'])} instances ({len(r['already_present'])} already present) from "
              f"{args.bundle} into {r['cache']} ({r['family']} {r['variant']} {r['arch']}, signed by {r['signer']})")
        if r["header_mismatch"]:
            print(f"warning: {len(r['header_mismatch'])} instances were built against headers that differ from "
                  f"this machine's and will not be used: {', '.join(r['header_mismatch'][:4])}", file=sys.stderr)
    return 0


def cmd_keygen(args) -> int:
    priv, pub, kid = generate_keypair(args.output, comment=args.comment or "", force=args.force)
    print(f"private key {priv} (keep it secret: builders set JITKILN_SIGNING_KEY={priv})\n"
          f"public key  {pub} (key id {kid}: copy it to every machine and add it to JITKILN_TRUST_KEYS)")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("prebuild", help="build exactly a plan's instances and write a signed bundle")
    add_plan_args(p)
    p.add_argument("-o", "--output", required=True, help="the bundle to write (e.g. kimi.bundle)")
    p.add_argument("--key", help="signing key (default $JITKILN_SIGNING_KEY)")
    p.add_argument("--jobs", "-j", type=positive_int, help="parallel compiles")
    p.add_argument("--cache-dir", help="cache root (default $JITKILN_CACHE_DIR or ~/.cache/jitkiln)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where units compile")
    p.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS)")
    p.set_defaults(fn=cmd_prebuild)

    p = sub.add_parser("seed", help="import a signed bundle into the cache (refused unless fully verified)")
    p.add_argument("bundle")
    p.add_argument("--trust", action="append", metavar="PUB", help="a trusted public key file or directory "
                   "(repeatable; added to $JITKILN_TRUST_KEYS)")
    p.add_argument("--arch", help="this machine's arch (default: the GPU's; the bundle must match)")
    p.add_argument("--cache-dir", help="cache root (default $JITKILN_CACHE_DIR or ~/.cache/jitkiln)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_seed)

    p = sub.add_parser("keygen", help="create an ed25519 key pair for signing shared entries and bundles")
    p.add_argument("-o", "--output", required=True, help="private key path (the public key goes to PATH.pub)")
    p.add_argument("--comment", help="a comment in the public key (default user@host)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(fn=cmd_keygen)
