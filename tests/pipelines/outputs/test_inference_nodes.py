"""Batch inference on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: three raylets of one CPU each on
this machine): the read + decode tasks (with the model in them, or beside the model actors) are spread over
more than one node, and the output is complete."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.outputs.assignments import read_assignments
from pipelines.outputs.inference import InferenceOptions, run_inference
from pipelines.storage import Storage
from tests.pipelines.run_builders import add_checkpoint, make_dataset

N = 120


@pytest.fixture
def three_nodes() -> Iterator[None]:
    """A head and two worker nodes of 1 CPU each, with the dashboard (the state API lists the tasks)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("model_in", ["tasks", "actors"])
def test_inference_runs_on_more_than_one_node(tmp_path: Path, three_nodes: None, model_in: str) -> None:
    from ray.util.state import list_tasks

    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", N, shard_size=20)  # 6 shards: more than the cluster's 3 CPUs
    add_checkpoint(storage, "multi", "tiny", 1)
    options = InferenceOptions(batch_size=16, model_in=model_in)  # actors: 1 of 1 CPU, beside reads on two nodes

    result = run_inference(storage, "multi", options=options)

    assert result.rows == N
    assert sorted(read_assignments(storage, "multi").column("sample_index").to_pylist()) == list(range(N))
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    for task in list_tasks(detail=True, limit=10_000, raise_on_missing_output=False):
        if task.node_id:
            nodes[task.name].add(task.node_id)
    reads = {node for name, ids in nodes.items() if name.startswith("ReadShard") for node in ids}
    assert len(reads) >= 2, f"read + decode tasks ran on {len(reads)} node(s): {dict(nodes)}"
    actor_stage = any(name.startswith("MapWorker(MapBatches(Assigner))") for name in nodes)
    assert result.marker["model_in"] == model_in
    assert actor_stage == (model_in == "actors"), dict(nodes)  # tasks: the model ran inside the read tasks
