"""Batch inference: cluster every image of a dataset with a trained checkpoint, write Parquet.

Pipeline (Ray Data, streaming)::

    lock runs/<run_id>/_infer-<name>.lock (a second inference of the same output is refused)
    shards (tar) --read + decode + evaluation transform (CPU tasks, pipelines.dataset.streams)--> uint8 C x S x S
      --> the model (pipelines.outputs.assigner), where ``model_in`` says:
          tasks (default on CPUs): in the same read tasks (one fused operator), each worker process loading the
              model once (``assign_rows``) and keeping it for its next tasks, one thread per task;
          actors (default with GPUs): map_batches with an ActorPoolStrategy of N Assigner actors, model loaded
              once per actor, one GPU each when there are GPUs;
          each row's source comes from the shard's json through the stream
      --> write_parquet into runs/<run_id>/_staging/<name>/<attempt>/ (outside the published prefix); a
          progress line (done/total, images/s, time left) every 10 s (pipelines.outputs.progress)
      --> verify (ids unique and in range; skipped bad images within the policy's budget)
      --> publish (pipelines.outputs.publish: a version folder, then one atomic switch)

Bad input follows ``pipelines.dataset.bad_input``: an image that cannot be used is skipped and counted (the
count, reasons and first examples go into ``_SUCCESS`` under ``skipped``); more than
``max_bad_fraction`` of the dataset fails the inference with a ``BadInputError`` that names the images
(sample_index, source, shard and key), the count and the option to change, and publishes nothing.

The rows follow ``pipelines.outputs.schema.assignment_schema``. Re-running replaces the published output; a
run killed at any point leaves the previous output (or none) published and is completed by running
it again (it starts over in a fresh staging folder).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from pipelines.dataset.info import DatasetInfo, load_dataset_info
from pipelines.outputs.assigner import Assigner, assign_rows, embedding_dim
from pipelines.outputs.assignments import default_output_name, output_dir, published_files, read_assignments
from pipelines.outputs.bad_images import too_much_bad_input
from pipelines.outputs.image_sources import load_source_lookup
from pipelines.outputs.progress import inference_progress
from pipelines.outputs.publish import (
    new_attempt,
    output_lock,
    publish,
    remove_stale_staging,
    staging_dir,
    verify_staged,
)
from pipelines.outputs.schema import (
    SCHEMA_VERSION,
)
from pipelines.storage import Storage
from pipelines.tracking.ray_metrics import export_inference
from pipelines.training.checkpointing import (
    META_FILE,
    CheckpointRef,
    LoadedCheckpoint,
    checkpoint_at,
    find_latest_checkpoint,
    load_checkpoint,
)
from secu.config import ExperimentConfig
from secu.method import ClusteringMethod

__all__ = ["InferenceOptions", "InferenceResult", "published_files", "read_assignments", "run_inference"]

logger = logging.getLogger(__name__)

USE_GPU_CHOICES = ("auto", "yes", "no")
MODEL_IN_CHOICES = ("auto", "tasks", "actors")


@dataclass
class InferenceOptions:
    """How the inference runs (``--set key=value`` on the command line)."""

    batch_size: int = 256
    """Images per model call in an Assigner actor (``model_in=actors``; the read tasks call it per 256 images)."""
    model_in: str = "auto"
    """Where the model runs: 'tasks' (inside the read + decode tasks, one model per worker process, one CPU
    thread each: no separate stage, no actor start), 'actors' (a pool of Assigner actors, the read tasks only
    read and decode) or 'auto' (actors when the inference uses GPUs or ``concurrency`` is set, else tasks)."""
    concurrency: int = 0
    """Assigner actors (``model_in=actors``); 0 = one per GPU with GPUs, else half the cluster's CPUs (at least 1)."""
    use_gpu: str = "auto"
    """'auto' (one GPU per actor when the cluster has GPUs), 'yes' or 'no'."""
    cpus_per_actor: float = 1.0
    """CPUs reserved by each Assigner actor (and torch threads it uses; ``model_in=actors``)."""
    with_embeddings: bool = False
    """Also write the L2-normalised embedding z (fixed_size_list<float32>[D]) per image."""
    min_rows_per_file: int = 100_000
    """Rows gathered into one Parquet file before it is written (fewer, larger files)."""
    max_bad_fraction: float = 0.01
    """Images that cannot be used (undecodable, too large, damaged shard) are skipped and counted
    (``_SUCCESS`` lists them); more than this fraction of the dataset fails the inference."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.concurrency < 0:
            raise ValueError(f"concurrency={self.concurrency} must be >= 0 (0 = automatic)")
        if self.use_gpu not in USE_GPU_CHOICES:
            raise ValueError(f"use_gpu={self.use_gpu!r}: choose one of {USE_GPU_CHOICES}")
        if self.model_in not in MODEL_IN_CHOICES:
            raise ValueError(f"model_in={self.model_in!r}: choose one of {MODEL_IN_CHOICES}")
        if self.model_in == "tasks" and self.use_gpu == "yes":
            raise ValueError("model_in=tasks runs the model on the read tasks' CPUs; with use_gpu=yes set "
                             "model_in=actors (or auto)")
        if self.model_in == "tasks" and self.concurrency:
            raise ValueError(f"concurrency={self.concurrency} sets the number of Assigner actors, but model_in=tasks "
                             "runs the model in the read tasks (one per CPU): drop concurrency or set model_in=actors")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor={self.cpus_per_actor} must be positive")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction} must lie in [0, 1]")
        if self.min_rows_per_file < 1:
            raise ValueError(f"min_rows_per_file={self.min_rows_per_file} must be >= 1")


@dataclass
class InferenceResult:
    """What one inference published."""

    run_id: str
    name: str
    uri: str
    """Where the output lives."""
    rows: int
    checkpoint: str
    checkpoint_epoch: int
    dataset: str
    seconds: float
    """Wall time of read + model + write (Ray execution), without publish."""
    images_per_s: float
    marker: dict[str, Any] = field(default_factory=dict)
    """The ``_SUCCESS`` content."""


def _resources(options: InferenceOptions) -> tuple[bool, int]:
    """(use GPUs, Assigner actors); 0 actors = the model runs in the read tasks (``model_in``)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = options.use_gpu == "yes" or (options.use_gpu == "auto" and gpus > 0)
    if options.use_gpu == "yes" and gpus == 0:
        logger.warning("use_gpu=yes but the cluster has no GPU now; the actors wait for the autoscaler")
    if options.model_in == "tasks" or (options.model_in == "auto" and not use_gpu and not options.concurrency):
        return False, 0
    cpus = float(resources.get("CPU", 1))
    if options.concurrency:
        concurrency = options.concurrency
    elif use_gpu:
        concurrency = max(1, gpus)
    else:
        concurrency = max(1, int(cpus / (2 * options.cpus_per_actor)))
    if concurrency * options.cpus_per_actor >= cpus:
        logger.warning(
            "%d model actors x %.1f CPUs reserve all %.0f CPUs of the cluster, leaving none for reading and "
            "decoding: the inference waits for the autoscaler to add CPUs (and never finishes on a fixed-size "
            "cluster). Lower concurrency or cpus_per_actor", concurrency, options.cpus_per_actor, cpus)
    else:
        node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        if node_cpus and not room_for_reads(node_cpus, concurrency, options.cpus_per_actor):
            logger.warning(
                "%d model actors x %.1f CPUs, spread over nodes of %s CPUs, leave no node a whole CPU for a read "
                "task: the inference waits for the autoscaler (and never finishes on a fixed-size cluster). Set "
                "cpus_per_actor to a whole node's CPUs, lower concurrency, or use model_in=tasks",
                concurrency, options.cpus_per_actor, "/".join(f"{c:g}" for c in sorted(set(node_cpus))))
    return use_gpu, concurrency


