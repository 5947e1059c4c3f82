"""Build, store and runtime with real nvcc compiles of the demo family."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_wrapper
from jitkiln.build import Builder
from jitkiln.cli import main
from jitkiln.errors import CompileError, CompilerKilled, MissingInstance, StoreFull, ToolchainNotFound
from jitkiln.families.demo import Demo
from jitkiln.family import CompileSpec, get_family
from jitkiln.plan import make_plan
from jitkiln.runtime import Module, load
from jitkiln.store import Store
from jitkiln.compilers.nvcc import Nvcc

DEMO = get_family("demo")
ONE = [{"m": 8, "n": 64, "k": 64}]  # one instance: the skinny tile


def build(store, problems=ONE, family=DEMO, variant="f32", jobs=2):
    plan = make_plan(family, variant, problems)
    return plan, Builder(store, jobs=jobs, progress=False).build(plan)


def test_build_then_warm_build_compiles_nothing(cache_dir, counting_nvcc, capsys):
    assert main(["build", "demo", "--json", "--no-progress"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(first["compiled"]) == 3 and first["cache_hits"] == []
    assert first["critical_path_s"] > 0 and first["wall_s"] > 0
    assert counting_nvcc() == 3
    assert main(["build", "demo", "--json", "--no-progress"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["compiled"] == [] and len(second["cache_hits"]) == 3
    assert counting_nvcc() == 3
    rec = json.loads(Path(first["record"]).read_text())
    u = rec["units"][0]
    assert u["peak_rss"] > 10 << 20 and "cicc" in u["phases"] and "ptxas" in u["phases"]
    ninja = Path(rec["ninja_log"]).read_text().splitlines()
    assert ninja[0] == "# ninja log v5" and len(ninja) == 4
    start, end, _, out, _ = ninja[1].split("\t")
    assert int(end) > int(start) and out.endswith(".so")


def test_report_and_timeline(cache_dir, tmp_path, capsys):
    assert main(["build", "demo", "--no-progress"]) == 0
    capsys.readouterr()
    html = tmp_path / "t.html"
    assert main(["report", "--timeline", str(html)]) == 0
    out = capsys.readouterr().out
    assert "critical path" in out and "slowest units" in out and "unused candidates (1)" in out
    assert "demo_gemm_f32_16x16x16_t1x1" in html.read_text()
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    assert main(["report", "--timeline", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eight_processes_compile_each_instance_once(cache_dir, counting_nvcc, tmp_path):
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", LOADER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert counting_nvcc() == 3  # three planned instances, each compiled exactly once
    assert all(o == outs[0] for o in outs)  # every process loaded byte-identical artifacts
    assert len(outs[0]) == 3


LOADER = """
import hashlib, json
from jitkiln.runtime import load
m = load("demo", policy="error")
assert m.ready
print(json.dumps({u.instance.name: hashlib.sha256(m.store.read_verified(m.builder.lookup(m.plan, u))).hexdigest()
                  for u in m.plan.units}))
