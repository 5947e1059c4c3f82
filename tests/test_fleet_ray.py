"""--executor ray on a real local Ray cluster (head on loopback, two worker processes)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from jitkiln.errors import UsageError
from jitkiln.build import LocalCompile
from jitkiln.fleet.ray import RayCompile
from jitkiln.store import Store
from test_fleet_util import artifact_digests, build, demo_plan, isolate_fleet, needs_nvcc

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'jitkiln[ray]')")
pytestmark = needs_nvcc


def test_no_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ex = RayCompile()
    if ray.is_initialized():
        pytest.skip("a Ray session is already connected in this process")
    with pytest.raises(UsageError, match="no Ray cluster address"):
        ex._remote()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as mp:
        # set before ray.init: the workers inherit the environment (same compiler wrapper, same fingerprint)
        nv = isolate_fleet(mp, tmp)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        try:
            yield {"nvcc": nv, "tmp": tmp}
        finally:
            ray.shutdown()


def test_ray_build_equals_local_build_byte_for_byte(cluster, tmp_path):
    plan = demo_plan()
    ray_store, local_store = Store(tmp_path / "ray"), Store(tmp_path / "local")
    rec = build(ray_store, plan, executor=RayCompile())
    assert rec.executor == "ray" and len(rec.compiled) == 3
    hosts = {ray_store.get(u.key).meta["executor"] for u in rec.units}
    assert hosts == {"ray"}
    build(local_store, plan, executor=LocalCompile())
    a, b = artifact_digests(ray_store), artifact_digests(local_store)
    assert a == b and len(a) == 3, "same keys and the same bytes from a Ray worker as from a local compile"
    # the Ray-built entries are found by an ordinary lookup (keys from portable header labels)
    assert len(build(ray_store, plan).hits) == 3


def test_killing_a_worker_mid_build_still_completes(cluster, tmp_path):
    nv = cluster["nvcc"]
    plan = demo_plan("f64")
    store = Store(tmp_path / "cache")
    victim = nv.dir / "victim"
    victim.unlink(missing_ok=True)
    (nv.dir / "hold").write_text("3")
    killed = []

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not victim.exists():
            time.sleep(0.05)
        if victim.exists():
            pid = int(victim.read_text())
            os.kill(pid, signal.SIGKILL)  # the Ray worker running the task (the wrapper's parent)
            killed.append(pid)

    t = threading.Thread(target=killer)
    t.start()
    before = nv.calls
    rec = build(store, plan, executor=RayCompile())
    t.join()
    assert killed, "a worker was killed mid-compile"
    assert [u.status for u in rec.units] == ["compiled"] * 3
    assert nv.calls >= before + 4, "the killed unit was compiled again (a Ray retry)"
    assert store.verify_all() == (3, [])
    assert len(build(store, plan).hits) == 3
    assert not list((store.root / "tmp").iterdir()), "no partial entry is left behind"
    # the retried unit's bytes are the reproducible ones: compare with a local reproducible build
    local = Store(tmp_path / "local")
    build(local, plan, executor=LocalCompile())
    assert artifact_digests(local) == artifact_digests(store)
