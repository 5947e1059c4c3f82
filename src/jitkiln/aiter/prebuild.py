"""``jitkiln aiter prebuild`` / ``seed``: build the reduced module once, ship it signed, drop it where AITER loads.

prebuild: plan, enable the hook, and build the module through AITER's own ``build_module`` (AITER's sources,
flags, ``build.ninja`` and link; jitkiln runs the compile edges through its object cache), so the ``.so`` lands
where AITER's loader looks (``AITER_JIT_DIR`` or AITER's jit folder) under the distinct name
``<stock md_name>_jk<key12>``. With ``-o`` it also writes a signed bundle::

    manifest.json   format, md_name, module key, variant, arch, plan, AITER generator fingerprint, torch version,
                    sha256 and size of the .so
    manifest.sig    ed25519 over the exact bytes of manifest.json (JITKILN_SIGNING_KEY / --key)
    <md_name>.so    the module

seed checks the bundle before writing anything (only those three regular files; signature by a trusted key;
digest; this machine's AITER generator fingerprint, torch version and arch; and that this machine's AITER, with
the bundled plan, asks for exactly this module name), then installs the .so atomically into AITER's JIT folder
and writes the plan file for ``JITKILN_AITER_PLAN``. AITER then imports the module with no compile.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import time
from pathlib import Path

from ..errors import JitkilnError, UsageError
from ..fleet import modbundle
from ..fleet.modbundle import BundleRefused  # noqa: F401 - part of this module's API
from .tree import AiterHookError, jit_dir, package_root, resolve_arch

FORMAT = "jitkiln-aiter-bundle"
VERSION = 1


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _stock_module(st):
    """AITER's own (md_name, blob_gen_cmd) for the planned variant, from AITER's unwrapped function."""
    moe_op = st.moe_op
    orig = getattr(moe_op.get_moe_stage_module, "_jitkiln_original", moe_op.get_moe_stage_module)
    orig = getattr(orig, "__wrapped__", orig)  # past functools.lru_cache
    v = st.mod.variant
    inv = {}
    for dt, s in moe_op.dtype2str_dict.items():
        inv.setdefault(s, dt)
    qname = {"no": "No", "per_tensor": "per_Tensor", "per_token": "per_Token", "per_1x32": "per_1x32",
             "per_1x128": "per_1x128"}[v.quant]
    act = {"silu": "Silu", "gelu": "Gelu", "swiglu": "Swiglu"}[v.act]
    md, cmd = orig(inv[v.a], inv[v.b], inv[v.c], getattr(moe_op.ActivationType, act),
                   getattr(moe_op.QuantType, qname), v.mul_stage, v.preshuffle)
    if not st.matches(cmd):
        raise AiterHookError(f"AITER's module for variant {v.name} runs its generator with {cmd}, not with "
                             f"{' '.join(v.generator_args())}", hint="this AITER names modules differently")
    return md, cmd


def _aiter_build_params(core) -> set:
    """Parameter names of AITER's own build_module (past any wrapper), e.g. ``third_party`` in newer AITER."""
    fn = core.build_module
    for _ in range(16):
        if getattr(fn, "__module__", None) == core.__name__ and getattr(fn, "__name__", "") == "build_module":
            break
        fn = getattr(fn, "_jitkiln_original", None) or getattr(fn, "__wrapped__", None) or fn
    return set(inspect.signature(fn).parameters)


def build(st) -> Path:
    """Build the planned module through AITER's build_module (hooked); returns the installed .so path."""
    core = st.core
    stock_md, _ = _stock_module(st)
    md = st.spec.md_name(stock_md)
    st.md_names[md] = stock_md
    d = core.get_args_of_build("module_moe_ck2stages")
    d.update(md_name=md, blob_gen_cmd=[st.blob_cmd()])
    so = Path(core.get_user_jit_dir()) / f"{md}.so"
    params = _aiter_build_params(core)
    first = ("srcs", "flags_extra_cc", "flags_extra_hip", "blob_gen_cmd", "extra_include", "extra_ldflags",
             "verbose", "is_python_module", "is_standalone", "torch_exclude")
    args = [d[k] for k in first]  # positional, as AITER's compile_ops passes them
    defaults = {"third_party": [], "hipify": False, "flags_extra_hip_per_source": None}
    kw = {k: d.get(k, v) for k, v in defaults.items() if k in params}
    prev = os.environ.get("HIP_CLANG_PATH")
    hcp = d.get("hip_clang_path")
    if hcp and os.path.exists(hcp):
        os.environ["HIP_CLANG_PATH"] = hcp
    try:
        core.build_module(md, *args, **kw)
    finally:
        if hcp and os.path.exists(hcp):
            os.environ.pop("HIP_CLANG_PATH", None) if prev is None else os.environ.__setitem__("HIP_CLANG_PATH", prev)
    if not so.is_file():
        raise AiterHookError(f"AITER's build of {md} finished but {so} is missing")
    return so


