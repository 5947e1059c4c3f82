"""The runtime hook: AITER builds/loads jitkiln's reduced ck2stages module under its own name.

Wrapped at run time (module attributes replaced; AITER's files are never edited), all reversible by
:func:`disable`:

* ``aiter.ops.moe_op.ck_moe_stage1`` / ``ck_moe_stage2`` (and every ``aiter*`` module attribute bound to them):
  record the call's shape (stage, ``block_m``, ``inter_dim`` computed as AITER's C++ does, ``kernelName``) in a
  context variable, then call AITER's function unchanged.
* ``aiter.ops.moe_op.get_moe_stage_module`` (looked up as a global by AITER's ``cmdGenFunc_ck_moe_stage*``, the
  ``gen_func`` of ``compile_ops``): for the planned variant and a shape whose instance is planned, returns
  ``(<stock md_name>_jk<key12>, ["-m jitkiln.aiter.blobcmd --spec SPEC -w {}"])``; otherwise AITER's own answer
  (policy ``full``) or raises :class:`AiterHookError` (policy ``error``).
* ``aiter.jit.core.build_module``: for a jitkiln module, first writes the blob in Python (a failure raises the
  one-line reason before anything compiles; AITER's ``os.system`` would ignore it), then runs AITER's build and
  turns its ``SystemExit`` into the reason.
* ``cpp_extension._run_ninja_build`` (AITER's copy of torch's): for a jitkiln module, checks the blob AITER's
  command wrote (refuses a missing or different module before any compile), then runs AITER's own
  ``build.ninja`` through jitkiln's object cache (:mod:`.objcache`); other modules keep ninja.

Longer than 400 lines: every AITER function the hook wraps, and their restoring, in one place.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import json
import logging
import os
import re
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JitkilnError, UsageError
from .planner import (
    ERROR_FILE,
    POLICIES,
    Spec,
    blob_command,
    make_spec,
    save_spec,
    write_reduced_blob,
)
from .tree import AiterHookError, check_tree, resolve_arch, runtime_root

log = logging.getLogger("jitkiln.aiter")
ENV_PLAN = "JITKILN_AITER_PLAN"
ENV_POLICY = "JITKILN_AITER_POLICY"
_CALL: contextvars.ContextVar = contextvars.ContextVar("jitkiln_aiter_call", default=None)
_LOCK = threading.RLock()
_STATE: HookState | None = None
_ARGS = ("x", "w1", "w2", "sorted_token_ids", "sorted_expert_ids", "num_valid_ids", "out", "topk", "kernelName",
         "w_scale", "a_scale", "block_m")


@dataclass(frozen=True)
class CallShape:
    stage: int
    block_m: int
    inter_dim: int
    kernel: str = ""


@dataclass
class HookState:
    spec: Spec
    spec_path: Path
    fam: object
    core: object
    moe_op: object
    cache: bool = True
    md_names: dict = field(default_factory=dict)  # jitkiln md_name -> stock md_name
    building: dict = field(default_factory=dict)  # jitkiln md_name -> op_dir
    originals: list = field(default_factory=list)  # (module, attr, original)
    decisions: list = field(default_factory=list)  # (md_name chosen, reason) of the last calls, for status()

    @property
    def policy(self) -> str:
        return self.spec.policy

    @property
    def mod(self):
        return self.fam.module(self.spec.variant)

    def blob_cmd(self) -> str:
        return blob_command(self.spec_path)

    def matches(self, stock_cmd) -> bool:
        text = stock_cmd[0] if isinstance(stock_cmd, (list, tuple)) and stock_cmd else str(stock_cmd)
        m = re.search(r"(\S*gen_instances\.py)\s+(.*?)\s+-w\s+\{\}", text)
        if not m:
            return False
        if tuple(m.group(2).split()) != tuple(self.spec.generator_args):
            return False
        gen = Path(m.group(1)).resolve()
        if not str(gen).startswith(str(Path(self.spec.aiter_root).resolve()) + os.sep):
            raise AiterHookError(f"AITER asks for its generator {gen}, outside the tree jitkiln planned against "
                                 f"({self.spec.aiter_root})",
                                 hint="enable jitkiln.aiter after importing the AITER that runs")
        return True

    def need(self, call: CallShape | None):
        """(instance, '') when the call's instance is planned, else (None, reason)."""
        if call is None:
            return None, "the call's shape is unknown (AITER was reached outside ck_moe_stage1/ck_moe_stage2)"
        mod = self.mod
        if call.kernel and call.kernel in mod.by_name:
            inst = mod.by_name[call.kernel]
        else:
            pick = mod.pick(call.stage, call.block_m, call.inter_dim)
            if pick.instance is None:
                return None, (f"AITER's stage-{call.stage} dispatch has no kernel for block_m={call.block_m}, "
                              f"inter_dim={call.inter_dim}")
            inst = pick.instance
        if inst.kernel in self.spec.instances:
            return inst, ""
        return None, (f"stage-{call.stage} call with block_m={call.block_m}, inter_dim={call.inter_dim}"
                      + (f", kernelName={call.kernel}" if call.kernel else "")
                      + f" needs {inst.kernel}, which jitkiln's reduced module {self.spec.variant}/{self.spec.arch}/"
                        f"{self.spec.suffix} does not contain (planned for "
                        f"{self.fam.describe_problems(self.spec.problems)})")


