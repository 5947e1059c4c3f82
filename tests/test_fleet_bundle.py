"""Signed bundles: prebuild -> seed round trip, and every refusal leaves the cache exactly as it was."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from jitkiln.cli import main
from jitkiln.fleet.signing import Signer
from jitkiln.store import Store
from test_fleet_util import build, demo_plan, needs_nvcc, tree_snapshot

pytestmark = needs_nvcc


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Keys, the counting nvcc and one bundle for the whole module (built once: compiles are the cost)."""
    from jitkiln.fleet import store as store_mod
    from jitkiln.fleet.signing import generate_keypair
    from test_fleet_util import isolate_fleet
    tmp = tmp_path_factory.mktemp("bundle")
    with pytest.MonkeyPatch.context() as mp:
        nv = isolate_fleet(mp, tmp)
        mp.setattr(store_mod, "_warned", set())
        priv, pub, _ = generate_keypair(tmp / "keys" / "builder.key")
        evil, _, _ = generate_keypair(tmp / "evil" / "evil.key")
        out = tmp / "demo.bundle"
        import contextlib
        import io as _io
        buf = _io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["prebuild", "demo", "--shape", "m=8,n=512,k=256", "--shape", "m=256,n=256,k=256",
                       "--arch", "sm_90a", "--key", str(priv), "--cache-dir", str(tmp / "builder"),
                       "-o", str(out), "--json"])
        assert rc == 0
        info = json.loads(buf.getvalue().strip().splitlines()[-1])
        assert len(info["instances"]) == 2 and nv.calls == 2
        yield {"nvcc": nv, "key": priv, "pub": pub, "evil": evil, "bundle": out, "builder": tmp / "builder"}


@pytest.fixture(scope="module")
def prefilled(kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefilled") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JITKILN_NVCC", str(kit["nvcc"].path))
        build(Store(root), demo_plan("f64", shapes=[{"m": 8, "n": 512, "k": 256}]))
    return root


@pytest.fixture
def fleet_env(kit):
    return kit


@pytest.fixture
def bundle(kit):
    return kit["bundle"]


def seed(fleet_env, bundle_path, root, *extra):
    return main(["seed", str(bundle_path), "--trust", str(fleet_env["pub"]), "--cache-dir", str(root),
                 "--arch", "sm_90a", *extra])


def test_round_trip(fleet_env, bundle, tmp_path, capsys):
    root = tmp_path / "server"
    calls = fleet_env["nvcc"].calls
    assert seed(fleet_env, bundle, root) == 0
    assert fleet_env["nvcc"].calls == calls
    assert "seeded 2 instances" in capsys.readouterr().out
    store = Store(root)
    rec = build(store, demo_plan(shapes=[{"m": 8, "n": 512, "k": 256}, {"m": 256, "n": 256, "k": 256}]))
    calls = fleet_env["nvcc"].calls
    assert len(rec.hits) == 2 and not rec.compiled and fleet_env["nvcc"].calls == calls
    assert store.verify_all() == (2, [])
    builder = Store(fleet_env["builder"])
    for key, d in store.entries():
        assert (d / "artifact").read_bytes() == (builder.obj_dir(key) / "artifact").read_bytes()
    assert seed(fleet_env, bundle, root) == 0  # idempotent
    assert "0 instances (2 already present)" in capsys.readouterr().out


def rewrite(src, dst, edit):
    """Copy a bundle, passing each (TarInfo, bytes) through ``edit`` (which returns a list of them)."""
    with tarfile.open(src) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        for m, data in members:
            for m2, d2 in edit(m, data):
                if d2 is None:
                    out.addfile(m2)
                else:
                    m2.size = len(d2)
                    out.addfile(m2, io.BytesIO(d2))
    return dst


def _flip(m, data):
    if m.name.endswith("/artifact"):
        data = data[:500] + bytes([data[500] ^ 1]) + data[501:]
    return [(m, data)]


def _meta(m, data):
    if m.name.endswith("/meta.json"):
        data = data.replace(b'"compile_s"', b'"compile_s" ', 1)
    return [(m, data)]


def _resign(key_path, change):
    def edit(m, data):
        if m.name == "manifest.json":
            man = json.loads(data)
            change(man)
            data = json.dumps(man).encode()
            edit.sig = json.dumps(Signer.from_file(key_path).sign_bytes(data)).encode()
            return [(m, data)]
        if m.name == "manifest.sig":
            return [(m, edit.sig)]
        return [(m, data)]
    return edit


