"""The HIP adapter: a clear error without ROCm, its command line, phase parsing; a real compile where hipcc is."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from jitkiln.errors import ToolchainNotFound, UsageError
from jitkiln.family import CompileSpec
from jitkiln.toolchain_hip import Hip, parse_time_trace


def test_no_rocm_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Hip, "candidates", staticmethod(lambda: [("test", str(tmp_path / "bin" / "hipcc"))]))
    with pytest.raises(ToolchainNotFound) as ei:
        Hip.find()
    e = ei.value
    assert "hipcc" in str(e) and "ROCm" in e.hint and str(tmp_path) in e.details


def test_command_line(tmp_path):
    fake = tmp_path / "hipcc"
    fake.write_text("#!/bin/sh\necho 'HIP version: 6.4.1'\n")
    fake.chmod(0o755)
    hip = Hip(str(fake))
    spec = CompileSpec(toolchain="hip", arch="gfx950", flags=("-O3",), include_dirs=("/x/include",))
    cmd = hip.command("u.cu", "u.so", spec, "u.d", "trace")
    assert "--offload-arch=gfx950" in cmd and cmd[cmd.index("-MF") + 1] == "u.d" and "-MD" in cmd
    assert "-shared" in cmd and "-ftime-trace" in cmd and cmd[-2:] == ["-o", "u.so"]
    assert hip.version == "6.4.1" and hip.fingerprint.startswith("hip-6.4.1-")
    with pytest.raises(UsageError, match="gfxNNN"):
        hip.command("u.cu", "u.so", CompileSpec(toolchain="hip", arch="sm_90a"), "u.d", "")


def test_time_trace_phases(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": [
        {"name": "Total Frontend", "dur": 2_500_000}, {"name": "Total Backend", "dur": 1_000_000},
        {"name": "Total Frontend", "dur": 500_000}, {"name": "InstantiateFunction", "dur": 9}]}))
    assert parse_time_trace(p) == {"Frontend": 3.0, "Backend": 1.0}
    assert parse_time_trace(tmp_path / "missing.json") == {}


def test_real_compile_of_a_planned_unit(tmp_path):
    try:
        hip = Hip.find()
    except ToolchainNotFound as e:
        print(f"SKIP reason: {e.full()}")
        pytest.skip("no ROCm here: the compile of a ck2stages unit was not run")
    from jitkiln.families.ck2stages.family import CK2Stages
    from jitkiln.families.ck2stages.render import require_torch_headers
    require_torch_headers()
    fam = CK2Stages(arch=os.environ.get("JITKILN_ARCH", "gfx950"))
    inst = fam.select("a4w4", {"inter_dim": 1024, "block_m": 32})["stage2"]
    src = tmp_path / "u.cu"
    src.write_text(fam.render(inst))
    res = hip.compile(str(src), str(tmp_path / "u.so"), fam.compile_spec("a4w4"), str(tmp_path / "u.d"))
    assert any(d.endswith("gemm_moe_ck2stages_common_mxfp4.cuh") for d in res.deps)
    nm = shutil.which("nm")
    if nm:
        out = subprocess.run([nm, "-D", str(tmp_path / "u.so")], capture_output=True, text=True).stdout
        assert inst.symbol in out