# --- the wrappers -----------------------------------------------------------------------------------------

def _is_fp4(t) -> bool:
    return "float4_e2m1fn_x2" in str(getattr(t, "dtype", ""))


def call_shape(stage: int, args, kwargs) -> CallShape | None:
    """The dispatch inputs of a ck_moe_stage{1,2} call, computed as AITER's gemm_moe_ck2stages.cu does."""
    try:
        a = dict(zip(_ARGS, args))
        for k, v in kwargs.items():
            a["x" if k in ("hidden_states", "inter_states") else k] = v
        bm = a.get("block_m")
        bm = 32 if bm is None else int(bm)
        if stage == 1:
            inter = int(a["w1"].shape[1]) // 2
        else:
            inter = int(a["x"].shape[-1]) * (2 if _is_fp4(a["x"]) and _is_fp4(a["w2"]) else 1)
        return CallShape(stage, bm, inter, str(a.get("kernelName") or ""))
    except Exception:  # noqa: BLE001 - an unexpected call form: the shape is unknown, the policy decides
        return None


_GEN_FUNCS = {"cmdGenFunc_ck_moe_stage": 1, "cmdGenFunc_ck_moe_stage2": 2}


def shape_from_caller(frame) -> CallShape | None:
    """Fallback when no stage wrapper saw the call (e.g. the op runs inside a torch.compile'd graph, where
    only AITER's custom op executes): AITER's ``cmdGenFunc_ck_moe_stage{,2}`` holds the call's arguments."""
    f = frame
    for _ in range(3):
        if f is None:
            return None
        stage = _GEN_FUNCS.get(f.f_code.co_name)
        if stage is not None:
            loc = f.f_locals
            return call_shape(stage, (), {"x": loc.get("hidden_states", loc.get("inter_states")),
                                          "w1": loc.get("w1"), "w2": loc.get("w2"),
                                          "kernelName": loc.get("kernelName"), "block_m": loc.get("block_m")})
        f = f.f_back
    return None


def _wrap_stage(stage: int, orig):
    @functools.wraps(orig)
    def ck_moe_stage(*args, **kwargs):
        tok = _CALL.set(call_shape(stage, args, kwargs))
        try:
            return orig(*args, **kwargs)
        finally:
            _CALL.reset(tok)
    ck_moe_stage._jitkiln_original = orig
    return ck_moe_stage


def _wrap_get_moe_stage_module(orig):
    @functools.wraps(orig)
    def get_moe_stage_module(*args, **kwargs):
        md, cmd = orig(*args, **kwargs)
        st = _STATE
        if st is None or not st.matches(cmd):
            return md, cmd
        call = _CALL.get()
        if call is None:
            call = shape_from_caller(sys._getframe(1))
        inst, why = st.need(call)
        if inst is not None:
            name = st.spec.md_name(md)
            st.md_names[name] = md
            st.decisions = (st.decisions + [(name, inst.kernel)])[-32:]
            return name, [st.blob_cmd()]
        if st.policy == "error":
            raise AiterHookError(f"jitkiln.aiter (policy 'error'): {why}",
                                 hint="re-plan including this shape (jitkiln.aiter.enable(...)), or use policy "
                                      "'full' to run AITER's full module for it")
        log.info("jitkiln.aiter: %s; using AITER's full module %s", why, md)
        st.decisions = (st.decisions + [(md, why)])[-32:]
        return md, cmd
    get_moe_stage_module._jitkiln_original = orig
    return get_moe_stage_module


