"""Issue 16, classes 1, 4 and 5 (and 2 under faults): fault injection, driven through the command line only.

(a) SIGKILL of a build / a seed at random moments (fixed seeds, bounded count): the cache verifies clean and a
    rebuild succeeds; (b) each kind of bad entry in the shared-directory tier and in Redis costs one rebuild, the
    tier keeps serving the other keys, and a writer repairs the entry; (c) a full disk at each write; (d) re-seeding
    repairs a damaged local entry; (e) SIGTERM during a compile ends the compiler; (f) a compiler rewritten with the
    same size and mtime is not the old compiler; (g) stale temporaries are swept at start; (h) a bundle with a huge
    member is refused within bounded memory; (i) an unreachable Ray address is reported in bounded time.

Cases failing on today's code are ``xfail(strict=True)`` with their class. The module ends with the line
``faults: N cases tried, M held``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from case_counter import case_summary

PY = sys.executable
HAVE_NVCC = shutil.which("nvcc") is not None
REAL_NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
pytestmark = pytest.mark.skipif(not HAVE_NVCC, reason="needs nvcc on PATH (the demo family compiles with it)")
XF = lambda n, why="": pytest.mark.xfail(strict=True, reason=f"issue 16 class {n}" + (f": {why}" if why else ""))  # noqa: E731


# --- helpers -------------------------------------------------------------------------------------------------
def base_env(cache: Path | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITKILN_", "RAY_ADDRESS"))}
    if cache is not None:
        env["JITKILN_CACHE_DIR"] = str(cache)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def jk(argv, env, timeout=180):
    return subprocess.run([PY, "-m", "jitkiln.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, errors="replace")


def build_json(env, *extra) -> dict:
    r = jk(["build", "demo", "--json", "--no-progress", *extra], env)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_verify_clean(cache: Path, n: int | None = None) -> None:
    r = jk(["cache", "verify"], base_env(cache))
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode == 0 and ", 0 bad" in r.stdout, r.stdout + r.stderr
    if n is not None:
        assert r.stdout.strip().splitlines()[-1].startswith(f"{n} entries verified"), r.stdout


def assert_one_line_error(r) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("jitkiln: note:",
                                                                                      "jitkiln: warning:"))]
    assert lines and lines[0].startswith("jitkiln: error: "), r.stderr


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def entry_dirs(root: Path) -> dict[str, Path]:
    """name -> entry directory, for a local cache (v1/objects) or a shared dir (v1/ns/*/obj)."""
    out = {}
    for meta in list(root.glob("v1/objects/??/*/meta.json")) + list(root.glob("v1/ns/*/obj/??/*/meta.json")):
        with_name = json.loads(meta.read_text())
        out[with_name["name"]] = meta.parent
    return out


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "shared-demo-f32-cache"  # shared with test_bad_inputs.py
    done = root.with_suffix(".done")
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        build_json(base_env(root))
        done.write_text("ok")
    return root


@pytest.fixture(scope="session")
def plan_units(demo_cache) -> list[tuple[str, str]]:
    """(name, unit key) of the demo plan, in plan order (the first is looked up first)."""
    r = jk(["plan", "demo", "--json"], base_env(demo_cache))
    assert r.returncode == 0, r.stderr
    return [(i["name"], i["key"]) for i in json.loads(r.stdout)["instances"]]


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fault-keys")
    for n in ("a", "b"):
        r = jk(["keygen", "-o", str(d / f"{n}.key")], base_env(d / "c"))
        assert r.returncode == 0, r.stderr
    return {"a": d / "a.key", "a_pub": d / "a.key.pub", "b": d / "b.key", "b_pub": d / "b.key.pub"}


def prebuild(cache_src: Path, key: Path, out: Path, tmp: Path) -> Path:
    c = copy_cache(cache_src, tmp / f"pb-{out.stem}")
    r = jk(["prebuild", "demo", "--key", str(key), "-o", str(out), "--arch", "sm_90a"], base_env(c))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def bundle_a(tmp_path_factory, demo_cache, keys) -> Path:
    d = tmp_path_factory.mktemp("bundle-a")
    return prebuild(demo_cache, keys["a"], d / "a.bundle", d)


# summary ---------------------------------------------------------------------------------------------------------
_summary = case_summary("faults", __file__)


def _root_ns() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare(1) for a private tmpfs"
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs -o size=1m tmpfs /mnt"],
                       capture_output=True)
    return None if r.returncode == 0 else "cannot mount a tmpfs in a mount namespace here"


