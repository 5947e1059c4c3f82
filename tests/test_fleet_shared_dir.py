"""Shared-directory tier: two roots share it, poisoned entries are refused and rebuilt, a broken mount."""
from __future__ import annotations

import json
import os

import pytest

from jitkiln.errors import UsageError
from jitkiln.fleet.config import store_from_env
from jitkiln.fleet.remotes import SharedDirRemote as SharedDirTier
from jitkiln.fleet.signing import Signer
from test_fleet_util import artifact_digests, build, demo_plan, fleet_env, needs_nvcc  # noqa: F401

pytestmark = needs_nvcc


def shared_store(root, env, shared, sign=True):
    e = {"JITKILN_SHARED_DIR": str(shared), "JITKILN_TRUST_KEYS": str(env["pub"])}
    if sign:
        e["JITKILN_SIGNING_KEY"] = str(env["key"])
    return store_from_env(root, env=e)


def entry_dir(shared, key):
    (d,) = list((shared / "v1" / "ns").glob(f"*/obj/{key[:2]}/{key}"))
    return d


def test_two_roots_share_a_directory(fleet_env, tmp_path):
    nv, shared = fleet_env["nvcc"], tmp_path / "nfs"
    plan = demo_plan()
    a = shared_store(tmp_path / "a", fleet_env, shared)
    build(a, plan)
    assert nv.calls == 3
    spaces = os.listdir(shared / "v1" / "ns")
    assert spaces == [f"{plan.compiler_fp}:sm_90a"]
    assert not os.listdir(shared / "v1" / "tmp"), "no temporary directory is left behind"
    b = shared_store(tmp_path / "b", fleet_env, shared, sign=False)
    rec = build(b, plan)
    assert nv.calls == 3 and len(rec.hits) == 3
    assert artifact_digests(a) == artifact_digests(b)


@pytest.mark.parametrize("how", ["flipped-bytes", "forged-signature", "unreadable-meta"])
def test_poisoned_shared_entry_is_refused_discarded_and_rebuilt(fleet_env, tmp_path, capfd, how):
    nv, shared = fleet_env["nvcc"], tmp_path / "nfs"
    plan = demo_plan(shapes=[{"m": 8, "n": 512, "k": 256}, {"m": 256, "n": 256, "k": 256}])
    a = shared_store(tmp_path / "a", fleet_env, shared)
    keys = [u.key for u in build(a, plan).units]
    d = entry_dir(shared, keys[0])
    art = bytearray((d / "artifact").read_bytes())
    meta = json.loads((d / "meta.json").read_text())
    if how == "flipped-bytes":
        art[100] ^= 1
    elif how == "forged-signature":
        import hashlib
        art = bytearray((entry_dir(shared, keys[1]) / "artifact").read_bytes())
        meta["artifact_sha256"] = hashlib.sha256(art).hexdigest()
        meta["signature"]["sig"] = Signer.from_file(fleet_env["evil"]).sign_bytes(b"x")["sig"]
    (d / "artifact").write_bytes(bytes(art))
    (d / "meta.json").write_text("{not json" if how == "unreadable-meta" else json.dumps(meta))
    capfd.readouterr()
    b = shared_store(tmp_path / "b", fleet_env, shared)
    rec = build(b, plan)
    err = capfd.readouterr().err
    assert [u.status for u in rec.units] == ["compiled", "hit"] and nv.calls == 3
    assert f"refused entry {keys[0][:16]}" in err, err
    assert b.verify_all() == (2, [])
    # discarded from the shared directory and replaced by b's signed build
    assert json.loads((entry_dir(shared, keys[0]) / "meta.json").read_text())["host"]
    c = shared_store(tmp_path / "c", fleet_env, shared)
    assert len(build(c, plan).hits) == 2 and nv.calls == 3


def test_broken_shared_directory_build_goes_on_locally(fleet_env, tmp_path, capfd):
    nv = fleet_env["nvcc"]
    bad = tmp_path / "not-a-dir"
    bad.write_text("a file where the mount should be")
    with pytest.raises(UsageError, match="is a file"):  # named as a file: refused where it enters (issue 16)
        shared_store(tmp_path / "a", fleet_env, bad)
    bad.unlink()
    plan = demo_plan(shapes=[{"m": 8, "n": 512, "k": 256}])
    store = shared_store(tmp_path / "a", fleet_env, bad)
    bad.write_text("the mount went away after the start: a transport failure, not a bad input")
    rec = build(store, plan)
    assert len(rec.compiled) == 1 and nv.calls == 1 and store.verify_all() == (1, [])
    err = capfd.readouterr().err
    assert err.count("remote cache shared-dir") == 1 and "continuing locally" in err, err


def test_concurrent_writers_first_wins_and_size_limit(tmp_path):
    import hashlib
    t1, t2 = SharedDirTier(tmp_path / "s"), SharedDirTier(tmp_path / "s", max_entry_bytes=10)
    key = "ab" * 32
    meta = {"key": key, "toolchain": "tc", "arch": "sm_90a", "artifact_sha256": hashlib.sha256(b"one").hexdigest()}
    t1.put(key, b"one", meta)
    t1.put(key, b"two", dict(meta, artifact_sha256="x"))  # a second writer: its copy is discarded
    assert t1.get(key) == (b"one", meta)
    t2.put("cd" * 32, b"x" * 11, dict(meta, key="cd" * 32))  # over the entry size limit: stays local
    assert t2.get("cd" * 32) is None
    t1.put_manifest(key, [{"key": key, "deps": {"inc0/a.h": "1"}}])
    t2.put_manifest(key, [{"key": "ef" * 32, "deps": {"inc0/a.h": "2"}}])  # records never overwrite others
    assert sorted(r["key"] for r in t1.get_manifest(key)) == sorted([key, "ef" * 32])
    assert t1.gc(max_bytes=0) == [key] and t1.get(key) is None
