"""The training job's configuration: the algorithm (``ExperimentConfig``) plus where and how it runs.

Named ``ComputeConfig``/``TrainJobConfig`` so as not to shadow Ray's ``ScalingConfig``/``RunConfig``.
Everything is validated before any work starts, and the whole config is saved into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipelines.tracking.config import TrackingConfig
from pipelines.training.id_ranges import LABEL_FETCH_MODES
from secu.config import ExperimentConfig
from secu.overrides import apply_overrides, merge
from secu.recipes import recipe

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ComputeConfig:
    """How the training runs on Ray."""

    num_workers: int = 2
    """Ray Train workers (DDP ranks). The global batch optim.batch_size is split among them."""
    use_gpu: bool = False
    """One GPU per worker (NCCL, SyncBatchNorm, mixed precision); gloo on CPU otherwise."""
    cpus_per_worker: float = 1.0
    """CPUs reserved by each training worker."""
    torch_threads: int = 0
    """torch intra-op threads per worker; 0 = cpus_per_worker."""
    max_failures: int = 3
    """Worker-group restarts from the last checkpoint before the run fails (Ray FailureConfig)."""
    checkpoint_every: int = 1
    """Save a checkpoint every this many epochs (and always after the last epoch)."""
    num_to_keep: int = 2
    """Checkpoints kept on storage."""
    coordinator_shards: int = 1
    """Assignment-memory shards (actors), split by sample_index range."""
    label_fetch: str = "auto"
    """How workers read the previous epoch's labels: 'all' (every label once per epoch, zero-copy on a
    node), 'pages' (only the pages of ids a worker reads, 65,536 ids each, on first use, 64 cached),
    'auto' (all up to 256 MiB of labels, pages above: from 13.4M ids x 10 int16 heads or 134M x 1)."""
    log_every: int = 50
    """Log a progress line every this many steps (rank 0)."""
    max_bad_fraction: float = 0.01
    """Fail when more than this fraction of the images are undecodable / over the pixel limit."""
    fault_injection: str = ""
    """Test-only, comma-separated: 'worker:EPOCH:STEP' kills rank 1 (or 0) once, 'coordinator:EPOCH:STEP'
    kills coordinator shard 0 once, at that step. Empty in every real run."""
    stop_after_epoch: int = -1
    """Stop cleanly after this epoch's checkpoint (-1 = run all epochs); resubmitting the run id resumes."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"compute.num_workers={self.num_workers} must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"compute.cpus_per_worker={self.cpus_per_worker} must be positive")
        if self.max_failures < -1:
            raise ValueError("compute.max_failures must be >= 0, or -1 for unlimited")
        if self.checkpoint_every < 1 or self.num_to_keep < 1 or self.coordinator_shards < 1:
            raise ValueError("compute.checkpoint_every, num_to_keep and coordinator_shards must be >= 1")
        if self.label_fetch not in LABEL_FETCH_MODES:
            raise ValueError(f"compute.label_fetch={self.label_fetch!r}: use one of {', '.join(LABEL_FETCH_MODES)}")
        if self.fault_injection and not re.match(r"^(worker|coordinator):\d+:\d+(,(worker|coordinator):\d+:\d+)*$",
                                                 self.fault_injection):
            raise ValueError(
                f"compute.fault_injection={self.fault_injection!r}: use 'worker:EPOCH:STEP' or "
                "'coordinator:EPOCH:STEP' (test-only)"
            )