def room_for_reads(node_cpus: Sequence[float], actors: int, cpus_per_actor: float, read_cpus: float = 1.0) -> bool:
    """Whether a node keeps ``read_cpus`` free once ``actors`` model actors are spread over nodes of ``node_cpus``.

    Ray Data spreads an actor pool over the nodes, one actor per node in turn on the nodes that still have room;
    a read task needs a whole CPU on one node, so half-CPU actors on 1-CPU nodes leave the reads nowhere to run
    although the cluster's total has CPUs to spare."""
    free = list(node_cpus)
    placed = 0
    while placed < actors:
        progressed = False
        for i, cpus in enumerate(free):
            if placed < actors and cpus >= cpus_per_actor - 1e-9:
                free[i] = cpus - cpus_per_actor
                placed += 1
                progressed = True
        if not progressed:
            break
    return any(cpus >= read_cpus - 1e-9 for cpus in free)


def _checkpoint(storage: Storage, run_id: str, checkpoint: str | None) -> tuple[CheckpointRef, LoadedCheckpoint]:
    """The explicit ``checkpoint``, else the run's latest complete one, loaded (a warning when of another run)."""
    ref = checkpoint_at(checkpoint, storage) if checkpoint else find_latest_checkpoint(storage, run_id)
    loaded = load_checkpoint(ref)
    if ref.run_id and ref.run_id != run_id:
        logger.warning("checkpoint %s belongs to run %s; writing its assignments under run %s",
                       ref.label, ref.run_id, run_id)
    return ref, loaded


