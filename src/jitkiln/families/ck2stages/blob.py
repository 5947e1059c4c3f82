"""``jitkiln aiter-blob``: write a reduced ck2stages module in AITER's own blob layout.

The folder holds what AITER's generator would write (``instances/*.cu``, ``gemm_moe_ck2stages_lookup.h``,
``ck2stages_moe_stage{1,2}_heuristic_dispatch.hpp``) but only with the instances the planned shapes need. The
dispatch returns the same instances as AITER's for those shapes and fails fast, with a message saying what is
missing and what to do, for any other shape. Use it as AITER's ``blob_gen_cmd`` (AITER runs ``python CMD``)::

    -m jitkiln.families.ck2stages.blob --variant a4w4 --shape inter_dim=1024,block_m=128 -w {}
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from ...errors import JitkilnError, UsageError
from ...family import Problem
from ...keys import module_key as make_module_key
from ...keys import sha256_hex
from .family import CK2Stages
from .module import AiterModule
from .render import template_call_text

MANIFEST = "jitkiln_module.json"


def _guard(mod: AiterModule, stage: int, params: list[tuple[str, str]]) -> str:
    vals = mod.variant.dispatch_values(stage)
    conds = []
    for typ, name in params:
        if name in ("block_m", "inter_dim"):
            continue
        if name not in vals:
            raise JitkilnError(f"AITER's stage-{stage} dispatch takes a parameter {name!r} jitkiln does not know",
                               hint="use a supported AITER version for aiter-blob, or write the full module")
        if "ScalarType" in typ:
            conds.append(f"dtype_checker<{vals[name]}>{{}}({name})")
        elif "bool" in typ:
            conds.append(f"{name} == {'true' if vals[name] else 'false'}")
        else:
            conds.append(f"{name} == {int(vals[name])}")
    return "\n        && ".join(conds) or "true"


def _interval_cond(iv: tuple[int, int | None], has_inter_dim: bool) -> str:
    lo, hi = iv
    parts = []
    if lo > 1:
        parts.append(f"inter_dim >= {lo}")
    if hi is not None:
        parts.append(f"inter_dim <= {hi}")
    if parts and not has_inter_dim:
        raise JitkilnError("AITER's dispatch depends on inter_dim but does not take it as a parameter")
    return "".join(f" && {p}" for p in parts)


def dispatch_header(mod: AiterModule, stage: int, planned: set[str], label: str, planned_for: str,
                    exact: Sequence[tuple[int, int, object]] = ()) -> str:
    aiter_text = mod.blob.dispatch[stage]
    fn = mod.dispatch[stage]
    m = re.search(rf"MoeKernel\s+moe_stage{stage}_heuristic_dispatch\s*\([^)]*\)\s*(\{{+)", aiter_text, re.S)
    if not m:
        raise JitkilnError(f"cannot find the stage-{stage} dispatch function in AITER's generated header")
    prefix, nbraces = aiter_text[:m.end()], len(m.group(1))
    has_inter = "inter_dim" in fn.param_names
    guards = re.findall(r"^\s*#\s*if\s+defined\s*\(?\s*(\w+)", aiter_text, re.M)
    lines = [f"\n    // jitkiln reduced module {label}: only the instances planned for {planned_for}"]
    lines += [f"#if defined({g})" for g in guards]
    lines += [f"    if ({_guard(mod, stage, fn.params)})", "    {"]
    if mod.regular(stage):
        for st, bm, iv, pick in mod.table:
            if st != stage or pick.instance is None or pick.instance.kernel not in planned:
                continue
            lines += [f"        if (block_m == {bm}{_interval_cond(iv, has_inter)})",
                      f"            return {template_call_text(mod, pick.instance)};"]
    else:  # inter_dim is tested arithmetically: guard the planned (block_m, inter_dim) pairs exactly
        for st, bm, idim, inst in exact:
            if st == stage:
                lines += [f"        if (block_m == {bm} && inter_dim == {idim})",
                          f"            return {template_call_text(mod, inst)};"]
    msg_shape = '"block_m=", block_m' + (', ", inter_dim=", inter_dim' if has_inter else "")
    lines += ["        TORCH_CHECK(false,",
              f'            "jitkiln reduced ck2stages module {label} has no stage-{stage} kernel for ", {msg_shape},',
              f'            "; it was planned for {planned_for}. Regenerate it with `jitkiln aiter-blob` including '
              f'this shape, or use AITER\'s full module (a different md_name).");',
              "    }"]
    lines += ["#endif" for _ in guards]
    lines += ['    TORCH_CHECK(false, "Unsupported kernel config for moe heuristic dispatch");',
              "}" * nbraces, ""]
    return prefix + "\n".join(lines)


def lookup_header(mod: AiterModule, kernels: Sequence[str]) -> str:
    text = mod.blob.lookup
    m = re.search(r"#\s*define\s+GENERATE_LOOKUP_TABLE\(\)", text)
    if not m:
        raise JitkilnError("AITER's lookup header has no GENERATE_LOOKUP_TABLE()")
    rows = [f'        {{"{k}", {template_call_text(mod, mod.by_name[k])}}},' for k in kernels]
    body = "\n".join(["#define GENERATE_LOOKUP_TABLE() {"] + rows + ["    }"])
    return text[:m.start()] + body.replace("\n", " \\\n") + "\n"


def module_key(fam: CK2Stages, variant: str, instances: Sequence, full: bool) -> str:
    """The module's identity for AITER (its md_name suffix): the engine's module key of these instances
    (distinct for full and reduced modules, variants, archs) together with the AITER tree's generator
    fingerprint (two AITER versions never share a name)."""
    fp = f"{fam.compile_spec(variant).toolchain}"
    return sha256_hex("jitkiln-aiter-module-v1",
                      make_module_key(fam.name, variant, full, [i.digest for i in instances], fp,
                                      fam.compile_spec(variant)),
                      fam.tree.fingerprint)


def write_blob(variant: str, problems: Sequence[Problem], out_dir, arch: str | None = None,
               aiter_root: str | None = None, *, full: bool = False) -> dict:
    """Write the module for ``problems`` (the full module when there are none or ``full``) into ``out_dir``."""
    fam = CK2Stages(aiter_root=aiter_root, arch=arch)
    variant = fam.check_variant(variant)
    mod = fam.module(variant)
    problems = [fam.check_problem(p) for p in problems]
    full = full or not problems
    if full:
        chosen = list(mod.instances)
    else:
        seen: dict[str, object] = {}
        exact = []
        for p in problems:
            res = fam._resolve(variant, p)
            for slot, inst in fam.select(variant, p).items():
                seen.setdefault(inst.digest, inst)
                if mod.pick(int(slot[-1]), res.block_m, p["inter_dim"]).instance == inst:
                    exact.append((int(slot[-1]), res.block_m, p["inter_dim"], inst))
        chosen = sorted(seen.values(), key=lambda i: (i.stage, i.kernel))
    key = module_key(fam, variant, chosen, full)
    label = f"{variant}/{fam.arch}/{'full' if full else 'reduced'}/{key[:12]}"
    out = Path(out_dir)
    (out / "instances").mkdir(parents=True, exist_ok=True)
    names = [i.kernel for i in chosen]
    stale = [p for p in (out / "instances").glob("*.cu") if p.stem not in names]
    for p in stale:
        p.unlink()  # a previous, different module in the same folder must not leak in
    for k in names:
        (out / "instances" / f"{k}.cu").write_text(mod.blob.instances[k])
    if full:
        (out / "gemm_moe_ck2stages_lookup.h").write_text(mod.blob.lookup)
        for s in (1, 2):
            (out / f"ck2stages_moe_stage{s}_heuristic_dispatch.hpp").write_text(mod.blob.dispatch[s])
    else:
        planned_for = fam.describe_problems(problems).replace('"', "'")
        (out / "gemm_moe_ck2stages_lookup.h").write_text(lookup_header(mod, names))
        for s in (1, 2):
            (out / f"ck2stages_moe_stage{s}_heuristic_dispatch.hpp").write_text(
                dispatch_header(mod, s, set(names), label, planned_for, sorted(set(exact), key=str)))
    manifest = {"family": "ck2stages", "variant": variant, "arch": fam.arch, "module": "full" if full else "reduced",
                "module_key": key, "md_name_suffix": f"jk{key[:12]}", "aiter": {
                    "root": str(fam.tree.root), "origin": fam.tree.origin, "version": fam.tree.version,
                    "generator_fingerprint": fam.tree.fingerprint,
                    "generator_args": list(mod.variant.generator_args())},
                "instances": names, "unused": [i.kernel for i in mod.instances if i.kernel not in names],
                "problems": problems}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


# --- command line -------------------------------------------------------------------------------------------

def parse_shape(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise UsageError(f"bad --shape {text!r}: expected K=V,K=V (e.g. inter_dim=1024,block_m=128)")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


from ...tokens import parse_tokens  # noqa: E402  (one definition of --tokens)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="a4w4", help="ck2stages variant (default a4w4)")
    p.add_argument("--shape", action="append", default=[], help="K=V,... e.g. inter_dim=1024,block_m=128")
    p.add_argument("--model", help="Hugging Face config.json of an MoE model")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree (shards inter_dim)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel degree (shards the experts)")
    p.add_argument("--tokens", help="token counts, e.g. 1-8192")
    p.add_argument("--arch", help="gfx950 or gfx942 (default: $JITKILN_ARCH, $GPU_ARCHS, gfx950)")
    p.add_argument("--aiter-root", help="AITER tree (default: $JITKILN_AITER_ROOT, else the installed amd-aiter)")
    p.add_argument("--full", action="store_true", help="write the full module")
    p.add_argument("-w", "--working_path", "--out", dest="out", required=True, help="blob folder to write")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _check_out_dir(path: str) -> None:
    """The blob folder must be creatable: refused before any work when it (or a folder above it) is a file."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"-w {path}: {p} is a file, not a folder",
                                 hint="give a folder for the blob (it is created if missing)")
            break


