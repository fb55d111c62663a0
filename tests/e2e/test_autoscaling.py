"""Autoscaling, simulated: a training job that needs more CPUs than the head has gets new nodes and completes.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``, ``provider.type: fake_multinode``) starts extra
raylets on this machine when the autoscaler asks for nodes. ``ray.cluster_utils.AutoscalingCluster`` does
the same but cannot be used here: in the Ray 2.60 wheel its template
``ray/autoscaler/_private/fake_multi_node/example.yaml`` is missing (FileNotFoundError in its
constructor), and its ``start``/``shutdown`` run ``ray stop --force``, which would kill every Ray process
on the machine. The config below is that template's content with our node types, and the head is
managed by ``tests/e2e/ray_head.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.storage import Storage
from tests.e2e.ray_head import REPO, Head, start_head, stop_head
from tests.pipelines.run_builders import make_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HEAD_CPUS = 1


def fake_cluster_config() -> dict[str, object]:
    """Autoscaler config for the fake provider: a 1-CPU head, up to two 1-CPU worker nodes."""
    return {
        "cluster_name": "secu-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def alive_nodes(head: Head) -> int:
    probe = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address='{head.gcs_address}', log_to_driver=False); "
         "print(sum(1 for n in ray.nodes() if n['Alive']))"], env=head.env, capture_output=True, text=True,
        timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    return int(probe.stdout.strip().splitlines()[-1])


def test_training_that_needs_more_cpus_than_the_head_gets_nodes(tmp_path: Path) -> None:
    head = start_head(HEAD_CPUS, dashboard=False, autoscaling_config=fake_cluster_config())
    try:
        assert alive_nodes(head) == 1
        storage = Storage(str(tmp_path / "store"))
        make_dataset(storage, "patterns", 96, shard_size=48)
        train = subprocess.run(
            [sys.executable, "-m", "jobs.train", "--recipe", "fashion-mnist-cpu", "--dataset", "patterns",
             "--run-id", "scale", "--storage", storage.root, "--num-workers", "2",
             "--set", "compute.cpus_per_worker=1", "--set", "compute.torch_threads=1", "--set", "optim.warmup_epochs=1",
             "--set", "optim.epochs=1", "--set", "optim.batch_size=32", "--set", "model.cnn_width=8",
             "--set", "secu.ks=[3,6]"],
            env=head.env | {"RAY_ADDRESS": head.gcs_address, "PYTHONPATH": str(REPO)}, cwd=REPO,
            capture_output=True, text=True, timeout=540)
        log = train.stdout + train.stderr
        assert train.returncode == 0, log[-6000:]
        assert "it will wait for the autoscaler to add nodes" in log  # the head alone could not run it
        assert "finished after 1 epochs" in log
        assert alive_nodes(head) >= 2  # nodes were added (idle timeout 5 min: still there)
    finally:
        stop_head(head)
