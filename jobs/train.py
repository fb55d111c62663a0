"""Train a clustering method (SeCu unless `method` says otherwise) on an ingested dataset: ``python -m jobs.train``
(also under ``ray job submit``).

Examples:
    python -m jobs.train --recipe fashion-mnist-cpu --dataset fashion-mnist --storage ./data
    python -m jobs.train --recipe fashion-mnist-cpu-propos --dataset fashion-mnist --storage ./data --run-id pp
    python -m jobs.train --config my.yaml --set optim.epochs=20 --set compute.num_workers=4 \\
        --storage s3://bucket/secu --s3-endpoint http://127.0.0.1:9000 --run-id nightly

The config file holds the same keys as --set, nested or dotted: recipe, dataset, run_id, compute: {...},
experiment: {...} (or the experiment's sections optim:, secu:, model:, ... at the top level).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.common import job_parser, run_job, storage_from_args
from jobs.options import TRAIN_HELP, build_train_job, collect, train_keys
from pipelines.storage import Storage
from pipelines.tracking.mlflow_run import require_mlflow
from pipelines.training.job_config import TrainJobConfig
from secu.recipes import RECIPE_NAMES

logger = logging.getLogger("jobs.train")

TRAIN_KEYS = train_keys()


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the training job."""
    parser = job_parser("secu train", __doc__, config_help="YAML file of training keys (see above)",
                        set_help=f"override {TRAIN_HELP}")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                        help="named hyperparameters (default: fashion-mnist-cpu unless --config sets one)")
    parser.add_argument("--dataset", default=None, help="dataset name under <storage>/datasets")
    parser.add_argument("--run-id", default=None, help="stable run id; the same id resumes the run")
    parser.add_argument("--num-workers", type=int, default=None, help="shortcut for compute.num_workers")
    parser.add_argument("--use-gpu", action="store_true", help="shortcut for compute.use_gpu=true")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def resolve_job(args: argparse.Namespace) -> TrainJobConfig:
    """Recipe, then the config file, the shortcut options and --set overrides; validated, built once."""
    shortcuts = {"recipe": args.recipe, "dataset": args.dataset, "run_id": args.run_id,
                 "compute.num_workers": args.num_workers, "compute.use_gpu": True if args.use_gpu else None}
    values = collect(TRAIN_KEYS, args.config, args.overrides, shortcuts)
    if not values.get("dataset"):
        raise ValueError("no dataset given: pass --dataset NAME (a dataset ingested under <storage>/datasets by "
                         "`secu ingest`), or set `dataset: NAME` in the --config file")
    job = build_train_job(values)
    require_mlflow(job.tracking)  # tracking.mlflow_uri without mlflow installed fails here, before any work
    return job


def train(args: argparse.Namespace) -> int:
    """The job: resolve and print the config, check the storage, train (or resume) the run."""
    job = resolve_job(args)
    storage = storage_from_args(args)
    logger.info("resolved config:\n%s", json.dumps(job.to_dict(), indent=1))
    if args.print_config:
        print(json.dumps(_as_it_would_train(job, storage).to_dict(), indent=1))
        return 0
    storage.check_reachable()
    from pipelines.training.trainer import run_training  # imports Ray; keep --help and config errors fast

    outcome = run_training(job, storage)
    for warning in outcome.warnings:
        logger.warning("%s", warning)
    logger.info("run %s finished after %d epochs; checkpoint %s%s", outcome.run_id, outcome.epochs_run,
                outcome.checkpoint_path,
                f"; WARNING: {len(outcome.warnings)} head(s) collapsed, see above" if outcome.warnings else "")
    return 0


def _as_it_would_train(job: TrainJobConfig, storage: Storage) -> TrainJobConfig:
    """The config after the adaptation to the dataset's size (``secu.adapt``), which training applies once it
    knows the collection; the config as given, with a warning, when the dataset cannot be read."""
    from pipelines.dataset.info import load_dataset_info
    from pipelines.training.trainer import adapt_job

    try:
        storage.check_reachable()
        info = load_dataset_info(storage, job.dataset)
    except (FileNotFoundError, ValueError, OSError) as err:
        logger.warning("printing the config before its adaptation to the collection (%s); training adapts the "
                       "schedule to the dataset's size", " ".join(str(err).split()))
        return job
    return adapt_job(job, info.num_samples)


def main(argv: list[str] | None = None) -> int:
    """Run the training job; returns the process exit code (2 for errors a user can fix)."""
    return run_job(train, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
