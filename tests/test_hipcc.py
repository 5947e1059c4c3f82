"""The HIP compiler adapter (jitkiln.compilers.hipcc): discovery and its error, content fingerprint, arch
refusal, the ROCm chroot install check, and a real compile of the cheapest CK two-stage MoE instance where a
HIP compiler is found (a native ROCm, or the chroot from `jitkiln toolchain install rocm /opt/jitkiln-rocm`)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from jitkiln.compilers import hipcc as hipmod
from jitkiln.compilers import rocm_install
from jitkiln.compilers.base import CompileJob
from jitkiln.compilers.hipcc import Hipcc
from jitkiln.errors import ToolchainNotFound, UsageError

# the cheapest real CK instance measured on the 2-core machine: device half 61.5 CPU-s (a16w16 gemm2 32x64x64: 68,
# a8w8 gemm2 32x64x128: 74), host half ~52 CPU-s (AITER's header pulls in torch/extension.h), peak 1.4 GB
CHEAP = ("a16w16", "gfx942",
         "moe_ck2stages_gemm1_256x32x64x64_1x4_TypeCast_v1_Nswizzle0_Quant0_MulRoutedWeight0_silu_B16_B16_B16")


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_rocm(root: Path) -> Path:
    """A fake native ROCm tree: hipcc and clang answer --version / --print-supported-cpus."""
    hipcc = _exe(root / "bin" / "hipcc", textwrap.dedent("""\
        #!/bin/sh
        echo "HIP version: 7.0.51831-abcdef"
        echo "AMD clang version 20.0.0git"
        """))
    _exe(root / "llvm" / "bin" / "clang", textwrap.dedent("""\
        #!/bin/sh
        echo "Available CPUs for this target:" >&2
        for c in gfx90a gfx942 gfx950 gfx1100; do echo "	$c" >&2; done
        """))
    _exe(root / "llvm" / "bin" / "ld.lld", "#!/bin/sh\n")
    _exe(root / "llvm" / "bin" / "clang-offload-bundler", "#!/bin/sh\n")
    bc = root / "amdgcn" / "bitcode"
    bc.mkdir(parents=True)
    (bc / "ocml.bc").write_bytes(b"BC\xc0\xde" + b"\0" * 64)
    (bc / "oclc_isa_version_942.bc").write_bytes(b"BC\xc0\xde" + b"\1" * 64)
    return hipcc


@pytest.fixture
def no_rocm(tmp_path, monkeypatch):
    for var in ("JITKILN_HIPCC", "ROCM_PATH", "ROCM_HOME", "JITKILN_HIP_FLAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Hipcc, "native_candidates", staticmethod(lambda: [("PATH", str(tmp_path / "no" / "hipcc"))]))
    monkeypatch.setenv("JITKILN_ROCM_CHROOT", str(tmp_path / "no-chroot"))
    monkeypatch.setenv("JITKILN_CACHE_DIR", str(tmp_path / "cache"))


def test_not_found_names_the_install_command(no_rocm, tmp_path):
    with pytest.raises(ToolchainNotFound) as ei:
        Hipcc.find()
    e = ei.value
    assert "no HIP compiler" in str(e) and "\n" not in str(e)
    assert "jitkiln toolchain install rocm /opt/jitkiln-rocm" in e.hint
    assert str(tmp_path / "no-chroot") in e.details and "absent" in e.details


def test_incomplete_chroot_is_not_used(no_rocm, tmp_path, monkeypatch):
    root = tmp_path / "partial"
    (root / "usr" / "bin").mkdir(parents=True)
    _exe(root / "usr" / "bin" / "hipcc", "#!/bin/sh\n")
    (root / rocm_install.PARTIAL).write_text("started\n")
    monkeypatch.setenv("JITKILN_ROCM_CHROOT", str(root))
    assert not rocm_install.is_complete(root)
    with pytest.raises(ToolchainNotFound) as ei:
        Hipcc.find()
    assert "incomplete" in ei.value.details


def test_bad_jitkiln_hipcc(no_rocm, tmp_path, monkeypatch):
    monkeypatch.setenv("JITKILN_HIPCC", str(tmp_path / "missing-hipcc"))
    with pytest.raises(ToolchainNotFound, match="JITKILN_HIPCC"):
        Hipcc.find()


def test_fingerprint_follows_content(no_rocm, tmp_path, monkeypatch):
    hipcc = fake_rocm(tmp_path / "rocm")
    monkeypatch.setenv("JITKILN_HIPCC", str(hipcc))
    c = Hipcc.find()
    assert c.version == "7.0.51831+clang20.0.0"
    names = {os.path.basename(b) for b in c.binaries()}
    assert {"hipcc", "clang", "ld.lld", "clang-offload-bundler", "ocml.bc", "oclc_isa_version_942.bc"} <= names
    fp0 = c.fingerprint
    assert fp0.startswith("hip-7.0.51831+clang20.0.0-") and len(fp0.rsplit("-", 1)[1]) == 16
    assert Hipcc.find().fingerprint == fp0  # stable (and remembered across processes under a strict stamp)

    # same size, same mtime, different bytes: a device library
    bc = tmp_path / "rocm" / "amdgcn" / "bitcode" / "ocml.bc"
    st = bc.stat()
    bc.write_bytes(b"BC\xc0\xde" + b"\2" * 64)
    os.utime(bc, ns=(st.st_atime_ns, st.st_mtime_ns))
    fp1 = Hipcc.find().fingerprint
    assert fp1 != fp0

    # the offload bundler's content
    _exe(tmp_path / "rocm" / "llvm" / "bin" / "clang-offload-bundler", "#!/bin/sh\n# patched\n")
    fp2 = Hipcc.find().fingerprint
    assert fp2 not in (fp0, fp1)
    assert Hipcc.find().describe()["fingerprint"] == fp2


def test_arch_refused_with_the_list(no_rocm, tmp_path, monkeypatch):
    monkeypatch.setenv("JITKILN_HIPCC", str(fake_rocm(tmp_path / "rocm")))
    c = Hipcc.find()
    assert c.offload_arch("gfx942") == ["--offload-arch=gfx942"]
    assert c.offload_arch("gfx90a:xnack+") == ["--offload-arch=gfx90a:xnack+"]
    for bad in ("gfx1100", "sm_90a", "gfx999"):
        with pytest.raises(UsageError) as ei:
            c.offload_arch(bad)
        known = str(ei.value).split("it knows:")[1]
        assert repr(bad) in str(ei.value) and "gfx942" in known and "gfx950" in known and "gfx1100" not in known


def test_chroot_path_mapping(tmp_path):
    r = hipmod.ChrootRunner(str(tmp_path), "bwrap")
    root = str(tmp_path.resolve())
    assert r.inside("/tmp/jitkiln-build/u.cu") == "/tmp/jitkiln-build/u.cu"
    assert r.inside("/usr/include/python3.11") == "/run/jitkiln-host/usr/include/python3.11"
    assert r.host("/run/jitkiln-host/usr/include/python3.11/Python.h") == "/usr/include/python3.11/Python.h"
    assert r.host("/usr/include/hip/hip_runtime.h") == root + "/usr/include/hip/hip_runtime.h"
    assert r.host("/work/x/../y.h") == "/work/y.h"
    (tmp_path / "usr" / "lib" / "x").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "x" / "real").write_text("")
    os.symlink("/usr/lib/x/real", tmp_path / "usr" / "lib" / "abs")
    assert r.host_file("/usr/lib/abs") == root + "/usr/lib/x/real"  # an absolute link stays in the chroot


def test_install_refuses_a_foreign_folder(tmp_path, monkeypatch):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "data.txt").write_text("not ROCm")
    if os.geteuid() != 0:
        with pytest.raises(ToolchainNotFound, match="root"):
            rocm_install.install(d, log=lambda s: None)
    else:
        with pytest.raises(ToolchainNotFound, match="not a jitkiln ROCm install"):
            rocm_install.install(d, log=lambda s: None)
    assert (d / "data.txt").exists()


def _real_compiler() -> Hipcc:
    try:
        return Hipcc.find()
    except ToolchainNotFound as e:
        pytest.skip(f"no HIP compiler here ({e}); install one with `{hipmod.INSTALL_HINT}`")


TINY = """#include <hip/hip_runtime.h>
__device__ int counter;
static __device__ float table[4] = {1, 2, 3, 4};
__global__ void k(float* x) { x[threadIdx.x] = table[threadIdx.x & 3] + counter; }
extern "C" __attribute__((visibility("default"))) int jk_launch_0123456789abcdef(void* s, float* x) {
  hipLaunchKernelGGL(k, dim3(1), dim3(64), 0, (hipStream_t)s, x); return (int)hipGetLastError(); }