def _write_assignments(storage: Storage, dataset: str, exp: ExperimentConfig, stream: dict[str, Any],
                       staging_rel: str, ref: CheckpointRef, run_id: str, options: InferenceOptions, use_gpu: bool,
                       concurrency: int, progress: Any = None) -> None:
    """Cluster the evaluation stream of ``dataset`` (``build_eval_dataset`` with the keywords ``stream``) and
    write the rows under ``staging_rel``: inside the read tasks when ``concurrency`` is 0, else in that many
    Assigner actors."""
    import ray.data

    from pipelines.dataset.streams import build_eval_dataset

    if not concurrency:
        fingerprint = hashlib.sha256(ref.location.read_bytes(META_FILE)).hexdigest()
        ds = build_eval_dataset(storage, dataset, exp.augment, **stream, then=(assign_rows, {
            "checkpoint": ref, "fingerprint": fingerprint, "run_id": run_id,
            "with_embeddings": options.with_embeddings, "progress": progress}))
    else:
        ds = build_eval_dataset(storage, dataset, exp.augment, **stream).map_batches(
            Assigner,
            fn_constructor_kwargs={
                "checkpoint": ref, "run_id": run_id, "with_embeddings": options.with_embeddings,
                "use_gpu": use_gpu, "torch_threads": max(1, int(options.cpus_per_actor)),
                "progress": progress,
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),  # `concurrency=` is deprecated since Ray 2.51
            num_cpus=options.cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
            # Remote arguments unlike the stream's stages, so Ray does not fuse decode + transform into the
            # actors: they stay in the read tasks (on the other CPUs) and the actors only run the model.
            label_selector={},
        )
    # The write tasks gather min_rows_per_file rows each and take no CPU: they only encode rows of a few numbers;
    # remote arguments unlike the read tasks' keep Ray from fusing the model stage into them (fused, the write's
    # bundling pulls the whole stream into one task, decode and model included), and with no CPU Ray Data holds
    # no core back for them (at half a CPU it did, and ran one read task at a time on 2 CPUs).
    ds.write_parquet(storage.path(staging_rel), filesystem=storage.filesystem, ray_remote_args={"num_cpus": 0},
                     min_rows_per_file=options.min_rows_per_file, compression="zstd")


def _model_fields(ref: CheckpointRef, exp: ExperimentConfig, options: InferenceOptions,
                  method: ClusteringMethod) -> dict[str, Any]:
    """The ``_SUCCESS`` entries naming the checkpoint, the heads and the settings of the inference."""
    return {
        "checkpoint": ref.label,
        "checkpoint_epoch": ref.epoch,
        "checkpoint_global_step": ref.global_step,
        "num_heads": exp.secu.num_heads,
        "ks": list(exp.secu.ks),
        "tw": exp.secu.tw,
        "method": exp.method,
        "embedding_dim": embedding_dim(method, exp) if options.with_embeddings else None,
        "experiment": exp.to_dict(),
        "options": asdict(options),
    }


def run_inference(storage: Storage, run_id: str, *, dataset: str | None = None,
                  checkpoint: str | None = None, output_name: str | None = None,
                  options: InferenceOptions | None = None, shards: Sequence[str] | None = None) -> InferenceResult:
    """Assign every image of ``dataset`` (default: the run's training dataset) and publish the rows.

    Args:
        storage: The storage root holding ``datasets/`` and ``runs/``.
        run_id: The run; its latest complete checkpoint is used unless ``checkpoint`` is given.
        dataset: Dataset name under ``datasets/``; default the one the checkpoint was trained on.
        checkpoint: An explicit checkpoint directory (local or ``s3://``).
        output_name: Output directory under the run; default ``assignments`` for the training
            dataset and ``assignments-<dataset>`` for another one.
        options: Batch size, actors, GPU use, embeddings.
        shards: Only these shards of the dataset (e.g. the ones a reclustering tick added); all when None.
            The output then holds their rows only (``_SUCCESS`` lists them under ``shards``).

    Returns:
        What was published.
    """
    from pipelines.dataset.streams import selected_shards

    options = options or InferenceOptions()
    storage.check_reachable()
    ref, loaded = _checkpoint(storage, run_id, checkpoint)  # fails here, before any Ray work, when unreadable
    train_dataset = loaded.job.dataset
    dataset = dataset or train_dataset
    info = load_dataset_info(storage, dataset)
    chosen_shards = selected_shards(info, shards)  # ValueError on an unknown shard, before any Ray work
    chosen = [s.name for s in chosen_shards]
    expected = sum(s.count for s in chosen_shards)
    name = output_name or default_output_name(dataset, train_dataset)
    out_rel = output_dir(run_id, name)
    # Held until published: a second inference of this output is refused (LockHeldError) before any work.
    with output_lock(storage, out_rel, f"inference of run {run_id} into {name}"):
        return _infer_and_publish(storage, run_id, name, ref, loaded, info, expected, options,
                                  None if shards is None else chosen)


