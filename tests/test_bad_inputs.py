"""Issue 16, classes 2, 3 and 6: every command over a table of bad inputs, driven through the command line only.

Each case runs ``python -m jitkiln.cli ARGV`` in a subprocess with a fresh ``JITKILN_CACHE_DIR`` and asserts:
a non-zero exit, the first line of stderr is the reason (``jitkiln: error: ...``; ``jitkiln: note:`` /
``jitkiln: warning:`` lines may come before it, nothing else), no ``Traceback`` anywhere, and no argparse
``usage:`` block before the reason. Cases that fail on today's code are marked ``xfail(strict=True)`` with the
class of the issue they belong to: once fixed they turn into errors and the marker goes.

These tests only use the command line (and, for ``runtime.load``, the public Python entry point), so they
survive the engine's restructuring. The module ends with a summary line ``bad-inputs: N cases tried, M held``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from case_counter import case_summary

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
HAVE_NVCC = shutil.which("nvcc") is not None
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="needs nvcc on PATH")
XF = lambda n, why="": pytest.mark.xfail(strict=True, reason=f"issue 16 class {n}" + (f": {why}" if why else ""))  # noqa: E731

ERR_LINE = re.compile(r"^jitkiln(?: [\w-]+)*: error: \S")
PREAMBLE = re.compile(r"^jitkiln: (note|warning): ")


# --- helpers -------------------------------------------------------------------------------------------------
def base_env(cache: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITKILN_", "RAY_ADDRESS"))}
    if cache is not None:
        env["JITKILN_CACHE_DIR"] = str(cache)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def jk(argv, env, timeout=120, cwd=None):
    return subprocess.run([PY, "-m", "jitkiln.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, errors="replace")


def one_line_failure(r: subprocess.CompletedProcess) -> None:
    """The bad-input contract: non-zero exit, the reason first, one line, no traceback, no usage block first."""
    out = f"--- rc {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stdout + r.stderr, "a traceback:\n" + out
    assert r.returncode != 0, "succeeded on a bad input:\n" + out
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not PREAMBLE.match(ln)] if lines else lines
    assert lines, "no reason on stderr:\n" + out
    assert ERR_LINE.match(lines[0]), "the first line of stderr is not the one-line reason:\n" + out


def _build_demo_cache(dest: Path) -> Path:
    r = jk(["build", "demo", "--json", "--no-progress"], base_env(dest), timeout=300)
    assert r.returncode == 0, r.stderr
    return dest


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A cache holding the demo f32 plan (3 instances), built once per session and copied by tests."""
    if not HAVE_NVCC:
        pytest.skip("needs nvcc on PATH")
    root = tmp_path_factory.getbasetemp() / "shared-demo-f32-cache"
    done = root.with_suffix(".done")
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        _build_demo_cache(root)
        done.write_text("ok")
    return root


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    r = jk(["keygen", "-o", str(d / "builder.key")], base_env(d / "c"))
    assert r.returncode == 0, r.stderr
    return d / "builder.key", d / "builder.key.pub"


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory, demo_cache, keypair) -> Path:
    d = tmp_path_factory.mktemp("bundle")
    c = copy_cache(demo_cache, d / "cache")
    r = jk(["prebuild", "demo", "--key", str(keypair[0]), "-o", str(d / "demo.bundle"), "--arch", "sm_90a"],
           base_env(c), timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "demo.bundle"


# summary: count this module's cases and how many held
_summary = case_summary("bad-inputs", __file__)


# --- the table -------------------------------------------------------------------------------------------------
# Setups get (tmp: Path, ctx: dict) and return a dict of names to substitute into argv/env as {name}.
def s_files(tmp: Path, ctx) -> dict:
    f = tmp / "a-file"
    f.write_text("not a directory\n")
    (tmp / "a-dir").mkdir()
    (tmp / "nonutf8.json").write_bytes(b"\xff\xfe{\"x\": \x80}")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "null.json").write_text("null")
    (tmp / "str.json").write_text('"hello"')
    (tmp / "empty.json").write_text("")
    (tmp / "garbage").write_bytes(os.urandom(512))
    (tmp / "norec.json").write_text(json.dumps({"units": []}))
    (tmp / "units-null.json").write_text(json.dumps({"units": None}))
    (tmp / "units-junk.json").write_text(json.dumps({"units": [1, "x", None]}))
    (tmp / "model-nofields.json").write_text(json.dumps({"architectures": ["X"]}))
    (tmp / "model-strs.json").write_text(json.dumps({"hidden_size": "big", "moe_intermediate_size": -1,
                                                     "n_routed_experts": 0, "num_experts_per_tok": "x"}))
    return {"file": str(f), "dir": str(tmp / "a-dir"), "tmp": str(tmp), "missing": str(tmp / "no" / "such")}


