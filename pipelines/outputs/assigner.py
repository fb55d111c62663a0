"""The model stage of batch inference: an ``Assigner`` holds the checkpoint's method and turns batches of
evaluation images into assignment rows (``pipelines.outputs.schema``). ``pipelines.outputs.inference`` runs it
either as a pool of Ray Data actors (GPUs) or, through :func:`assign_rows`, inside the read tasks (CPUs), where
each worker process loads the model once and keeps it for the tasks that follow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.outputs.image_sources import SourceLookup
from pipelines.outputs.schema import (
    EMBEDDING_COLUMN,
    SOURCE_COLUMN,
    assignment_schema,
    cluster_column,
    confidence_column,
    similarity_column,
)
from pipelines.training.checkpointing import CheckpointRef, load_checkpoint
from secu.config import ExperimentConfig
from secu.method import ClusteringMethod
from secu.normalize import normalize
from secu.precision import autocast_dtype


class Assigner:
    """Ray Data callable class: uint8 image batches in, assignment rows (an Arrow table) out.

    The model is loaded once per actor, from the checkpoint's location (downloaded when remote), so
    only a small picklable reference travels to the actors, not the weights. The ``source`` of each row
    comes from the batch's ``source`` column (the evaluation stream carries it from the shard's json), else
    from ``sources`` (a caller with batches of its own, e.g. the plain-loop benchmark).
    """

    def __init__(self, checkpoint: CheckpointRef, run_id: str, with_embeddings: bool = False,
                 use_gpu: bool = False, torch_threads: int = 1, sources: SourceLookup | None = None,
                 progress: Any = None) -> None:
        """Load the method of ``checkpoint`` onto this actor's device.

        Args:
            checkpoint: The checkpoint to load.
            run_id: Written into every row.
            with_embeddings: Also write the embedding column.
            use_gpu: Run the model on this actor's GPU.
            torch_threads: CPU threads of torch (without a GPU).
            sources: The dataset's ``SourceLookup``, for batches without a ``source`` column.
            progress: A ``pipelines.outputs.progress.ProgressCounter`` to add each batch's rows to, or None.
        """
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("an Assigner was given a GPU but torch sees none: check the CUDA install")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:
            torch.set_num_threads(max(1, torch_threads))
        loaded = load_checkpoint(checkpoint, device=self.device)
        exp = loaded.job.experiment
        self.method = loaded.method
        self.mean, self.std = exp.augment.mean, exp.augment.std
        self.num_heads = exp.secu.num_heads
        self.use_amp = use_gpu and exp.optim.mixed_precision
        self.amp_dtype = autocast_dtype(self.device)
        self.with_embeddings = with_embeddings
        dim = embedding_dim(self.method, exp) if with_embeddings else None
        self.schema = assignment_schema(self.num_heads, dim)
        self.run_id, self.checkpoint, self.epoch = run_id, checkpoint.label, checkpoint.epoch
        self.sources = sources
        self.progress = progress

    def _sources(self, batch: dict[str, np.ndarray]) -> pa.Array:
        if SOURCE_COLUMN in batch:
            return pa.array([str(s) for s in batch[SOURCE_COLUMN]], pa.string())
        if self.sources is None:
            raise ValueError("the Assigner was given neither a source lookup nor batches with a 'source' column")
        return self.sources.take(np.asarray(batch["sample_index"], dtype=np.int64))

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Cluster one batch with columns ``image`` (uint8 B x C x S x S), ``sample_index``, ``key``, ``shard``
        (and ``source``, optional)."""
        images = batch["image"]
        if len(images) == 0:  # every image of a slice was bad input (decode dropped and counted them)
            return self.schema.empty_table()
        if images.dtype == object:  # ragged column: the transform produced arrays one by one
            images = np.stack(list(images))
        # Ray hands out read-only arrays; torch wants writable memory.
        x = torch.from_numpy(np.require(images, dtype=np.uint8, requirements=["C", "W"]))
        x = normalize(x.to(self.device, non_blocking=True), self.mean, self.std)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            out = self.method.assign(x)  # the method's inference rule (SeCu: argmax z C_h, softmax at tw)
        n = x.shape[0]
        arrays: dict[str, pa.Array] = {
            "sample_index": pa.array(np.asarray(batch["sample_index"], dtype=np.int64)),
            "key": pa.array([str(k) for k in batch["key"]], pa.string()),
            "shard": pa.array([str(s) for s in batch["shard"]], pa.string()),
            SOURCE_COLUMN: self._sources(batch),
        }
        for h in range(self.num_heads):
            arrays[cluster_column(h)] = pa.array(out.clusters_HB[h].to(torch.int32).cpu().numpy())
            arrays[similarity_column(h)] = pa.array(out.similarity_HB[h].float().cpu().numpy())
            arrays[confidence_column(h)] = pa.array(out.confidence_HB[h].float().cpu().numpy())
        if self.with_embeddings:
            if out.embedding_BD is None:
                raise ValueError(f"method={self.method.name} gives no embedding: run inference without embeddings")
            z = out.embedding_BD.float().cpu().numpy().astype(np.float32, copy=False)
            arrays[EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])
        arrays["run_id"] = pa.array([self.run_id] * n, pa.string())
        arrays["checkpoint"] = pa.array([self.checkpoint] * n, pa.string())
        arrays["checkpoint_epoch"] = pa.array(np.full(n, self.epoch, dtype=np.int32))
        if self.progress is not None:
            self.progress.add.remote(n)  # fire and forget: the driver's progress line reads the sum
        return pa.Table.from_arrays([arrays[name] for name in self.schema.names], schema=self.schema)


_PROCESS_ASSIGNER: dict[str, Assigner] = {}
"""This worker process's Assigner for :func:`assign_rows`, under the key of its checkpoint and settings (one entry:
a process that moves on to another checkpoint drops the previous model)."""


def assign_rows(batch: dict[str, np.ndarray], *, checkpoint: CheckpointRef, fingerprint: str, run_id: str,
                with_embeddings: bool = False, progress: Any = None) -> pa.Table:
    """Stage ``assign_rows`` (the model in the read tasks, on one CPU thread): evaluation images -> assignment rows.

    The first call in a worker process loads the model of ``checkpoint``; later calls (the same task's next
    slices, the next tasks Ray gives the process) reuse it while ``fingerprint`` (a digest of the checkpoint's
    metadata, which records every file's SHA-256), ``run_id`` and ``with_embeddings`` stay the same.
    """
    key = f"{fingerprint}|{run_id}|{with_embeddings}"
    assigner = _PROCESS_ASSIGNER.get(key)
    if assigner is None:
        _PROCESS_ASSIGNER.clear()
        assigner = Assigner(checkpoint, run_id, with_embeddings=with_embeddings, torch_threads=1)
        _PROCESS_ASSIGNER[key] = assigner
    assigner.progress = progress
    return assigner(batch)


@torch.no_grad()
def embedding_dim(method: ClusteringMethod, exp: ExperimentConfig) -> int:
    """The width of the method's embedding (one blank image through ``assign``; methods embed differently)."""
    a = exp.augment
    out = method.assign(torch.zeros(1, a.channels, a.image_size, a.image_size))
    if out.embedding_BD is None:
        raise ValueError(f"method={exp.method} gives no embedding: run inference without embeddings")
    return int(out.embedding_BD.shape[1])