# (a) SIGKILL at random moments --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2])
def test_sigkill_during_build(seed, tmp_path):
    cache = tmp_path / "cache"
    env = base_env(cache, TMPDIR=tmp_path)
    delay = random.Random(seed).uniform(0.3, 5.0)
    p = subprocess.Popen([PY, "-m", "jitkiln.cli", "build", "demo", "--json", "--no-progress"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    with _suppress():
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    assert_verify_clean(cache)
    s = build_json(env)
    assert len(s["compiled"]) + len(s["cache_hits"]) == 3 and not s["failed"], s
    assert_verify_clean(cache, 3)


@pytest.mark.parametrize("seed", [1, 3])
def test_sigkill_during_seed(seed, tmp_path, bundle_a, keys):
    cache = tmp_path / "cache"
    env = base_env(cache)
    argv = [PY, "-m", "jitkiln.cli", "seed", str(bundle_a), "--trust", str(keys["a_pub"]), "--arch", "sm_90a"]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(random.Random(seed).uniform(0.05, 0.6))
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(30)
    assert_verify_clean(cache)
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert_verify_clean(cache, 3)


# (b) bad entries in the shared tiers -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if not exe:
        yield None
        return
    port = _free_port()
    d = tmp_path_factory.mktemp("redis")
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    cl = redis.Redis(port=port)
    for _ in range(100):
        try:
            cl.ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    p.terminate()
    p.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, keys, redis_url, demo_cache):
    """A shared directory (and Redis, when there is a server) populated by a builder with key a; a bundle by key b."""
    d = tmp_path_factory.mktemp("fleet")
    shared = d / "shared"
    extra = {"JITKILN_SHARED_DIR": shared, "JITKILN_SIGNING_KEY": keys["a"]}
    if redis_url:
        extra["JITKILN_REDIS_URL"] = redis_url
    s = build_json(base_env(d / "builder-cache", TMPDIR=d, **extra))
    assert len(s["compiled"]) == 3, s
    snapshot = None
    if redis_url:
        import redis
        cl = redis.Redis.from_url(redis_url)
        snapshot = {k: cl.dump(k) for k in cl.scan_iter("jitkiln:*")}
    bundle_b = prebuild(d / "builder-cache", keys["b"], d / "b.bundle", d)
    return {"shared": shared, "snapshot": snapshot, "bundle_b": bundle_b, "dir": d}


def _meta_from_bundle(bundle: Path, key: str) -> bytes:
    with tarfile.open(bundle) as tf:
        return tf.extractfile(f"objects/{key}/meta.json").read()


def _damage_shared(kind: str, entry: Path, fleet) -> None:
    meta, art = entry / "meta.json", entry / "artifact"
    if kind == "garbage-meta":
        meta.write_bytes(b"{this is not json\xff")
    elif kind == "meta-json-list":
        meta.write_text("[1, 2, 3]")
    elif kind == "meta-is-dir":
        meta.unlink()
        meta.mkdir()
        (meta / "x").write_text("x")
    elif kind == "only-artifact":
        meta.unlink()
    elif kind == "only-meta":
        art.unlink()
    elif kind == "untrusted-signer":
        meta.write_bytes(_meta_from_bundle(fleet["bundle_b"], entry.name))
    elif kind == "tampered-artifact":
        b = bytearray(art.read_bytes())
        b[len(b) // 2] ^= 0xFF
        art.write_bytes(bytes(b))
    elif kind == "other-entrys-meta":
        other = next(p for p in entry.parent.parent.glob("??/*") if p.name != entry.name)
        meta.write_bytes((other / "meta.json").read_bytes())
    else:  # pragma: no cover
        raise AssertionError(kind)


# Two kinds of damage per case, each on its own key (to keep the suite short): each costs one rebuild of its key
# only, the tier serves the third key, and a writer replaces both entries.
SHARED_KINDS = [
    pytest.param(("garbage-meta", "meta-json-list"), id="garbage-meta+meta-json-list"),
    pytest.param(("meta-is-dir", "only-artifact"), id="meta-is-dir+only-artifact"),
    pytest.param(("only-meta", "untrusted-signer"), id="only-meta+untrusted-signer"),
    pytest.param(("tampered-artifact", "other-entrys-meta"), id="tampered-artifact+other-entrys-meta"),
]


@pytest.mark.parametrize("kinds", SHARED_KINDS)
def test_bad_shared_dir_entry(kinds, tmp_path, fleet, keys, plan_units):
    shared = copy_cache(fleet["shared"], tmp_path / "shared")
    damaged = [n for n, _ in plan_units[:len(kinds)]]
    others = sorted(n for n, _ in plan_units[len(kinds):])
    dirs = entry_dirs(shared)
    for kind, name in zip(kinds, damaged):
        _damage_shared(kind, dirs[name], fleet)
    # a machine allowed to write: one rebuild per bad entry, the tier serves the other keys, the entries are replaced
    s = build_json(base_env(tmp_path / "b", TMPDIR=tmp_path, JITKILN_SHARED_DIR=shared,
                            JITKILN_SIGNING_KEY=keys["a"]))
    assert sorted(s["compiled"]) == sorted(damaged) and sorted(s["cache_hits"]) == others, s
    # a reader: everything from the tier, nothing compiled
    s2 = build_json(base_env(tmp_path / "c", TMPDIR=tmp_path, JITKILN_SHARED_DIR=shared,
                             JITKILN_TRUST_KEYS=keys["a_pub"]))
    assert s2["compiled"] == [] and len(s2["cache_hits"]) == 3, f"shared entry not repaired: {s2}"


REDIS_KINDS = [
    pytest.param(("obj-wrong-type", "man-wrong-type"), id="obj-wrong-type+man-wrong-type"),
    pytest.param(("loc-wrong-type", "garbage-meta"), id="loc-wrong-type+garbage-meta"),
    pytest.param(("man-garbage-deps", "tampered-artifact"), id="man-garbage-deps+tampered-artifact"),
]


def _damage_redis(cl, kind: str, name: str, ukey: str) -> None:
    okey = next(k for k in cl.scan_iter("jitkiln:v1:*:obj:*")  # (a key damaged before is of another type)
                if cl.type(k) == b"hash" and json.loads(cl.hget(k, "meta"))["name"] == name)
    key = okey.decode().rsplit(":", 1)[1]
    if kind == "obj-wrong-type":
        cl.delete(okey)
        cl.set(okey, b"garbage of the wrong type")
    elif kind == "man-wrong-type":
        cl.delete(f"jitkiln:v1:man:{ukey}")
        cl.set(f"jitkiln:v1:man:{ukey}", b"\xffgarbage manifest")
    elif kind == "loc-wrong-type":
        cl.delete(f"jitkiln:v1:loc:{key}")
        cl.rpush(f"jitkiln:v1:loc:{key}", b"x", b"y")
    elif kind == "garbage-meta":
        cl.hset(okey, "meta", b"\xff{garbage")
    elif kind == "man-garbage-deps":
        cl.hset(f"jitkiln:v1:man:{ukey}", key, b"[1, {")
    elif kind == "tampered-artifact":
        b = bytearray(cl.hget(okey, "artifact"))
        b[100] ^= 0xFF
        cl.hset(okey, "artifact", bytes(b))
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("kinds", REDIS_KINDS)
def test_bad_redis_entry(kinds, tmp_path, fleet, keys, plan_units, redis_url):
    if not redis_url:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    import redis
    cl = redis.Redis.from_url(redis_url)
    cl.flushdb()
    for k, v in fleet["snapshot"].items():
        cl.restore(k, 0, v, replace=True)
    damaged = plan_units[:len(kinds)]
    others = sorted(n for n, _ in plan_units[len(kinds):])
    for kind, (name, ukey) in zip(kinds, damaged):
        _damage_redis(cl, kind, name, ukey)
    s = build_json(base_env(tmp_path / "b", TMPDIR=tmp_path, JITKILN_REDIS_URL=redis_url,
                            JITKILN_SIGNING_KEY=keys["a"]))
    assert sorted(s["compiled"]) == sorted(n for n, _ in damaged) and sorted(s["cache_hits"]) == others, s
    s2 = build_json(base_env(tmp_path / "c", TMPDIR=tmp_path, JITKILN_REDIS_URL=redis_url,
                             JITKILN_TRUST_KEYS=keys["a_pub"]))
    assert s2["compiled"] == [] and len(s2["cache_hits"]) == 3, f"redis entry not repaired: {s2}"


# (c) a full disk at each write ---------------------------------------------------------------------------------------
def _in_tmpfs(tmp: Path, size_k: int, prepare: str, run: str, free_k: int) -> dict:
    """Run ``run`` with the cache on a private tmpfs of ``size_k`` KiB filled up to ``free_k`` KiB free.
    Returns rc/stdout/stderr of ``run`` and, after the filler is removed, of ``cache verify`` and leftovers."""
    m = tmp / "mnt"
    m.mkdir()
    o = tmp / "out"
    o.mkdir()
    script = f"""
set -u
mount --make-rprivate /
mount -t tmpfs -o size={size_k}k tmpfs {m}
{prepare}
dd if=/dev/zero of={m}/fill bs=4096 2>/dev/null
truncate -s -{free_k}K {m}/fill 2>/dev/null || rm -f {m}/fill
{run} >{o}/stdout 2>{o}/stderr; echo $? >{o}/rc
rm -f {m}/fill
{PY} -m jitkiln.cli cache verify >{o}/verify 2>&1; echo $? >{o}/verify_rc
{PY} -m jitkiln.cli cache ls --json >{o}/ls 2>/dev/null
find {m}/cache -name '*.tmp' >{o}/stray
find {m}/cache/v1/tmp -mindepth 1 >>{o}/stray 2>/dev/null
"""
    env = base_env(m / "cache", TMPDIR=tmp)
    subprocess.run(["unshare", "-m", "bash", "-c", script], env=env, timeout=200, check=True)
    res = {f.name: f.read_text(errors="replace") for f in o.iterdir()}
    return res


def _check_full_disk_result(res: dict, expect_compiled: int | None = None) -> None:
    out = res["stdout"] + res["stderr"]
    assert "Traceback" not in out, res["stderr"]
    if res["rc"].strip() != "0":
        lines = [ln for ln in res["stderr"].splitlines()
                 if ln.strip() and not ln.startswith(("jitkiln: note:", "jitkiln: warning:"))]
        assert lines and lines[0].startswith("jitkiln: error: "), res["stderr"]
    assert res["verify_rc"].strip() == "0" and ", 0 bad" in res["verify"], res["verify"]
    assert res["stray"].strip() == "", "stray temporary files: " + res["stray"]


@pytest.mark.parametrize("free_k", [
    pytest.param(0, id="free-0k"),
    pytest.param(256, id="free-256k"),
    pytest.param(1012, id="free-1012k"),
    pytest.param(1200, id="free-1200k"),
])
def test_full_disk_while_building(free_k, tmp_path, demo_cache, plan_units):
    why = _root_ns()
    if why:
        pytest.skip(why)
    first = plan_units[0][0]
    gone = entry_dirs(demo_cache)[first].relative_to(demo_cache)
    prepare = f"cp -a {demo_cache} {tmp_path}/mnt/cache && rm -rf {tmp_path}/mnt/cache/{gone}"
    run = f"{PY} -m jitkiln.cli build demo --json --no-progress"
    res = _in_tmpfs(tmp_path, 8192, prepare, run, free_k)
    _check_full_disk_result(res)


def test_full_disk_while_writing_the_build_record(tmp_path, demo_cache):
    why = _root_ns()
    if why:
        pytest.skip(why)
    prepare = f"cp -a {demo_cache} {tmp_path}/mnt/cache"
    res = _in_tmpfs(tmp_path, 8192, prepare, f"{PY} -m jitkiln.cli build demo --json --no-progress", 0)
    _check_full_disk_result(res)
    assert res["rc"].strip() != "0" or "cache_hits" in res["stdout"], res


def test_full_disk_while_seeding_leaves_cache_as_it_was(tmp_path, bundle_a, keys):
    why = _root_ns()
    if why:
        pytest.skip(why)
    run = f"{PY} -m jitkiln.cli seed {bundle_a} --trust {keys['a_pub']} --arch sm_90a"
    res = _in_tmpfs(tmp_path, 8192, f"mkdir {tmp_path}/mnt/cache", run, 1600)
    _check_full_disk_result(res)
    assert res["rc"].strip() != "0", "the seed fit: make the free space smaller"
    assert json.loads(res["ls"] or "[]") == [], "a failed seed left entries: " + res["ls"]


# (d) re-seeding repairs a damaged local entry -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [
    pytest.param("flip-artifact"),
    pytest.param("drop-meta"),
    pytest.param("drop-artifact"),
])
def test_reseed_repairs_damaged_entry(kind, tmp_path, bundle_a, keys):
    cache = tmp_path / "cache"
    env = base_env(cache)
    argv = ["seed", str(bundle_a), "--trust", str(keys["a_pub"]), "--arch", "sm_90a"]
    assert jk(argv, env).returncode == 0
    e = next(iter(entry_dirs(cache).values())) if kind != "drop-meta" else \
        next(p for p in (cache / "v1" / "objects").glob("??/*"))
    if kind == "flip-artifact":
        b = bytearray((e / "artifact").read_bytes())
        b[1000] ^= 0x55
        (e / "artifact").write_bytes(bytes(b))
    elif kind == "drop-meta":
        (e / "meta.json").unlink()
    else:
        (e / "artifact").unlink()
    r = jk(argv, env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert_verify_clean(cache, 3)


# (e) SIGTERM during a compile ends the compilers ----------------------------------------------------------------------
def _pgid_alive(pgid: int) -> list[int]:
    alive = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = (d / "stat").read_text()
                fields = st[st.rindex(")") + 2:].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    alive.append(int(d.name))
            except (OSError, ValueError):
                continue
    return alive


def test_sigterm_during_compile_ends_compilers(tmp_path):
    pids = tmp_path / "compiler-pids"
    w = tmp_path / "nvcc"
    w.write_text(f"""#!/bin/bash
if [ "$1" != "--version" ] && [ "$1" != "-V" ]; then echo "$$ $(ps -o pgid= $$)" >> {pids}; sleep 25; fi
exec {REAL_NVCC} "$@"
""")
    w.chmod(0o755)
    env = base_env(tmp_path / "cache", TMPDIR=tmp_path, JITKILN_NVCC=w)
    p = subprocess.Popen([PY, "-m", "jitkiln.cli", "build", "demo", "--json", "--no-progress"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pids.exists() and pids.read_text().strip()):
            time.sleep(0.1)
        assert pids.exists(), "no compile started"
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        groups = {int(ln.split()[1]) for ln in pids.read_text().splitlines() if ln.strip()}
        time.sleep(1.0)
        left = {g: _pgid_alive(g) for g in groups}
        assert not any(left.values()), f"compiler processes left running after SIGTERM: {left}"
    finally:
        for g in groups | {p.pid}:
            with _suppress():
                os.killpg(g, signal.SIGKILL)
        with _suppress():
            p.kill()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        return et is not None and issubclass(et, OSError)


# (f) a changed compiler is never the old compiler -------------------------------------------------------------------------
def _wrapper(path: Path, tag: str) -> None:
    path.write_text(f"#!/bin/bash\n# variant {tag}\nexec {REAL_NVCC} -DJK_VARIANT_{tag} \"$@\"\n")
    path.chmod(0o755)


def _plan_keys(env) -> tuple[str, list[str]]:
    r = jk(["plan", "demo", "--json"], env)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    return j["toolchain"], [i["key"] for i in j["instances"]]


def test_changed_compiler_changes_keys(tmp_path):
    w = tmp_path / "nvcc"
    _wrapper(w, "AAAA")
    env = base_env(tmp_path / "cache", JITKILN_NVCC=w)
    before = _plan_keys(env)
    _wrapper(w, "BBBB")
    os.utime(w, (time.time() + 5, time.time() + 5))
    assert _plan_keys(env) != before


def test_changed_compiler_same_size_and_mtime_changes_keys(tmp_path):
    w = tmp_path / "nvcc"
    _wrapper(w, "AAAA")
    env = base_env(tmp_path / "cache", JITKILN_NVCC=w)
    st = w.stat()
    before = _plan_keys(env)
    _wrapper(w, "BBBB")
    assert w.stat().st_size == st.st_size
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _plan_keys(env) != before, "the rewritten compiler has the old fingerprint: old artifacts would hit"


# (g) stale temporaries are swept at start -----------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_local_temporaries_swept_at_start(tmp_path, demo_cache):
    cache = copy_cache(demo_cache, tmp_path / "cache")
    tmpd = cache / "v1" / "tmp"
    stale = tmpd / f"{'ab' * 8}.{_dead_pid()}.deadbeef"
    stale.mkdir(parents=True)
    (stale / "artifact").write_bytes(b"\0" * 4096)
    old = time.time() - 2 * 3600
    os.utime(stale / "artifact", (old, old))
    os.utime(stale, (old, old))
    live = tmpd / f"{'cd' * 8}.{os.getpid()}.cafef00d"  # a live writer's: must stay
    live.mkdir()
    s = build_json(base_env(cache, TMPDIR=tmp_path))
    assert len(s["cache_hits"]) == 3
    assert live.exists(), "a live writer's temporary directory was removed"
    assert not stale.exists(), "stale temporary directory left in v1/tmp"


def test_stale_shared_temporaries_swept_at_start(tmp_path, fleet, keys):
    shared = copy_cache(fleet["shared"], tmp_path / "shared")
    stale = shared / "v1" / "tmp" / f"{'ab' * 8}.{os.uname().nodename}.{_dead_pid()}.deadbeef"
    stale.mkdir(parents=True)
    (stale / "artifact").write_bytes(b"\0" * 4096)
    old = time.time() - 2 * 3600
    os.utime(stale / "artifact", (old, old))
    os.utime(stale, (old, old))
    s = build_json(base_env(tmp_path / "c", TMPDIR=tmp_path, JITKILN_SHARED_DIR=shared,
                            JITKILN_SIGNING_KEY=keys["a"]))
    assert len(s["cache_hits"]) == 3, s
    assert not stale.exists(), "stale temporary directory left in the shared v1/tmp"


# (h) a huge bundle member is refused within bounded memory ---------------------------------------------------------------
def test_huge_bundle_member_refused_without_reading_it(tmp_path, keys):
    size = 3 << 30  # 3 GiB, sparse on disk
    b = tmp_path / "huge.bundle"
    manifest = json.dumps({"format": "jitkiln-bundle", "version": 1, "family": "demo", "variant": "f32",
                           "arch": "sm_90a", "instances": []}).encode()
    sig = json.dumps({"key_id": "0" * 16, "sig": "00" * 64}).encode()
    with open(b, "wb") as f:
        def add(name, payload_len, payload=None):
            ti = tarfile.TarInfo(name)
            ti.size = payload_len
            ti.mtime = int(time.time())
            f.write(ti.tobuf(format=tarfile.USTAR_FORMAT if payload_len < 8 << 30 else tarfile.GNU_FORMAT))
            if payload is not None:
                f.write(payload)
            else:
                f.seek(payload_len, os.SEEK_CUR)
            pad = (-payload_len) % 512
            if payload is None:
                f.seek(pad, os.SEEK_CUR)
            else:
                f.write(b"\0" * pad)
        add("manifest.json", len(manifest), manifest)
        add("manifest.sig", len(sig), sig)
        add(f"objects/{'ab' * 32}/artifact", size)
        f.write(b"\0" * 1024)
    env = base_env(tmp_path / "cache")
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", f"ulimit -v 1500000; exec {PY} -m jitkiln.cli seed {b} --trust "
                                      f"{keys['a_pub']} --arch sm_90a"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(r)
    assert time.monotonic() - t0 < 30


# (i) every network wait is bounded -------------------------------------------------------------------------------------------
def test_unreachable_ray_address_reported_in_bounded_time(tmp_path, demo_cache):
    pytest.importorskip("ray")
    cache = copy_cache(demo_cache, tmp_path / "cache")
    first = next(iter(entry_dirs(cache).values()))
    shutil.rmtree(first)  # one miss, so the executor is needed
    env = base_env(cache, TMPDIR=tmp_path)
    p = subprocess.Popen([PY, "-m", "jitkiln.cli", "build", "demo", "--json", "--no-progress", "--executor", "ray",
                          "--ray-address", "10.255.255.1:6379"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("no answer within 20 s for an unreachable Ray address")
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert_one_line_error(r)
