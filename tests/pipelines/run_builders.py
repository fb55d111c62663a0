"""Builders for inference/evaluation/report tests: a small real dataset, checkpoints, hand-made outputs.

Everything is written with the project's own code (ingest, save_checkpoint, publish), so tests read
what the real jobs would find on storage.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from pipelines.dataset.info import find_dataset_info
from pipelines.dataset.ingest import IngestOptions, ingest
from pipelines.dataset.sources import ArrayPart, ArraySource
from pipelines.dataset.synthetic import pattern_images
from pipelines.outputs.assignments import output_dir
from pipelines.outputs.image_sources import load_source_lookup
from pipelines.outputs.publish import new_attempt, publish, staging_dir
from pipelines.outputs.schema import (
    SCHEMA_VERSION,
    assignment_schema,
    cluster_column,
    confidence_column,
    similarity_column,
)
from pipelines.storage import Storage, join
from pipelines.training.checkpointing import TrainingState, save_checkpoint
from pipelines.training.coordinator_state import CoordinatorState, ShardState, label_dtype
from pipelines.training.job_config import ComputeConfig, TrainJobConfig
from secu.augment import EvalTransform, normalize
from secu.network import build_network
from secu.recipes import recipe
from secu.state import ClusterState

CLASS_NAMES = ["stripes-h", "stripes-v", "checker"]
RECIPE = "fashion-mnist-cpu"


def make_dataset(storage: Storage, name: str, n: int, shard_size: int, seed: int = 0) -> np.ndarray:
    """Ingest ``n`` pattern images as dataset ``name`` (with labels and class names); returns the images."""
    images, labels = pattern_images(n, seed)
    source = ArraySource("synthetic", [ArrayPart("train", images, labels)], label_names=list(CLASS_NAMES))
    ingest(storage, name, source, IngestOptions(shard_size=shard_size, use_ray=False),
           source_spec=f"synthetic:{name}", split="train")
    return images


def train_job(run_id: str, dataset: str) -> TrainJobConfig:
    """The job config stored in test checkpoints (the CPU recipe)."""
    return TrainJobConfig(experiment=recipe(RECIPE), compute=ComputeConfig(num_workers=1), dataset=dataset,
                          run_id=run_id)


def coordinator_state(num_samples: int, ks: Sequence[int], epoch: int) -> CoordinatorState:
    """A one-shard coordinator state after training epoch ``epoch``: id i has label i % K_h in head h,
    the counters are the cluster sizes, the duals 0."""
    prev_HN = np.stack([np.arange(num_samples) % k for k in ks]).astype(label_dtype(ks))
    shard = ShardState(lo=0, hi=num_samples, ks=tuple(ks), epoch=epoch + 1, prev_HN=prev_HN,
                       counters=[np.bincount(prev_HN[h], minlength=k) for h, k in enumerate(ks)],
                       duals=[np.zeros(k) for k in ks])
    return CoordinatorState(ranges=((0, num_samples),), ks=tuple(ks), shards=(shard,))


def write_checkpoint(directory: str, run_id: str, dataset: str, epoch: int, num_samples: int = 12,
                     centers_from: np.ndarray | None = None) -> None:
    """A checkpoint (fresh network, as the training loop lays it out, with a history, and the coordinator
    state of ``coordinator_state``) in ``directory``.

    A fresh network maps all images of a small set to one cluster; with ``centers_from`` (K_0 images) head 0's
    centers are those images' embeddings, so that head 0 spreads images over its clusters (image i of
    ``centers_from`` lands in cluster i).
    """
    job = train_job(run_id, dataset)
    exp = job.experiment
    network = build_network(exp)
    if centers_from is not None:
        transform = EvalTransform(exp.augment)
        x = normalize(torch.stack([transform(image) for image in centers_from]), exp.augment.mean, exp.augment.std)
        network.eval()  # as inference runs it
        with torch.no_grad():
            _, z_BD = network.assign(x)
            network.centers.weights[0].copy_(F.normalize(z_BD.T, dim=0))
    history = [{"epoch": e, "train/loss": 5.0 - e, "train/loss_center": 3.0 - 0.5 * e, "train/loss_repr": 2.0 - 0.4 * e,
                "clusters/h0/changed_frac": 0.5 / (e + 1), "clusters/h0/acc": 0.3 + 0.1 * e}
               for e in range(epoch + 1)]
    state = TrainingState(network={k: v.detach().clone() for k, v in network.state_dict().items()}, optimizer={},
                          cluster_state=ClusterState.create(exp.secu.ks), epoch=epoch, global_step=10 * (epoch + 1),
                          job=job.to_dict() | {"history": history})
    save_checkpoint(directory, state, coordinator_state(num_samples, exp.secu.ks, epoch))


def upload_dir(storage: Storage, local: str, rel: str) -> None:
    """Copy a local directory tree to ``rel`` under ``storage``."""
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            sub = os.path.relpath(path, local).replace(os.sep, "/")
            with open(path, "rb") as handle:
                storage.write_bytes_atomic(join(rel, sub), handle.read())


def add_checkpoint(storage: Storage, run_id: str, dataset: str, epoch: int, name: str | None = None,
                   centers_from: np.ndarray | None = None) -> str:
    """Write a checkpoint under ``runs/<run_id>/checkpoints/<name>`` (local or S3); returns its rel path."""
    rel = join("runs", run_id, "checkpoints", name or f"checkpoint_2026-01-01_00-00-{epoch:02d}.000000")
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, run_id, dataset, epoch, centers_from=centers_from)
        upload_dir(storage, tmp, rel)
    return rel


def publish_assignments(storage: Storage, run_id: str, dataset: str, sample_index: Sequence[int],
                        keys: Sequence[str], shards: Sequence[str], clusters: Sequence[Any],
                        ks: Sequence[int], confidence: Sequence[Any] | None = None,
                        name: str = "assignments", files: int = 2) -> None:
    """Publish hand-made assignments (``clusters[h][i]``) through the real staging + publish protocol; the
    ``source`` column comes from the dataset's manifest (``hand-made:<key>`` when there is no such dataset)."""
    n, heads = len(sample_index), len(ks)
    rng = np.random.default_rng(1)
    ids = np.asarray(sample_index, dtype=np.int64)
    sources = (load_source_lookup(storage, dataset).take(ids) if find_dataset_info(storage, dataset) is not None
               else pa.array([f"hand-made:{k}" for k in keys], pa.string()))
    cols: dict[str, pa.Array] = {"sample_index": pa.array(ids), "key": pa.array(list(keys), pa.string()),
                                 "shard": pa.array(list(shards), pa.string()), "source": sources}
    for h in range(heads):
        conf = np.asarray(confidence[h] if confidence is not None else rng.uniform(0.2, 1.0, n), dtype=np.float32)
        cols[cluster_column(h)] = pa.array(np.asarray(clusters[h], dtype=np.int32))
        cols[similarity_column(h)] = pa.array((conf * 0.9).astype(np.float32))
        cols[confidence_column(h)] = pa.array(conf)
    cols["run_id"] = pa.array([run_id] * n, pa.string())
    cols["checkpoint"] = pa.array(["hand-made"] * n, pa.string())
    cols["checkpoint_epoch"] = pa.array(np.full(n, 7, dtype=np.int32))
    schema = assignment_schema(heads)
    table = pa.Table.from_arrays([cols[c] for c in schema.names], schema=schema)
    out_rel = output_dir(run_id, name)
    staging = staging_dir(out_rel, new_attempt())
    bounds = np.linspace(0, n, files + 1).astype(int)
    for i in range(files):
        buf = io.BytesIO()
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), buf)
        storage.write_bytes_atomic(join(staging, f"x_{i:06d}.parquet"), buf.getvalue())
    publish(storage, out_rel, staging, {
        "run_id": run_id, "name": name, "schema_version": SCHEMA_VERSION, "dataset": dataset,
        "train_dataset": dataset, "checkpoint": "hand-made", "checkpoint_epoch": 7, "num_heads": heads,
        "ks": list(ks), "embedding_dim": None})