def prebuild(plan: dict, *, variant: str = "a4w4", arch: str | None = None, out: str | None = None,
             key: str | None = None, policy: str = "full") -> dict:
    arch = resolve_arch(arch)
    if os.environ.get("GPU_ARCHS", "native").strip() in ("", "native"):
        os.environ["GPU_ARCHS"] = arch  # before AITER is imported: its build flags follow GPU_ARCHS
    from .hook import enable
    st = enable(plan=dict(plan), variant=variant, arch=arch, policy=policy)
    if not st.spec.instances:
        raise UsageError("the plan needs no ck2stages instance: nothing to prebuild")
    so = build(st)
    data = so.read_bytes()
    stock_md, _ = _stock_module(st)
    man = {"format": FORMAT, "version": VERSION, "md_name": so.stem, "stock_md_name": stock_md,
           "module_key": st.spec.module_key, "variant": st.spec.variant, "arch": st.spec.arch,
           "plan": {**st.spec.plan, "variant": st.spec.variant, "arch": st.spec.arch, "policy": st.spec.policy},
           "instances": st.spec.instances, "aiter": {"version": st.spec.aiter_version,
                                                     "generator_fingerprint": st.spec.generator_fingerprint},
           "torch": _torch_version(), "created": time.time()}  # modbundle adds the .so's name, digest, size
    result = {"so": str(so), "md_name": so.stem, "module_key": st.spec.module_key,
              "instances": st.spec.instances}
    if out:
        modbundle.write(out, man, so.name, data, key)
        result["bundle"] = str(out)
    return result


def read_bundle(path: str, trust) -> tuple[dict, bytes]:
    """Check a bundle completely; returns (manifest, .so bytes). Writes nothing."""
    man, data = modbundle.read(path, trust, FORMAT, VERSION, "AITER")
    if man["so"]["name"] != f"{man.get('md_name')}.so":
        raise BundleRefused(f"{path}: the module {man['so']['name']} is not the manifest's {man.get('md_name')}.so")
    return man, data


def seed(path: str, *, trust_paths=None, arch: str | None = None, dest_dir: str | None = None) -> dict:
    man, data = read_bundle(path, modbundle.trust(trust_paths))
    try:
        here_arch = resolve_arch(arch)
    except JitkilnError as e:
        raise BundleRefused(f"cannot tell this machine's arch to check the bundle ({e})",
                            hint="pass --arch gfx950 (or set JITKILN_ARCH)") from None
    if here_arch != man["arch"]:
        raise BundleRefused(f"the bundle is for {man['arch']}, this machine is {here_arch}")
    if _torch_version() != man.get("torch"):
        raise BundleRefused(f"the bundle was built against torch {man.get('torch')}, this machine has "
                            f"{_torch_version()} (a torch extension must match torch's ABI)")
    root = package_root()
    from .planner import AiterCK2Stages, make_spec
    fam = AiterCK2Stages(aiter_root=str(root), arch=man["arch"])
    if fam.tree.fingerprint != man["aiter"]["generator_fingerprint"]:
        raise BundleRefused(f"the bundle was built with another AITER (generator {man['aiter']['generator_fingerprint'][:12]}, "
                            f"this machine's {root} is {fam.tree.fingerprint[:12]})",
                            hint="build the bundle with the same AITER version as the machines that load it")
    plan = dict(man["plan"])
    spec = make_spec(fam, plan.pop("variant"), {k: v for k, v in plan.items() if k not in ("arch", "policy")},
                     plan.get("policy", "full"))
    if spec.module_key != man["module_key"]:
        raise BundleRefused(f"this machine's AITER, with the bundled plan, asks for module {spec.suffix}, not the "
                            f"bundle's jk{man['module_key'][:12]}",
                            hint="the tuned configs (AITER_CONFIG_FMOE, CU_NUM) differ from the builder's")
    dest = Path(dest_dir) if dest_dir else jit_dir()
    dest.mkdir(parents=True, exist_ok=True)
    target = modbundle.install(data, dest / f"{man['md_name']}.so")
    pdir = dest / "jitkiln"
    pdir.mkdir(exist_ok=True)
    plan_path = pdir / f"{man['md_name']}.plan.json"
    plan_path.write_text(json.dumps(man["plan"], indent=2) + "\n")
    return {"installed": str(target), "plan": str(plan_path), "md_name": man["md_name"]}