def s_wrong_type_meta(tmp: Path, ctx) -> dict:
    """A cache whose one entry has a meta.json that is valid JSON of the wrong type (a list)."""
    d = tmp / "cache" / "v1" / "objects" / "ab" / ("ab" + "0" * 62)
    d.mkdir(parents=True)
    (d / "artifact").write_bytes(b"\x7fELF junk")
    (d / "meta.json").write_text("[1, 2, 3]")
    return s_files(tmp, ctx)


def s_meta_null(tmp: Path, ctx) -> dict:
    d = tmp / "cache" / "v1" / "objects" / "cd" / ("cd" + "1" * 62)
    d.mkdir(parents=True)
    (d / "artifact").write_bytes(b"x")
    (d / "meta.json").write_text("null")
    return s_files(tmp, ctx)


def s_meta_badfields(tmp: Path, ctx) -> dict:
    d = tmp / "cache" / "v1" / "objects" / "ef" / ("ef" + "2" * 62)
    d.mkdir(parents=True)
    (d / "artifact").write_bytes(b"x")
    (d / "meta.json").write_text(json.dumps({"name": 5, "size": "huge", "compile_s": "slow", "arch": ["x"]}))
    return s_files(tmp, ctx)


def s_demo(tmp: Path, ctx) -> dict:
    """A populated demo cache (hits only: no compile)."""
    copy_cache(ctx["demo_cache"], tmp / "cache")
    return s_files(tmp, ctx)


def s_demo_last(tmp: Path, ctx) -> dict:
    v = s_demo(tmp, ctx)
    last = (tmp / "cache" / "v1" / "builds" / "last").read_text().strip()
    v["record"] = last
    return v


def s_keys(tmp: Path, ctx) -> dict:
    v = s_demo(tmp, ctx)
    v["key"], v["pub"] = str(ctx["keypair"][0]), str(ctx["keypair"][1])
    return v


def s_bundle(tmp: Path, ctx) -> dict:
    v = s_files(tmp, ctx)
    v["key"], v["pub"] = str(ctx["keypair"][0]), str(ctx["keypair"][1])
    v["bundle"] = str(ctx["demo_bundle"])
    return v


DEFAULT_SETUP = s_files