@dataclass
class TrainJobConfig:
    """One training run: what to train (experiment), on what (dataset), where (storage), how (compute), where its
    figures go (tracking)."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    dataset: str = "fashion-mnist"
    """Dataset name under <storage>/datasets/."""
    run_id: str = ""
    """Stable run id: resubmitting the same id resumes from its last checkpoint. Derived from the
    config when empty."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Ray metrics and the optional MLflow run (``pipelines.tracking``); not part of the derived run id."""

    def __post_init__(self) -> None:
        if not self.run_id:
            self.run_id = default_run_id(self.experiment, self.dataset)
        if not _RUN_ID.match(self.run_id):
            raise ValueError(
                f"run id {self.run_id!r}: use letters, digits, '-', '_' or '.', at most 128 characters"
            )
        g, w = self.experiment.optim.batch_size, self.compute.num_workers
        if g % w != 0:
            raise ValueError(
                f"optim.batch_size={g} is not divisible by compute.num_workers={w}: the global batch is "
                "split evenly among workers; change one of them"
            )

    @property
    def local_batch_size(self) -> int:
        """Per-worker batch."""
        return self.experiment.optim.batch_size // self.compute.num_workers

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (saved with checkpoints and outputs)."""
        return {
            "experiment": self.experiment.to_dict(),
            "compute": dataclasses.asdict(self.compute),
            "dataset": self.dataset,
            "run_id": self.run_id,
            "tracking": dataclasses.asdict(self.tracking),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJobConfig:
        """Inverse of ``to_dict``; validates."""
        # "history" is the per-epoch metrics log that checkpoints carry beside the config.
        unknown = set(data) - {"experiment", "compute", "dataset", "run_id", "recipe", "tracking", "history"}
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}; valid: experiment, compute, "
                             "dataset, run_id, recipe, tracking")
        base = recipe(data["recipe"]) if data.get("recipe") else ExperimentConfig()
        experiment = _merge_experiment(base, data.get("experiment", {}))
        compute_in = data.get("compute") or {}
        if not isinstance(compute_in, dict):
            raise ValueError(f"train config key 'compute' needs a mapping, got {compute_in!r}")
        tracking_in = data.get("tracking") or {}
        if not isinstance(tracking_in, dict):
            raise ValueError(f"train config key 'tracking' needs a mapping, got {tracking_in!r}")
        return cls(
            experiment=experiment,
            # merge converts each value to its field's type (a YAML "4" for num_workers) and names unknown keys
            compute=merge(ComputeConfig(), compute_in, prefix="compute."),
            dataset=str(data.get("dataset", "fashion-mnist")),
            run_id=str(data.get("run_id", "")),
            tracking=merge(TrackingConfig(), tracking_in, prefix="tracking."),
        )


def _merge_experiment(base: ExperimentConfig, data: dict[str, Any]) -> ExperimentConfig:
    merged = base.to_dict()
    _deep_update(merged, data)
    return ExperimentConfig.from_dict(merged)


def _deep_update(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def apply_job_overrides(job: TrainJobConfig, overrides: list[str]) -> TrainJobConfig:
    """Apply ``--set`` overrides: ``compute.x=..``, ``tracking.x=..``, ``dataset=..``, or experiment keys
    (``optim.lr=0.1`` or ``experiment.optim.lr=0.1``)."""
    experiment, compute, tracking = job.experiment, job.compute, job.tracking
    dataset, run_id = job.dataset, job.run_id
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.startswith("compute."):
            compute = apply_overrides(compute, [text[len("compute."):]])
        elif key.startswith("tracking."):
            tracking = apply_overrides(tracking, [text[len("tracking."):]])
        elif key == "dataset":
            dataset = text.split("=", 1)[1].strip()
        elif key == "run_id":
            run_id = text.split("=", 1)[1].strip()
        else:
            stripped = text[len("experiment."):] if key.startswith("experiment.") else text
            experiment = apply_overrides(experiment, [stripped])
    return TrainJobConfig(experiment=experiment, compute=compute, dataset=dataset, run_id=run_id, tracking=tracking)


def default_run_id(experiment: ExperimentConfig, dataset: str) -> str:
    """A stable id derived from the config, so that resubmitting the same job resumes it."""
    digest = hashlib.sha1(json.dumps(experiment.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{experiment.name}-{dataset}-{digest}"
