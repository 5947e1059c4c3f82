"""Redis tier against a real redis-server: sharing, poisoning, a server that dies or hangs mid-build."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from jitkiln.fleet.config import store_from_env
from jitkiln.fleet.remotes import RedisRemote as RedisTier
from jitkiln.fleet.signing import Signer
from test_fleet_util import RedisServer, artifact_digests, build, demo_plan, fleet_env, needs_nvcc  # noqa: F401

pytestmark = needs_nvcc


@pytest.fixture
def redis_server(tmp_path):
    srv = RedisServer(tmp_path / "redis")
    yield srv
    srv.stop()


def fleet_store(root, env, url, sign=True, trust=True):
    e = {"JITKILN_REDIS_URL": url}
    if sign:
        e["JITKILN_SIGNING_KEY"] = str(env["key"])
    if trust:
        e["JITKILN_TRUST_KEYS"] = str(env["pub"])
    return store_from_env(root, env=e)


def redis_keys(srv, pattern):
    return sorted(k.decode() for k in srv.client.scan_iter(pattern))


def test_second_root_compiles_nothing(fleet_env, redis_server, tmp_path):
    nv = fleet_env["nvcc"]
    plan = demo_plan()
    a = fleet_store(tmp_path / "a", fleet_env, redis_server.url)
    rec = build(a, plan)
    assert len(rec.compiled) == 3 and nv.calls == 3
    # namespaced by toolchain and arch
    objs = redis_keys(redis_server, "jitkiln:v1:*:obj:*")
    assert len(objs) == 3 and all(f":{plan.compiler_fp}:sm_90a:obj:" in k for k in objs), objs
    b = fleet_store(tmp_path / "b", fleet_env, redis_server.url, sign=False)  # a reader: trusts, cannot write
    rec = build(b, plan)
    assert nv.calls == 3, "the second cache root must not compile anything"
    assert len(rec.hits) == 3 and not rec.compiled
    assert artifact_digests(a) == artifact_digests(b)
    assert b.verify_all() == (3, [])


def _poison(srv, key, how, env, other_key):
    loc = srv.client.get(f"jitkiln:v1:loc:{key}").decode()
    okey = f"jitkiln:v1:{loc}:obj:{key}"
    h = srv.client.hgetall(okey)
    art, meta = h[b"artifact"], json.loads(h[b"meta"])
    if how == "other-key-bytes":
        oloc = srv.client.get(f"jitkiln:v1:loc:{other_key}").decode()
        art = srv.client.hget(f"jitkiln:v1:{oloc}:obj:{other_key}", "artifact")
    elif how == "flipped-bytes":
        i = len(art) // 2
        art = art[:i] + bytes([art[i] ^ 0x40]) + art[i + 1:]
    elif how == "forged-digest":  # swapped content with a matching digest, but the old signature
        import hashlib
        oloc = srv.client.get(f"jitkiln:v1:loc:{other_key}").decode()
        art = srv.client.hget(f"jitkiln:v1:{oloc}:obj:{other_key}", "artifact")
        meta["artifact_sha256"] = hashlib.sha256(art).hexdigest()
    elif how == "untrusted-signer":
        import hashlib
        oloc = srv.client.get(f"jitkiln:v1:loc:{other_key}").decode()
        art = srv.client.hget(f"jitkiln:v1:{oloc}:obj:{other_key}", "artifact")
        meta["artifact_sha256"] = hashlib.sha256(art).hexdigest()
        meta = Signer.from_file(env["evil"]).sign_meta(meta)
    elif how == "unsigned":
        meta.pop("signature")
    srv.client.hset(okey, mapping={"artifact": art, "meta": json.dumps(meta)})
    return art


@pytest.mark.parametrize("how", ["other-key-bytes", "flipped-bytes", "forged-digest", "untrusted-signer",
                                 "unsigned"])
def test_poisoned_entry_is_refused_and_rebuilt(fleet_env, redis_server, tmp_path, capfd, how):
    nv = fleet_env["nvcc"]
    plan = demo_plan(shapes=[{"m": 8, "n": 512, "k": 256}, {"m": 256, "n": 256, "k": 256}])
    a = fleet_store(tmp_path / "a", fleet_env, redis_server.url)
    build(a, plan)
    assert nv.calls == 2
    keys = [u.key for u in build(a, plan).units]
    bad_art = _poison(redis_server, keys[0], how, fleet_env, keys[1])
    t_poison = time.time()
    capfd.readouterr()
    b = fleet_store(tmp_path / "b", fleet_env, redis_server.url)
    rec = build(b, plan)
    err = capfd.readouterr().err
    assert nv.calls == 3, "exactly the poisoned unit is rebuilt"
    assert [u.status for u in rec.units] == ["compiled", "hit"]
    assert f"refused entry {keys[0][:16]}" in err and "rebuilt" in err, err
    reason = {"other-key-bytes": "digest", "flipped-bytes": "digest", "forged-digest": "does not verify",
              "untrusted-signer": "does not trust", "unsigned": "not signed"}[how]
    assert reason in err, err
    # nothing unverified was published locally: b's entry is its own build, and verifies
    assert b.verify_all() == (2, [])
    if how == "unsigned":  # genuine bytes, only the signature stripped: builds are reproducible, so b's own
        # build has the same bytes; that it is b's own shows in its metadata, written after the poisoning
        assert json.loads((b.obj_dir(keys[0]) / "meta.json").read_text())["created"] >= t_poison
    else:
        assert (b.obj_dir(keys[0]) / "artifact").read_bytes() != bad_art
    # the tier was healed by b's write-back: a third root gets a good entry without compiling
    c = fleet_store(tmp_path / "c", fleet_env, redis_server.url)
    rec = build(c, plan)
    assert nv.calls == 3 and len(rec.hits) == 2


def test_redis_killed_mid_build_finishes_locally(fleet_env, redis_server, tmp_path, capfd):
    nv = fleet_env["nvcc"]
    plan = demo_plan("f64")
    store = fleet_store(tmp_path / "a", fleet_env, redis_server.url)
    from jitkiln.build import Builder
    killed = []

    def on_ready(unit, entry):
        if not killed:
            redis_server.stop()
            killed.append(unit.instance.name)

    t0 = time.monotonic()
    rec = Builder(store, jobs=2, progress=False, on_ready=on_ready).build(plan)
    wall = time.monotonic() - t0
    assert killed and len(rec.compiled) == 3 and not [u for u in rec.units if u.status == "failed"]
    assert nv.calls == 3 and store.verify_all() == (3, [])
    err = capfd.readouterr().err
    assert err.count("remote cache redis") == 1 and "continuing locally" in err, err
    assert wall < 60
    # and a later build with Redis still down is all local hits, quickly
    t0 = time.monotonic()
    rec = build(fleet_store(tmp_path / "a", fleet_env, redis_server.url), plan)
    assert len(rec.hits) == 3 and time.monotonic() - t0 < 5


def test_hung_redis_costs_one_short_timeout(fleet_env, redis_server, tmp_path, capfd):
    nv = fleet_env["nvcc"]
    plan = demo_plan("f64", shapes=[{"m": 8, "n": 512, "k": 256}])
    store = fleet_store(tmp_path / "a", fleet_env, redis_server.url)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
    try:
        t0 = time.monotonic()
        rec = build(store, plan)
        wall = time.monotonic() - t0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert len(rec.compiled) == 1 and nv.calls == 1
    tier = store.remotes[0]
    assert isinstance(tier, RedisTier)
    # one socket timeout (3 s), then the breaker skips Redis: far less than one timeout per call
    assert wall < 3 * 2 + 15, wall
    err = capfd.readouterr().err
    assert err.count("remote cache redis") == 1 and "Timeout" in err, err


def test_unreachable_redis_and_missing_trust(fleet_env, tmp_path, capfd):
    from test_fleet_util import free_port
    plan = demo_plan(shapes=[{"m": 8, "n": 512, "k": 256}])
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    t0 = time.monotonic()
    rec = build(fleet_store(tmp_path / "a", fleet_env, url, trust=False), plan)
    assert len(rec.compiled) == 1 and time.monotonic() - t0 < 30
    err = capfd.readouterr().err
    assert "continuing locally" in err


def test_without_trusted_keys_remote_entries_are_refused(fleet_env, redis_server, tmp_path, capfd):
    nv = fleet_env["nvcc"]
    plan = demo_plan(shapes=[{"m": 8, "n": 512, "k": 256}])
    build(fleet_store(tmp_path / "a", fleet_env, redis_server.url), plan)
    capfd.readouterr()
    from jitkiln.fleet import config as remote
    remote._config_noted.clear()
    b = store_from_env(tmp_path / "b", env={"JITKILN_REDIS_URL": redis_server.url})
    rec = build(b, plan)
    err = capfd.readouterr().err
    assert nv.calls == 2 and len(rec.compiled) == 1
    assert "no trusted key" in err and "does not trust" in err, err