"""


def test_flipped_byte_is_detected_and_rebuilt_never_loaded(cache_dir, counting_nvcc):
    store = Store()
    plan, rec = build(store)
    key = rec.units[0].key
    art = store.obj_dir(key) / "artifact"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x01
    art.write_bytes(bytes(data))
    mod = Module(plan, store, policy="error")
    assert mod.load_available() == 0  # refused, not loaded
    assert not store.obj_dir(key).exists() and any((store.root / "corrupt").iterdir())
    plan, rec2 = build(store)
    assert rec2.units[0].status == "compiled" and counting_nvcc() == 2
    assert rec2.units[0].key == key  # same inputs, same key, fresh verified entry
    assert Module(plan, store).load_available() == 1


def test_malformed_metadata_and_manifest_are_refused(cache_dir, counting_nvcc):
    store = Store()
    plan, rec = build(store)
    (store.obj_dir(rec.units[0].key) / "meta.json").write_text("{not json")
    assert Module(plan, store).load_available() == 0
    plan, rec = build(store)
    assert rec.units[0].status == "compiled"
    store.manifest_path(rec.units[0].ukey).write_text('{"oops": 1}')
    plan, rec = build(store)
    assert rec.units[0].status == "compiled" and counting_nvcc() == 3
    ok, bad = store.verify_all()
    assert ok >= 1 and bad == []


def test_key_covers_header_content_flags_and_compiler(cache_dir, tmp_path, counting_nvcc, monkeypatch):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "jk_scale.h").write_text("#define JK_SCALE 1\n")

    class WithHeader(Demo):
        name = "demo_hdr"
        flags = ("-DNDEBUG",)

        def render(self, instance):
            return '#include "jk_scale.h"\n' + super().render(instance)

        def compile_spec(self, variant, arch=None):
            return CompileSpec(arch=arch or "sm_90a", flags=self.flags, include_dirs=(str(inc),))

    fam = WithHeader()
    store = Store()
    _, r1 = build(store, family=fam)
    _, r2 = build(store, family=fam)
    assert r2.units[0].status == "hit"
    (inc / "jk_scale.h").write_text("#define JK_SCALE 2\n")
    _, r3 = build(store, family=fam)
    assert r3.units[0].status == "compiled" and r3.units[0].key != r1.units[0].key
    assert r3.units[0].ukey == r1.units[0].ukey  # same source and flags: only the header changed
    fam.flags = ("-DNDEBUG", "-DJK_EXTRA=1")
    _, r4 = build(store, family=fam)
    assert r4.units[0].ukey != r1.units[0].ukey and r4.units[0].status == "compiled"
    # another compiler binary (same version, different bytes) -> another fingerprint -> another key
    log2 = tmp_path / "other.log"
    other = make_wrapper(tmp_path / "nvcc2", log2, before="# a different build of the compiler")
    monkeypatch.setenv("JITKILN_NVCC", str(other))
    fam.flags = ("-DNDEBUG",)
    p5 = make_plan(fam, "f32", ONE)
    assert p5.units[0].ukey != r3.units[0].ukey
    # the header change is visible to the plan too, once recorded: back to the first header -> first key
    (inc / "jk_scale.h").write_text("#define JK_SCALE 1\n")
    monkeypatch.setenv("JITKILN_NVCC", str(counting_nvcc.wrapper))
    _, r6 = build(store, family=fam)
    assert r6.units[0].status == "hit" and r6.units[0].key == r1.units[0].key


class Broken(Demo):
    name = "demo_broken"

    def render(self, instance):
        return super().render(instance).replace("acc[i][j] += a[i] * b[j];", "acc[i][j] += a[i] * b[j] +;")


def test_compile_error_names_unit_first_errors_and_log(cache_dir, capsys):
    store = Store()
    with pytest.raises(CompileError) as ei:
        build(store, family=Broken())
    e = ei.value
    assert e.unit.endswith(".cu") and "error" in e.details.lower() and os.path.exists(e.log)
    assert "nvcc failed" in e.reason
    assert list(store.entries()) == []
    rec = json.loads((store.root / "builds" / Path((store.root / "builds" / "last").read_text()).name).read_text())
    assert rec["failed"] == [rec["units"][0]["name"]]


def test_compiler_killed_says_out_of_memory_and_leaves_nothing(cache_dir, tmp_path, monkeypatch):
    w = make_wrapper(tmp_path / "nvcc", tmp_path / "log", before='[ "$1" != "--version" ] && kill -9 $$')
    monkeypatch.setenv("JITKILN_NVCC", str(w))
    store = Store()
    with pytest.raises(CompilerKilled) as ei:
        build(store, jobs=1)
    assert "likely out of memory" in ei.value.reason and "fewer parallel jobs" in ei.value.hint
    assert list(store.entries()) == []


def test_no_compiler_says_how_to_get_one(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("JITKILN_NVCC", "/nonexistent/nvcc")
    with pytest.raises(ToolchainNotFound):
        Nvcc.find()
    monkeypatch.delenv("JITKILN_NVCC")
    monkeypatch.setattr(Nvcc, "candidates", staticmethod(lambda: [("PATH", "/nonexistent/bin/nvcc")]))
    rc = main(["build", "demo", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("jitkiln: error: no CUDA compiler (nvcc) found")
    assert "pip install nvidia-cuda-nvcc" in err


def test_disk_full_while_publishing_leaves_the_cache_valid(cache_dir, monkeypatch, counting_nvcc):
    store = Store()
    build(store, problems=[{"m": 1024, "n": 1024, "k": 64}])  # one good entry already there
    import jitkiln.store as st
    real_write = os.write
    calls = {"n": 0}

    def full_write(fd, data):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[: len(data) // 2])  # a short write first, then the disk is full

    monkeypatch.setattr(st.os, "write", full_write)
    with pytest.raises(StoreFull) as ei:
        build(store)
    monkeypatch.setattr(st.os, "write", real_write)
    assert "disk full" in ei.value.reason and "gc" in ei.value.hint
    assert len(list(store.entries())) == 1  # nothing partial published
    assert list((store.root / "tmp").iterdir()) == []
    ok, bad = store.verify_all()
    assert ok == 1 and bad == []
    _, rec = build(store)  # space is back: builds and publishes
    assert rec.units[0].status == "compiled"


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, monkeypatch, capsys):
    f = tmp_path / "afile"
    f.write_text("")
    monkeypatch.setenv("JITKILN_CACHE_DIR", str(f / "cache"))
    rc = main(["build", "demo", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "is not writable" in err.splitlines()[0] and "JITKILN_CACHE_DIR" in err


def test_killed_build_leaves_no_blocking_lock_and_nothing_loadable(cache_dir, tmp_path, monkeypatch):
    marker = tmp_path / "started"
    slow = make_wrapper(tmp_path / "slownvcc", tmp_path / "slow.log",
                        before=f'[ "$1" != "--version" ] && touch {marker} && sleep 30')
    env = dict(os.environ, JITKILN_NVCC=str(slow))
    p = subprocess.Popen([sys.executable, "-m", "jitkiln.cli", "build", "demo", "--shape", "m=8,n=64,k=64",
                          "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not marker.exists():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)  # mid-compile, holding the unit's lock
    p.wait()
    store = Store()
    assert list(store.entries()) == []
    t0 = time.time()
    plan, rec = build(store)  # real nvcc now: must not wait for the dead holder
    assert time.time() - t0 < 25
    assert rec.units[0].status == "compiled"
    assert Module(plan, store).load_available() == 1
    assert store.verify_all() == (1, [])


def test_policies(cache_dir, counting_nvcc):
    store = Store()
    plan = make_plan(DEMO, "f32", ONE)
    Builder(store, progress=False).build(plan)
    mod = Module(plan, store, policy="error")
    mod.load_available()
    assert set(mod.dispatch({"m": 8, "n": 10, "k": 3})) == {"gemm"}
    with pytest.raises(MissingInstance) as ei:
        mod.dispatch({"m": 2048, "n": 2048, "k": 64})
    msg = ei.value.full()
    assert "demo_gemm_f32_64x64x8_t4x4 is not loaded" in msg
    assert "chosen only when m > 16 and min(m, n) >= 512" in msg and "m = 8 for every shape" in msg
    assert "jitkiln build demo --variant f32 --shape m=2048,n=2048,k=64" in msg
    n0 = counting_nvcc()
    mod_c = Module(plan, store, policy="compile")
    mod_c.load_available()
    fns = mod_c.dispatch({"m": 2048, "n": 2048, "k": 64})
    assert fns["gemm"] is not None and counting_nvcc() == n0 + 1
    # background: the rest of a bigger plan builds behind; the needed one blocks alone
    plan3 = make_plan(DEMO, "f32", DEMO.default_problems("f32") + [{"m": 100, "n": 100, "k": 8}])
    mod_b = Module(plan3, store, policy="background")
    mod_b.load_available()
    assert not mod_b.ready
    mod_b.dispatch({"m": 100, "n": 100, "k": 8})
    assert mod_b.wait(timeout=300) and mod_b.ready


def test_load_warm_is_fast_enough_to_notice(cache_dir):
    load("demo")  # cold: builds
    t0 = time.perf_counter()
    m = load("demo")
    assert m.ready
    # the 0.5 s target is measured by bench/warm_load.py; this only guards against an accidental rebuild
    assert time.perf_counter() - t0 < 30


def test_cache_cli_ls_verify_gc(cache_dir, capsys):
    build(Store())
    assert main(["cache", "ls"]) == 0 and "demo_gemm_f32_8x64x16_t1x2" in capsys.readouterr().out
    assert main(["cache", "verify"]) == 0 and "1 entries verified, 0 bad" in capsys.readouterr().out
    assert main(["cache", "gc"]) == 2
    capsys.readouterr()
    assert main(["cache", "gc", "--max-age", "1d"]) == 0 and "removed 0 entries" in capsys.readouterr().out
    assert main(["cache", "gc", "--max-size", "1K"]) == 0 and "removed 1 entries" in capsys.readouterr().out
    assert list(Store().entries()) == []


def test_doctor(cache_dir, capsys):
    assert main(["doctor", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["nvcc"]["version"] and d["cache"]["path"] == str(cache_dir) and "demo" in d["families"]


def test_header_digest_memo_sees_a_change_that_keeps_size_and_mtime(cache_dir, tmp_path):
    from jitkiln import digests
    from jitkiln.compilers.base import file_digest
    h = tmp_path / "h.h"
    h.write_text("#define A 1\n")
    st = os.stat(h)
    d1 = digests.digest(str(h))
    digests.flush()
    assert (cache_dir / "v1" / "header-digests.json").exists()
    h.write_text("#define A 2\n")  # same size
    os.utime(h, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: only ctime tells
    digests._memo.clear()  # as a new process: the memo comes from disk
    d2 = digests.digest(str(h))
    assert d2 != d1 and d2 == file_digest(h)


def test_fingerprint_sees_through_wrapper_scripts(tmp_path, monkeypatch):
    """nvcc is often a wrapper script (``exec /usr/local/cuda-X/bin/nvcc "$@"``; the tests' counting wrapper is
    one too): the fingerprint must still cover the toolkit's cicc, ptxas, cudafe++, fatbinary and nvlink."""
    from conftest import REAL_NVCC, make_wrapper
    from jitkiln.compilers.nvcc import Nvcc
    w = make_wrapper(tmp_path / "nvcc", tmp_path / "calls.log", real=REAL_NVCC)
    w2 = make_wrapper(tmp_path / "nvcc-outer", tmp_path / "calls2.log", real=str(w))  # a wrapper of a wrapper
    monkeypatch.setenv("JITKILN_NVCC", str(w2))
    tc = Nvcc.find()
    names = [os.path.basename(b) for b in tc.binaries()]
    for tool in ("cicc", "ptxas", "cudafe++", "fatbinary", "nvlink"):
        assert tool in names, names
    assert os.path.isfile(os.path.join(tc.root, "bin", "nvcc")) and os.path.realpath(w2) != tc.root