"""


def _compile_tiny(c: Hipcc, work: Path, arch: str = "gfx942"):
    from jitkiln.family import CompileSpec
    work.mkdir(parents=True)
    (work / "unit.cu").write_text(TINY)
    spec = CompileSpec(toolchain="hip", arch=arch, flags=("-O3", "-std=c++20"), include_dirs=())
    return c.compile(CompileJob(source_path=str(work / "unit.cu"), out_path=str(work / "unit.so"), spec=spec,
                                workdir=str(work), log_path=str(work / "log.txt"), timeout=600))


def test_real_compile_tiny_unit_is_reproducible_and_split_gives_the_same_bytes(tmp_path, monkeypatch):
    """Two work folders, one-shot: the same .so bytes (explicit -cuid); split mode (device and host halves side
    by side, then link): the same bytes again; deps are host paths; the code object is for the arch."""
    c = _real_compiler()
    monkeypatch.delenv("JITKILN_HIP_FLAGS", raising=False)
    monkeypatch.setenv("JITKILN_HIP_MODE", "one-shot")
    a = _compile_tiny(c, tmp_path / "a")
    _compile_tiny(c, tmp_path / "b")
    monkeypatch.setenv("JITKILN_HIP_MODE", "split")
    s = _compile_tiny(c, tmp_path / "s")
    assert (a.mode, s.mode) == ("one-shot", "split") and set(s.phases) >= {"device half", "host half", "link"}
    so = (tmp_path / "a" / "unit.so").read_bytes()
    assert so == (tmp_path / "b" / "unit.so").read_bytes() == (tmp_path / "s" / "unit.so").read_bytes()
    assert b"hipv4-amdgcn-amd-amdhsa--gfx942" in so
    for r in (a, s):
        assert all(os.path.isabs(d) and os.path.exists(d) for d in r.deps)
        assert any(d.endswith("/hip/hip_runtime.h") for d in r.deps)
    with pytest.raises(UsageError):
        _compile_tiny(c, tmp_path / "bad", arch="gfx1100")


@pytest.mark.slow
def test_real_compile_of_the_cheapest_ck_instance_through_the_engine(tmp_path, monkeypatch):
    """The cheapest real CK instance, planned, compiled by the real HIP compiler through jitkiln's builder and
    store (the path `jitkiln build ck2stages` takes), then checked: an ELF .so holding this arch's code object,
    keyed by every header hipcc read, exporting the launcher; a second build is a cache hit."""
    pytest.importorskip("aiter_meta", reason="amd-aiter is not installed (pip install 'jitkiln[aiter]')")
    pytest.importorskip("torch", reason="AITER's units include torch/extension.h: torch's headers are needed")
    c = _real_compiler()
    from jitkiln.build import Builder
    from jitkiln.families.ck2stages.family import CK2Stages
    from jitkiln.plan import make_plan
    from jitkiln.store import Store
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    variant, arch, kernel = CHEAP
    fam = CK2Stages(arch=arch)
    inst = next(i for i in fam.candidates(variant) if i.kernel == kernel)
    plan = make_plan(fam, variant, [], arch=arch, full=True)
    assert plan.compiler is not None and plan.compiler.fingerprint == c.fingerprint
    unit = plan.unit_for(inst)
    store = Store(tmp_path / "cache")
    rec = Builder(store, jobs=2, progress=False).build(plan, [unit])
    r = rec.units[0]
    assert r.status == "compiled" and r.peak_rss > 100 << 20 and r.cpu_s > 1, r
    entry = store.get(r.key)
    data = store.read_verified(entry)
    assert data[:4] == b"\x7fELF"
    assert b"hipv4-amdgcn-amd-amdhsa--" + arch.encode() in data  # the offload bundle holds this arch's code object
    deps = next(m["deps"] for m in store.read_manifest(unit.ukey) if m["key"] == r.key)
    assert any(lbl.endswith("gemm_moe_ck2stages.h") for lbl in deps)  # AITER's header, by content
    assert any(lbl.startswith("tc/") and lbl.endswith("hip/hip_runtime.h") for lbl in deps)  # the toolchain's own
    assert not any(lbl.startswith("/tmp") for lbl in deps), [lbl for lbl in deps if lbl.startswith("/tmp")]
    so = tmp_path / "unit.so"
    so.write_bytes(data)
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-D", "--defined-only", str(so)], check=False, capture_output=True,
                              text=True).stdout
        assert inst.symbol in syms and f"jk_name_{inst.digest[:16]}" in syms
    again = Builder(store, jobs=2, progress=False).build(plan, [unit])
    assert again.units[0].status == "hit" and again.units[0].key == r.key