def _infer_and_publish(storage: Storage, run_id: str, name: str, ref: CheckpointRef, loaded: LoadedCheckpoint,
                       info: DatasetInfo, expected: int, options: InferenceOptions,
                       shards: list[str] | None) -> InferenceResult:
    """``run_inference`` after the checks, holding the output's lock: stage, verify, publish."""
    import ray

    from pipelines.dataset.bad_input import (
        BadInputError,
        BadInputPolicy,
        BadInputReport,
        new_bad_input_counter,
        verify_epoch,
    )

    exp, train_dataset, dataset = loaded.job.experiment, loaded.job.dataset, info.name
    out_rel = output_dir(run_id, name)
    attempt = new_attempt()
    remove_stale_staging(storage, out_rel)
    staging_rel = staging_dir(out_rel, attempt)
    if not ray.is_initialized():
        ray.init()
    use_gpu, concurrency = _resources(options)
    logger.info("inference of run %s (checkpoint %s, epoch %d) on dataset %s (%d images): %s, %s, "
                "batch %d -> %s", run_id, ref.label, ref.epoch, dataset, expected,
                f"{concurrency} model actor(s)" if concurrency else "the model in the read tasks",
                "GPU" if use_gpu else "CPU", options.batch_size, storage.uri(staging_rel))
    start = time.monotonic()
    policy = BadInputPolicy(max_bad_fraction=options.max_bad_fraction)
    counter = new_bad_input_counter(expected, policy)
    failure: BadInputError | None = None
    try:
        with inference_progress(f"inference of run {run_id}", expected) as progress:
            _write_assignments(storage, dataset, exp, {"policy": policy, "counter": counter, "shards": shards},
                               staging_rel, ref, run_id, options, use_gpu, concurrency, progress)
        seconds = time.monotonic() - start
        rows = verify_staged(storage, staging_rel, info.num_samples)
        # Bad images (undecodable, too large, damaged shards) are skipped and counted; over the policy's
        # budget this raises BadInputError and nothing is published.
        bad = verify_epoch(counter, rows)
    except Exception:
        # Over the budget the decode stage raises inside a Ray task (or verify_epoch here): one message naming
        # the images, the count and the setting, instead of the task's traceback.
        report = cast(BadInputReport, ray.get(counter.report.remote()))
        if not report.over_limit:
            raise
        failure = too_much_bad_input(report, load_source_lookup(storage, info), info, run_id, options.max_bad_fraction)
    if failure is not None:
        # Ray Data keeps a failed execution's actors in a reference cycle (with the task's traceback): collect
        # it now, so that they give their CPUs back to a driver that goes on (a reclustering tick, a notebook).
        gc.collect()
        raise failure
    if bad.bad:
        logger.warning("inference skipped bad input: %s", bad.summary())
    marker = {
        "run_id": run_id,
        "name": name,
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "dataset_version": info.version,
        "dataset_num_samples": info.num_samples,
        "scope": "all" if shards is None else "shards",
        "shards": shards,
        "train_dataset": train_dataset,
        **_model_fields(ref, exp, options, loaded.method),
        "attempt": attempt,
        "seconds": round(seconds, 3),
        "images_per_s": round(rows / max(seconds, 1e-9), 1),
        "device": "gpu" if use_gpu else "cpu",
        "model_in": "actors" if concurrency else "tasks",
        "actors": concurrency,
        "skipped": {"count": expected - rows, "by_reason": bad.by_reason, "examples": bad.examples},
    }
    marker = publish(storage, out_rel, staging_rel, marker)
    return export_inference(storage, InferenceResult(  # also as Ray metrics secu_* (pipelines.tracking)
        run_id=run_id, name=name, uri=storage.uri(out_rel), rows=rows, checkpoint=ref.label, checkpoint_epoch=ref.epoch,
        dataset=dataset, seconds=seconds, images_per_s=rows / max(seconds, 1e-9), marker=marker))