# (id, argv, env tweaks, setup, xfail marker or None)
#   argv/env values are str.format()ed with the setup's dict; env value None removes the variable
CASES = [
    # plan ------------------------------------------------------------------------------------------------
    ("plan-tp-abc", ["plan", "demo", "--tp", "abc"], {}, None, None),
    ("plan-tp-zero", ["plan", "demo", "--tp", "0"], {}, None, None),
    ("plan-ep-negative", ["plan", "demo", "--ep", "-2"], {}, None, None),
    ("plan-unknown-family", ["plan", "nosuchfamily"], {}, None, None),
    ("plan-unknown-variant", ["plan", "demo", "--variant", "f17"], {}, None, None),
    ("plan-no-family", ["plan"], {}, None, None),
    ("plan-unknown-flag", ["plan", "demo", "--bogus"], {}, None, None),
    ("plan-shape-negative", ["plan", "demo", "--shape", "m=-5,n=0,k=16"], {}, None, None),
    ("plan-shape-zero", ["plan", "demo", "--shape", "m=0,n=0,k=0"], {}, None, None),
    ("plan-shape-m-negative-only", ["plan", "demo", "--shape", "m=-5,n=512,k=256"], {}, None, None),
    ("plan-shape-nonint", ["plan", "demo", "--shape", "m=abc,n=512,k=256"], {}, None, None),
    ("plan-shape-float", ["plan", "demo", "--shape", "m=1.5,n=512,k=256"], {}, None, None),
    ("plan-shape-empty", ["plan", "demo", "--shape", ""], {}, None, None),
    ("plan-shape-no-eq", ["plan", "demo", "--shape", "m8"], {}, None, None),
    ("plan-shape-missing-key", ["plan", "demo", "--shape", "m=8,n=512"], {}, None, None),
    ("plan-shape-unknown-key", ["plan", "demo", "--shape", "m=8,n=512,k=256,q=1"], {}, None, None),
    ("plan-shape-huge", ["plan", "demo", "--shape", "m=99999999999999999999999,n=512,k=256"], {}, None,
     None),
    ("plan-model-for-demo", ["plan", "demo", "--model", "kimi-k2"], {}, None, None),
    ("plan-model-nonutf8", ["plan", "moe2stage", "--model", "{tmp}/nonutf8.json", "--tokens", "1-8"], {}, None,
     None),
    ("plan-model-list", ["plan", "moe2stage", "--model", "{tmp}/list.json", "--tokens", "1-8"], {}, None,
     None),
    ("plan-model-null", ["plan", "moe2stage", "--model", "{tmp}/null.json", "--tokens", "1-8"], {}, None,
     None),
    ("plan-model-string", ["plan", "moe2stage", "--model", "{tmp}/str.json", "--tokens", "1-8"], {}, None, None),
    ("plan-model-empty", ["plan", "moe2stage", "--model", "{tmp}/empty.json", "--tokens", "1-8"], {}, None, None),
    ("plan-model-garbage", ["plan", "moe2stage", "--model", "{tmp}/garbage", "--tokens", "1-8"], {}, None, None),
    ("plan-model-no-fields", ["plan", "moe2stage", "--model", "{tmp}/model-nofields.json", "--tokens", "1-8"], {},
     None, None),
    ("plan-model-wrong-field-types", ["plan", "moe2stage", "--model", "{tmp}/model-strs.json", "--tokens", "1-8"],
     {}, None, None),
    ("plan-model-dir", ["plan", "moe2stage", "--model", "{dir}", "--tokens", "1-8"], {}, None, None),
    ("plan-model-missing", ["plan", "moe2stage", "--model", "{missing}", "--tokens", "1-8"], {}, None, None),
    ("plan-model-empty-string", ["plan", "moe2stage", "--model", "", "--tokens", "1-8"], {}, None, None),
    ("plan-tokens-abc", ["plan", "moe2stage", "--model", "kimi-k2", "--tokens", "abc"], {}, None, None),
    ("plan-tokens-zero", ["plan", "moe2stage", "--model", "kimi-k2", "--tokens", "0"], {}, None, None),
    ("plan-tokens-negative", ["plan", "moe2stage", "--model", "kimi-k2", "--tokens", "-5"], {}, None, None),
    ("plan-tokens-reversed", ["plan", "moe2stage", "--model", "kimi-k2", "--tokens", "64-1"], {}, None, None),
    ("plan-tokens-empty", ["plan", "moe2stage", "--model", "kimi-k2", "--tokens", ""], {}, None, None),
    ("plan-tp-not-dividing", ["plan", "moe2stage", "--model", "kimi-k2", "--tp", "7", "--tokens", "1-8"], {}, None,
     None),
    # build -----------------------------------------------------------------------------------------------
    ("build-jobs-zero", ["build", "demo", "--json", "--no-progress", "--jobs", "0"], {}, s_demo,
     None),
    ("build-jobs-negative", ["build", "demo", "--json", "--no-progress", "--jobs", "-3"], {}, s_demo,
     None),
    ("build-jobs-abc", ["build", "demo", "--json", "--jobs", "abc"], {}, None, None),
    ("build-shape-negative", ["build", "demo", "--json", "--no-progress", "--shape", "m=-5,n=0,k=16"], {}, s_demo,
     None),
    ("build-out-under-file", ["build", "demo", "--json", "--no-progress", "--out", "{file}/out"], {}, s_demo,
     None),
    ("build-out-is-file", ["build", "demo", "--json", "--no-progress", "--out", "{file}"], {}, s_demo,
     None),
    ("build-cache-dir-file", ["build", "demo", "--json", "--no-progress", "--cache-dir", "{file}"], {}, None, None),
    ("build-cache-env-file", ["build", "demo", "--json", "--no-progress"], {"JITKILN_CACHE_DIR": "{file}"}, None,
     None),
    ("build-cache-under-file", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_CACHE_DIR": "{file}/cache"}, None, None),
    ("build-nvcc-missing", ["build", "demo", "--json", "--no-progress"], {"JITKILN_NVCC": "{missing}"}, None,
     None),
    ("build-nvcc-is-dir", ["build", "demo", "--json", "--no-progress"], {"JITKILN_NVCC": "{dir}"}, None, None),
    ("build-nvcc-not-exec", ["build", "demo", "--json", "--no-progress"], {"JITKILN_NVCC": "{file}"}, None, None),
    ("build-redis-ttl-zero", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_REDIS_URL": "redis://127.0.0.1:9/0", "JITKILN_REDIS_TTL": "0"}, s_demo,
     None),
    ("build-redis-ttl-negative", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_REDIS_URL": "redis://127.0.0.1:9/0", "JITKILN_REDIS_TTL": "-5"}, s_demo,
     None),
    ("build-redis-ttl-abc", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_REDIS_URL": "redis://127.0.0.1:9/0", "JITKILN_REDIS_TTL": "abc"}, None, None),
    ("build-redis-url-bad", ["build", "demo", "--json", "--no-progress"], {"JITKILN_REDIS_URL": "nota://url"}, None,
     None),
    ("build-redis-max-entry-bad", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_REDIS_URL": "redis://127.0.0.1:9/0", "JITKILN_REDIS_MAX_ENTRY": "lots"}, None, None),
    ("build-shared-max-size-bad", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_SHARED_DIR": "{dir}", "JITKILN_SHARED_MAX_SIZE": "-1G"}, None, None),
    ("build-shared-dir-is-file", ["build", "demo", "--json", "--no-progress"], {"JITKILN_SHARED_DIR": "{file}"},
     s_demo, None),
    ("build-signing-key-missing", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_SHARED_DIR": "{dir}", "JITKILN_SIGNING_KEY": "{missing}"}, None, None),
    ("build-signing-key-garbage", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_SHARED_DIR": "{dir}", "JITKILN_SIGNING_KEY": "{tmp}/garbage"}, None, None),
    ("build-signing-key-nonutf8", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_SHARED_DIR": "{dir}", "JITKILN_SIGNING_KEY": "{tmp}/nonutf8.json"}, None, None),
    ("build-signing-key-dir", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_SHARED_DIR": "{dir}", "JITKILN_SIGNING_KEY": "{dir}"}, None, None),
    ("build-trust-keys-garbage", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_SHARED_DIR": "{dir}", "JITKILN_TRUST_KEYS": "{tmp}/garbage"}, None, None),
    ("build-trust-keys-missing", ["build", "demo", "--json", "--no-progress"],
     {"JITKILN_SHARED_DIR": "{dir}", "JITKILN_TRUST_KEYS": "{missing}"}, None, None),
    ("build-executor-bad", ["build", "demo", "--executor", "spark"], {}, None, None),
    # report ----------------------------------------------------------------------------------------------
    ("report-dir", ["report", "{dir}"], {}, None, None),
    ("report-missing", ["report", "{missing}"], {}, None, None),
    ("report-no-record", ["report"], {}, None, None),
    ("report-no-units", ["report", "{tmp}/norec.json"], {}, None, None),
    ("report-units-null", ["report", "{tmp}/units-null.json"], {}, None, None),
    ("report-units-junk", ["report", "{tmp}/units-junk.json"], {}, None, None),
    ("report-list", ["report", "{tmp}/list.json"], {}, None, None),
    ("report-nonutf8", ["report", "{tmp}/nonutf8.json"], {}, None, None),
    ("report-garbage", ["report", "{tmp}/garbage"], {}, None, None),
    ("report-empty", ["report", "{tmp}/empty.json"], {}, None, None),
    ("report-timeline-missing-dir", ["report", "--timeline", "{missing}/t.html"], {}, s_demo,
     None),
    ("report-timeline-under-file", ["report", "--timeline", "{file}/t.png"], {}, s_demo, None),
    ("report-timeline-bad-ext", ["report", "--timeline", "{tmp}/t.txt"], {}, s_demo, None),
    ("report-top-abc", ["report", "--top", "abc"], {}, None, None),
    ("report-top-negative", ["report", "--top", "-1"], {}, s_demo, None),
    ("report-last-points-nowhere", ["report"], {}, "last-garbage", None),
    # cache -----------------------------------------------------------------------------------------------
    ("cache-bad-action", ["cache", "list"], {}, None, None),
    ("cache-ls-meta-list", ["cache", "ls"], {"JITKILN_CACHE_DIR": "{tmp}/cache"}, s_wrong_type_meta,
     None),
    ("cache-ls-meta-null", ["cache", "ls", "--json"], {"JITKILN_CACHE_DIR": "{tmp}/cache"}, s_meta_null, None),
    ("cache-ls-meta-bad-fields", ["cache", "ls"], {"JITKILN_CACHE_DIR": "{tmp}/cache"}, s_meta_badfields, None),
    ("cache-ls-env-file", ["cache", "ls"], {"JITKILN_CACHE_DIR": "{file}"}, None,
     None),
    ("cache-verify-env-file", ["cache", "verify"], {"JITKILN_CACHE_DIR": "{file}"}, None,
     None),
    ("cache-gc-env-file", ["cache", "gc", "--max-age", "1d"], {"JITKILN_CACHE_DIR": "{file}"}, None, None),
    ("cache-path-env-file", ["cache", "path"], {"JITKILN_CACHE_DIR": "{file}"}, None,
     None),
    ("cache-ls-cache-dir-file", ["cache", "ls", "--cache-dir", "{file}"], {}, None, None),
    ("cache-verify-objects-is-file", ["cache", "verify"], {"JITKILN_CACHE_DIR": "{tmp}/cache"}, "objects-file",
     None),
    ("cache-gc-no-limits", ["cache", "gc"], {}, None, None),
    ("cache-gc-size-abc", ["cache", "gc", "--max-size", "abc"], {}, None, None),
    ("cache-gc-size-negative", ["cache", "gc", "--max-size", "-5G"], {}, None, None),
    ("cache-gc-size-empty", ["cache", "gc", "--max-size", ""], {}, None, None),
    ("cache-gc-age-abc", ["cache", "gc", "--max-age", "soon"], {}, None, None),
    ("cache-gc-age-negative", ["cache", "gc", "--max-age", "-1d"], {}, None, None),
    ("cache-gc-age-empty", ["cache", "gc", "--max-age", ""], {}, None, None),
    # doctor ----------------------------------------------------------------------------------------------
    ("doctor-unknown-flag", ["doctor", "--bogus"], {}, None, None),
    ("doctor-extra-arg", ["doctor", "extra"], {}, None, None),
    # prebuild --------------------------------------------------------------------------------------------
    ("prebuild-no-output", ["prebuild", "demo"], {}, None, None),
    ("prebuild-no-key", ["prebuild", "demo", "-o", "{tmp}/b.bundle"], {}, s_demo, None),
    ("prebuild-key-missing", ["prebuild", "demo", "-o", "{tmp}/b.bundle", "--key", "{missing}"], {}, s_demo, None),
    ("prebuild-key-garbage", ["prebuild", "demo", "-o", "{tmp}/b.bundle", "--key", "{tmp}/garbage"], {}, s_demo,
     None),
    ("prebuild-key-is-pub", ["prebuild", "demo", "-o", "{tmp}/b.bundle", "--key", "{pub}"], {}, s_keys, None),
    ("prebuild-out-under-file", ["prebuild", "demo", "-o", "{file}/b.bundle", "--key", "{key}", "--arch",
                                 "sm_90a"], {}, s_keys, None),
    ("prebuild-out-missing-dir", ["prebuild", "demo", "-o", "{missing}/b.bundle", "--key", "{key}", "--arch",
                                  "sm_90a"], {}, s_keys, None),
    ("prebuild-out-is-dir", ["prebuild", "demo", "-o", "{dir}", "--key", "{key}", "--arch", "sm_90a"], {}, s_keys,
     None),
    ("prebuild-jobs-zero", ["prebuild", "demo", "-o", "{tmp}/b.bundle", "--key", "{key}", "--jobs", "0", "--arch",
                            "sm_90a"], {}, s_keys, None),
    ("prebuild-shape-negative", ["prebuild", "demo", "-o", "{tmp}/b.bundle", "--key", "{key}", "--shape",
                                 "m=-5,n=0,k=16"], {}, s_keys, None),
    # seed ------------------------------------------------------------------------------------------------
    ("seed-missing", ["seed", "{missing}", "--trust", "{pub}"], {}, s_bundle, None),
    ("seed-dir", ["seed", "{dir}", "--trust", "{pub}"], {}, s_bundle, None),
    ("seed-garbage", ["seed", "{tmp}/garbage", "--trust", "{pub}"], {}, s_bundle, None),
    ("seed-empty", ["seed", "{tmp}/empty.json", "--trust", "{pub}"], {}, s_bundle, None),
    ("seed-no-trust", ["seed", "{bundle}", "--arch", "sm_90a"], {}, s_bundle, None),
    ("seed-trust-missing", ["seed", "{bundle}", "--trust", "{missing}", "--arch", "sm_90a"], {}, s_bundle, None),
    ("seed-trust-garbage", ["seed", "{bundle}", "--trust", "{tmp}/garbage", "--arch", "sm_90a"], {}, s_bundle,
     None),
    ("seed-trust-nonutf8", ["seed", "{bundle}", "--trust", "{tmp}/nonutf8.json", "--arch", "sm_90a"], {}, s_bundle,
     None),
    ("seed-trust-private-key", ["seed", "{bundle}", "--trust", "{key}", "--arch", "sm_90a"], {}, s_bundle, None),
    ("seed-cache-env-file", ["seed", "{bundle}", "--trust", "{pub}", "--arch", "sm_90a"],
     {"JITKILN_CACHE_DIR": "{file}"}, s_bundle, None),
    ("seed-cache-under-file", ["seed", "{bundle}", "--trust", "{pub}", "--arch", "sm_90a"],
     {"JITKILN_CACHE_DIR": "{file}/c"}, s_bundle, None),
    ("seed-wrong-arch", ["seed", "{bundle}", "--trust", "{pub}", "--arch", "sm_80"], {}, s_bundle, None),
    ("seed-truncated", ["seed", "{tmp}/trunc.bundle", "--trust", "{pub}", "--arch", "sm_90a"], {}, "truncated",
     None),
    ("seed-manifest-list", ["seed", "{tmp}/mlist.bundle", "--trust", "{pub}", "--arch", "sm_90a"], {},
     "manifest-list", None),
    ("seed-no-bundle-arg", ["seed"], {}, None, None),
    # keygen ----------------------------------------------------------------------------------------------
    ("keygen-under-file", ["keygen", "-o", "{file}/k.key"], {}, None, None),
    ("keygen-is-dir", ["keygen", "-o", "{dir}"], {}, None, None),
    ("keygen-exists", ["keygen", "-o", "{file}"], {}, None, None),
    ("keygen-empty", ["keygen", "-o", ""], {}, None, None),
    ("keygen-no-output", ["keygen"], {}, None, None),
    # aiter-blob ------------------------------------------------------------------------------------------
    ("aiter-blob-no-out", ["aiter-blob"], {}, None, None),
    ("aiter-blob-root-missing", ["aiter-blob", "--aiter-root", "{missing}", "-w", "{tmp}/blob"], {}, None, None),
    ("aiter-blob-root-file", ["aiter-blob", "--aiter-root", "{file}", "-w", "{tmp}/blob"], {}, None, None),
    ("aiter-blob-tp-abc", ["aiter-blob", "--tp", "abc", "-w", "{tmp}/blob"], {}, None, None),
    ("aiter-blob-model-nonutf8", ["aiter-blob", "--model", "{tmp}/nonutf8.json", "-w", "{tmp}/blob"], {}, None,
     None),
    ("aiter-blob-out-under-file", ["aiter-blob", "-w", "{file}/blob"], {}, None, None),
    # top level -------------------------------------------------------------------------------------------
    ("unknown-command", ["frobnicate"], {}, None, None),
]


def _named_setup(name: str, tmp: Path, ctx) -> dict:
    v = s_files(tmp, ctx)
    if name == "last-garbage":
        b = tmp / "cache" / "v1" / "builds"
        b.mkdir(parents=True)
        (b / "last").write_bytes(b"\xff\xfe not a path \x00")
    elif name == "objects-file":
        (tmp / "cache" / "v1").mkdir(parents=True)
        (tmp / "cache" / "v1" / "objects").write_text("not a dir")
    elif name == "truncated":
        data = Path(ctx["demo_bundle"]).read_bytes()
        (tmp / "trunc.bundle").write_bytes(data[: len(data) // 2])
    elif name == "manifest-list":
        with tarfile.open(tmp / "mlist.bundle", "w") as tf:
            for n, payload in (("manifest.json", b"[1, 2]"), ("manifest.sig", b"[]")):
                ti = tarfile.TarInfo(n)
                ti.size = len(payload)
                import io
                tf.addfile(ti, io.BytesIO(payload))
    v["key"], v["pub"] = str(ctx["keypair"][0]), str(ctx["keypair"][1])
    return v


def _params():
    out = []
    for cid, argv, env, setup, mark in CASES:
        needs = needs_nvcc if (argv[0] in ("build", "prebuild", "seed") or setup in (s_demo, s_keys, s_demo_last)
                               or argv[:2] == ["report", "--timeline"]) else None
        marks = [m for m in (mark, needs) if m is not None]
        out.append(pytest.param(argv, env, setup, id=cid, marks=marks))
    return out


@pytest.mark.parametrize("argv,env_tweaks,setup", _params())
def test_bad_input(argv, env_tweaks, setup, tmp_path, request):
    ctx = {}
    uses_nvcc_fixtures = isinstance(setup, str) or setup in (s_demo, s_keys, s_bundle, s_demo_last)
    if uses_nvcc_fixtures:
        ctx["demo_cache"] = request.getfixturevalue("demo_cache")
        ctx["keypair"] = request.getfixturevalue("keypair")
        if setup in (s_bundle,) or setup in ("truncated", "manifest-list"):
            ctx["demo_bundle"] = request.getfixturevalue("demo_bundle")
    if isinstance(setup, str):
        v = _named_setup(setup, tmp_path, ctx)
    else:
        v = (setup or DEFAULT_SETUP)(tmp_path, ctx)
    env = base_env(tmp_path / "cache")
    env["TMPDIR"] = str(tmp_path)
    for k, val in env_tweaks.items():
        if val is None:
            env.pop(k, None)
        else:
            env[k] = val.format(**v)
    args = [a.format(**v) for a in argv]
    r = jk(args, env, timeout=60, cwd=tmp_path)
    one_line_failure(r)


# --- class 3: the Python entry point checks its inputs too ----------------------------------------------------
LOAD_SNIPPET = """
import sys
from jitkiln.errors import JitkilnError
from jitkiln.runtime import load
try:
    load("demo", "f32", [%s], policy="error")
except JitkilnError as e:
    print("JITKILN_ERROR", type(e).__name__, e); sys.exit(3)
except Exception as e:
    print("OTHER_ERROR", type(e).__name__, e); sys.exit(4)
print("LOADED"); sys.exit(0)
"""


@needs_nvcc
@pytest.mark.parametrize("shape", [
    pytest.param('{"m": 8, "n": 512}', id="missing-k"),
    pytest.param('{"m": "eight", "n": 512, "k": 256}', id="non-integer-m"),
    pytest.param('{"m": -8, "n": 512, "k": 256}', id="negative-m"),
    pytest.param('{"m": 8.5, "n": 512, "k": 256}', id="float-m"),
])
def test_runtime_load_checks_shapes(shape, tmp_path, demo_cache):
    copy_cache(demo_cache, tmp_path / "cache")
    env = base_env(tmp_path / "cache")
    r = subprocess.run([PY, "-c", LOAD_SNIPPET % shape], env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.returncode == 3 and "JITKILN_ERROR" in r.stdout, (r.returncode, r.stdout, r.stderr)


# --- class 3: gc and entries whose time lies in the future ------------------------------------------------------
@needs_nvcc
def test_gc_future_dated_entry_is_not_immortal(tmp_path, demo_cache):
    cache = copy_cache(demo_cache, tmp_path / "cache")
    env = base_env(cache)
    entries = sorted((cache / "v1" / "objects").glob("??/*"))
    future = time.time() + 10 * 365 * 86400
    os.utime(entries[0], (future, future))
    r = jk(["cache", "gc", "--max-age", "1d"], env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    # either it was treated as suspicious and collected, or its time was pulled back to now (so it ages)
    if entries[0].exists():
        assert entries[0].stat().st_mtime <= time.time() + 60, "future-dated entry kept its future time"


# --- class 6: a read-only cache still serves hits --------------------------------------------------------------
def _can_bind_ro() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a read-only bind mount in a mount namespace"
    if not shutil.which("unshare"):
        return "needs unshare(1)"
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs tmpfs /mnt"],
                       capture_output=True)
    return None if r.returncode == 0 else f"cannot make a mount namespace here: {r.stderr.decode()[:100]}"


def _ro_run(cache: Path, jargs: list[str], tmp: Path) -> subprocess.CompletedProcess:
    script = tmp / "ro.sh"
    script.write_text(
        "set -e\nmount --make-rprivate /\n"
        f"mount --bind {cache} {cache}\nmount -o remount,bind,ro {cache}\n"
        f"touch {cache}/probe 2>/dev/null && {{ echo 'cache is still writable' >&2; exit 99; }}\n"
        f"exec {PY} -m jitkiln.cli {' '.join(jargs)}\n")
    env = base_env(cache)
    env["TMPDIR"] = str(tmp)
    return subprocess.run(["unshare", "-m", "bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=120)


@needs_nvcc
def test_read_only_cache_serves_hits(tmp_path, demo_cache):
    why = _can_bind_ro()
    if why:
        pytest.skip(why)
    cache = copy_cache(demo_cache, tmp_path / "cache")
    r = _ro_run(cache, ["build", "demo", "--json", "--no-progress"], tmp_path)
    assert r.returncode != 99, r.stderr
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["compiled"] == [] and len(summary["cache_hits"]) == 3, summary


@needs_nvcc
def test_read_only_cache_miss_is_one_line(tmp_path, demo_cache):
    why = _can_bind_ro()
    if why:
        pytest.skip(why)
    cache = copy_cache(demo_cache, tmp_path / "cache")
    r = _ro_run(cache, ["build", "demo", "--variant", "f64", "--json", "--no-progress"], tmp_path)
    assert r.returncode != 99, r.stderr
    one_line_failure(r)