def _reason_of(exc: BaseException) -> str:
    seen = exc
    while seen is not None:
        if isinstance(seen, JitkilnError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    for line in text.splitlines():
        if "error:" in line.lower():
            return line.strip()
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def _wrap_build_module(orig, core):
    @functools.wraps(orig)
    def build_module(md_name, *args, **kwargs):
        st = _STATE
        if st is None or md_name not in st.md_names:
            return orig(md_name, *args, **kwargs)
        with tempfile.TemporaryDirectory(prefix="jitkiln-aiter-preflight-") as d:
            try:
                write_reduced_blob(st.spec, d)
            except JitkilnError as e:
                raise AiterHookError(f"jitkiln cannot write the reduced module {md_name}: {e}", hint=e.hint) from None
        st.building[md_name] = os.path.join(core.bd_dir, md_name)
        try:
            return orig(md_name, *args, **kwargs)
        except SystemExit as e:
            inner = e.__cause__
            while inner is not None and not isinstance(inner, JitkilnError):
                inner = inner.__cause__ or inner.__context__
            if isinstance(inner, JitkilnError):
                raise inner from None
            raise AiterHookError(f"AITER's build of jitkiln module {md_name} failed: {_reason_of(e)}",
                                 hint=f"the full log is above; the build folder is {core.bd_dir}/{md_name}") from e
        finally:
            st.building.pop(md_name, None)
    build_module._jitkiln_original = orig
    return build_module


def _roots(spec: Spec, cpp_ext) -> dict:
    roots = {"aiter": spec.aiter_root, "rocm": getattr(cpp_ext, "ROCM_HOME", None) or "",
             "py": sysconfig.get_path("include") or ""}
    try:
        import torch
        roots["torch"] = os.path.dirname(torch.__file__)
    except Exception:  # noqa: BLE001
        pass
    return roots


def _wrap_run_ninja(orig, cpp_ext):
    @functools.wraps(orig)
    def _run_ninja_build(build_directory, verbose, error_prefix):
        st = _STATE
        md = None
        if st is not None:
            for name, op_dir in list(st.building.items()):
                if os.path.realpath(build_directory) == os.path.realpath(os.path.join(op_dir, "build")):
                    md = name
        if md is None:
            return orig(build_directory, verbose, error_prefix)
        op_dir = st.building[md]
        check_blob(st.spec, Path(op_dir) / "blob")
        if not st.cache:
            return orig(build_directory, verbose, error_prefix)
        from .objcache import run_build
        run_build(build_directory, op_dir=op_dir, roots=_roots(st.spec, cpp_ext), log=log.info)
    _run_ninja_build._jitkiln_original = orig
    return _run_ninja_build


def check_blob(spec: Spec, blob: Path) -> None:
    """Refuse, before any compile, a blob that jitkiln's command did not write completely for this spec."""
    err = blob / ERROR_FILE
    if err.is_file():
        raise AiterHookError(err.read_text().strip().removeprefix("jitkiln: "),
                             hint="see the blob command's output above")
    man = blob / "jitkiln_module.json"
    try:
        key = json.loads(man.read_text()).get("module_key")
    except (OSError, ValueError):
        raise AiterHookError(f"jitkiln's blob command wrote no module in {blob}",
                             hint="run it by hand: python " + blob_command("SPEC").replace("{}", str(blob))) from None
    if key != spec.module_key:
        raise AiterHookError(f"the blob in {blob} is module {str(key)[:12]}, not the planned {spec.module_key[:12]}")
    names = sorted(p.stem for p in (blob / "instances").glob("*.cu"))
    if names != sorted(spec.instances):
        raise AiterHookError(f"the blob in {blob} holds {len(names)} instances, not the {len(spec.instances)} planned")


# --- enable / disable -------------------------------------------------------------------------------------

def _patch(st: HookState, module, attr: str, new) -> None:
    st.originals.append((module, attr, getattr(module, attr)))
    setattr(module, attr, new)


def load_plan_file(path: str) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"{ENV_PLAN}={path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UsageError(f"{ENV_PLAN}={path} is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise UsageError(f"{ENV_PLAN}={path} must hold a JSON object (model, tp, ep, tokens, shapes, variant, arch, "
                         "policy)")
    return d


def enable(model: str | None = None, *, tp: int = 1, ep: int = 1, tokens=None, shapes=None,
           variant: str | None = None, arch: str | None = None, policy: str | None = None,
           plan: dict | str | None = None, cache: bool = True) -> HookState:
    """Make AITER use jitkiln's reduced ck2stages module for the planned shapes (see docs/aiter.md).

    With no plan arguments, the plan is read from ``$JITKILN_AITER_PLAN`` (a JSON file, as written by
    ``jitkiln aiter seed``/``prebuild``). Call it once, after ``import aiter`` and before the first fused_moe."""
    global _STATE
    if isinstance(plan, str):
        plan = load_plan_file(plan)
    if plan is None and model is None and shapes is None:
        path = os.environ.get(ENV_PLAN)
        if not path:
            raise UsageError("jitkiln.aiter.enable() got no plan and JITKILN_AITER_PLAN is not set",
                             hint="enable(model='kimi-k2', tp=4, tokens='1-8192', arch='gfx950'), or point "
                                  "JITKILN_AITER_PLAN at a plan JSON file")
        plan = load_plan_file(path)
    plan = dict(plan or {})
    if model is not None:
        plan.update(model=model, tp=tp, ep=ep, tokens=tokens)
    if shapes is not None:
        plan["shapes"] = list(shapes)
    variant = variant or plan.pop("variant", None) or "a4w4"
    arch = resolve_arch(arch or plan.pop("arch", None))
    policy = policy or plan.pop("policy", None) or os.environ.get(ENV_POLICY) or "full"
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r} for jitkiln.aiter; choose one of: {', '.join(POLICIES)}")
    if os.environ.get("GPU_ARCHS", "native").strip() in ("", "native"):
        os.environ["GPU_ARCHS"] = arch  # AITER then compiles for the arch jitkiln planned for
    with _LOCK:
        if _STATE is not None:
            disable()
        noise = io.StringIO()  # what importing AITER prints (torch's ROCm probe): after our reason, not before
        try:
            with contextlib.redirect_stderr(noise):
                from aiter.jit import (
                    core,  # the AITER that runs; its root is the generator root
                )
                from aiter.ops import moe_op
            sys.stderr.write(noise.getvalue())
        except Exception as e:
            raise AiterHookError(f"AITER does not import here: {type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0]}",
                                 hint="jitkiln.aiter hooks a working AITER; `jitkiln aiter plan` needs no ROCm") from e
        root = runtime_root(core)
        fam = check_tree(root, variant, arch)
        spec = make_spec(fam, variant, plan, policy)
        spec_path = save_spec(spec)
        st = HookState(spec, spec_path, fam, core, moe_op, cache=cache)
        if not spec.instances:
            log.warning("jitkiln.aiter: the plan needs no ck2stages instance (tuned rows route every shape "
                        "elsewhere); AITER is left unchanged")
            return st
        cpp_ext = sys.modules.get(getattr(core._jit_compile, "__module__", ""), None)
        _patch(st, moe_op, "get_moe_stage_module", _wrap_get_moe_stage_module(moe_op.get_moe_stage_module))
        for stage in (1, 2):
            orig = getattr(moe_op, f"ck_moe_stage{stage}")
            new = _wrap_stage(stage, orig)
            for mname, m in list(sys.modules.items()):
                if m is not None and (mname == "aiter" or mname.startswith("aiter.")) and \
                        getattr(m, f"ck_moe_stage{stage}", None) is orig:
                    _patch(st, m, f"ck_moe_stage{stage}", new)
        _patch(st, core, "build_module", _wrap_build_module(core.build_module, core))
        if cpp_ext is not None:
            _patch(st, cpp_ext, "_run_ninja_build", _wrap_run_ninja(cpp_ext._run_ninja_build, cpp_ext))
        _STATE = st
        log.info("jitkiln.aiter enabled: %s/%s, %d of %d instances, module suffix %s, policy %s, AITER %s",
                 spec.variant, spec.arch, len(spec.instances), len(spec.instances) + len(spec.unused),
                 spec.suffix, spec.policy, spec.aiter_root)
        return st


def disable() -> None:
    global _STATE
    with _LOCK:
        st = _STATE
        _STATE = None
        if st is None:
            return
        for module, attr, orig in reversed(st.originals):
            setattr(module, attr, orig)
        st.originals.clear()


def status() -> dict:
    st = _STATE
    if st is None:
        return {"enabled": False}
    return {"enabled": True, "variant": st.spec.variant, "arch": st.spec.arch, "policy": st.policy,
            "module_key": st.spec.module_key, "suffix": st.spec.suffix, "instances": list(st.spec.instances),
            "unused": list(st.spec.unused), "aiter_root": st.spec.aiter_root, "spec": str(st.spec_path),
            "md_names": dict(st.md_names), "recent": list(st.decisions)}


def current() -> HookState | None:
    return _STATE