def _member(name, kind="file", target=""):
    def edit(m, data):
        out = [(m, data)]
        if m.name == "manifest.sig":
            ti = tarfile.TarInfo(name)
            if kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, target
                out.append((ti, None))
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, target
                out.append((ti, None))
            else:
                out.append((ti, b"owned\n"))
        return out
    return edit


CASES = {
    "tampered-artifact": (_flip, "does not match its signed digest"),
    "tampered-meta": (_meta, "metadata does not match its signed digest"),
    "missing-signature": (lambda m, d: [] if m.name == "manifest.sig" else [(m, d)], "not signed"),
    "path-traversal": (_member("../../evil.so"), "unexpected path"),
    "absolute-path": (_member("/tmp/evil.so"), "unexpected path"),
    "symlink": (_member("objects/" + "a" * 64 + "/artifact", "sym", "/etc/passwd"), "symbolic link"),
    "hardlink": (_member("objects/" + "b" * 64 + "/artifact", "hard", "manifest.json"), "hard link"),
    "unlisted-file": (_member("objects/" + "c" * 64 + "/artifact"), "does not list"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_and_cache_unchanged(fleet_env, bundle, prefilled, tmp_path, capsys, case):
    root = tmp_path / "server"
    shutil.copytree(prefilled, root)  # the cache has something already
    before = tree_snapshot(root)
    assert before
    edit, why = CASES[case]
    bad = rewrite(bundle, tmp_path / "bad.bundle", edit)
    assert seed(fleet_env, bad, root) == 8
    err = capsys.readouterr().err
    assert why in err and "hint:" in err, err
    assert tree_snapshot(root) == before


def _other_key(fleet_env, bundle, tmp_path):
    edit = _resign(fleet_env["evil"], lambda man: None)
    return rewrite(bundle, tmp_path / "bad.bundle", edit), "does not trust"


def _bad_sig(fleet_env, bundle, tmp_path):
    def edit(m, data):
        if m.name == "manifest.sig":
            sig = json.loads(data)
            sig["sig"] = Signer.from_file(fleet_env["key"]).sign_bytes(b"something else")["sig"]
            data = json.dumps(sig).encode()
        return [(m, data)]
    return rewrite(bundle, tmp_path / "bad.bundle", edit), "does not verify"


def _toolchain(fleet_env, bundle, tmp_path):  # validly signed, but for another compiler
    edit = _resign(fleet_env["key"], lambda man: man.update(toolchain="nvcc-11.8.89-0123456789abcdef"))
    return rewrite(bundle, tmp_path / "bad.bundle", edit), "toolchain"


def _truncated(fleet_env, bundle, tmp_path):
    data = bundle.read_bytes()
    p = tmp_path / "bad.bundle"
    p.write_bytes(data[:len(data) // 2 + 100])
    return p, "truncated"


def _arch(fleet_env, bundle, tmp_path):
    return bundle, "targets sm_90a, this machine sm_80"


OTHER = {"untrusted-signer": _other_key, "bad-signature": _bad_sig, "other-toolchain": _toolchain,
         "truncated": _truncated, "other-arch": _arch}


@pytest.mark.parametrize("case", sorted(OTHER))
def test_refused_signature_toolchain_arch_truncation(fleet_env, bundle, tmp_path, capsys, case):
    root = tmp_path / "server"
    Store(root).ensure()
    before = tree_snapshot(root)
    bad, why = OTHER[case](fleet_env, bundle, tmp_path)
    args = ["--arch", "sm_80"] if case == "other-arch" else []
    rc = main(["seed", str(bad), "--trust", str(fleet_env["pub"]), "--cache-dir", str(root),
               *(args or ["--arch", "sm_90a"])])
    err = capsys.readouterr().err
    assert rc == 8 and why in err and "hint:" in err, err
    assert tree_snapshot(root) == before == {}


def test_prebuild_without_key_and_seed_without_trust(fleet_env, tmp_path, capsys):
    calls = fleet_env["nvcc"].calls
    rc = main(["prebuild", "demo", "--shape", "m=8,n=512,k=256", "-o", str(tmp_path / "x.bundle"),
               "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "jitkiln keygen" in capsys.readouterr().err
    assert fleet_env["nvcc"].calls == calls, "nothing is built before the key is checked"
    rc = main(["seed", str(tmp_path / "x.bundle"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "JITKILN_TRUST_KEYS" in capsys.readouterr().err