def run_args(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)
    fam = CK2Stages(aiter_root=args.aiter_root, arch=args.arch)
    shapes = [parse_shape(s) for s in args.shape]
    problems = fam.problems(args.variant, shapes=shapes, model=args.model, tp=args.tp, ep=args.ep,
                            tokens=parse_tokens(args.tokens) if args.tokens else None)
    try:
        man = write_blob(args.variant, problems, args.out, args.arch, args.aiter_root, full=args.full)
    except OSError as e:
        raise UsageError(f"cannot write the blob into {args.out}: {e.strerror or e}",
                         hint="give a writable folder (-w DIR)") from None
    if args.json:
        print(json.dumps(man, indent=2, default=str))
    else:
        print(f"wrote {man['module']} ck2stages module {man['variant']} ({man['arch']}) to {args.out}: "
              f"{len(man['instances'])} instances, {len(man['unused'])} left out; key {man['module_key'][:16]}")
        for n in man["instances"]:
            print(f"  {n}")
        print(f"use a distinct AITER md_name for it, e.g. ..._{man['md_name_suffix']}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``aiter-blob`` on an argparse subparsers object (``args.func(args)`` runs it)."""
    p = subparsers.add_parser("aiter-blob", help="write a reduced ck2stages module in AITER's blob layout",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_args, fn=run_args)  # jitkiln.cli dispatches on args.fn
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jitkiln.families.ck2stages.blob", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_args(args)
    except JitkilnError as e:
        print(f"error: {e.full()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
