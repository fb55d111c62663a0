"""Train SeCu on an ingested dataset: ``python -m jobs.train`` (also under ``ray job submit``).

Examples:
    python -m jobs.train --recipe fashion-mnist-cpu --dataset fashion-mnist --storage ./data
    python -m jobs.train --config my.yaml --set optim.epochs=20 --set compute.num_workers=4 \
        --storage s3://bucket/secu --s3-endpoint http://127.0.0.1:9000 --run-id nightly
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from jobs.common import add_storage_args, setup_logging, storage_from_args
from pipelines.training.job_config import TrainJobConfig, apply_job_overrides, mark_user_set
from secu.recipes import RECIPE_NAMES

logger = logging.getLogger("jobs.train")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the training job."""
    parser = argparse.ArgumentParser(prog="secu train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                        help="named hyperparameters (default: fashion-mnist-cpu unless --config sets one)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file with keys recipe, experiment, compute, dataset, run_id")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. optim.lr=0.1 or compute.num_workers=4 (repeatable)")
    parser.add_argument("--dataset", default=None, help="dataset name under <storage>/datasets")
    parser.add_argument("--run-id", default=None, help="stable run id; the same id resumes the run")
    parser.add_argument("--num-workers", type=int, default=None, help="shortcut for compute.num_workers")
    parser.add_argument("--use-gpu", action="store_true", help="shortcut for compute.use_gpu=true")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_storage_args(parser)
    return parser


def resolve_job(args: argparse.Namespace) -> TrainJobConfig:
    """Config file, then recipe, then shortcuts, then --set overrides; validated."""
    data: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.exists():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {args.config} must hold a mapping at the top level")
        data = loaded
    if args.recipe:
        data["recipe"] = args.recipe
    data.setdefault("recipe", "fashion-mnist-cpu")
    if args.dataset:
        data["dataset"] = args.dataset
    if args.run_id:
        data["run_id"] = args.run_id
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.insert(0, f"compute.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.insert(0, "compute.use_gpu=true")
    run_id_given = bool(data.get("run_id"))
    job = TrainJobConfig.from_dict(data)
    job = mark_user_set(apply_job_overrides(job, overrides), data, overrides)
    if not run_id_given and not any(o.startswith("run_id=") for o in overrides):
        # Derive the id from the final config so that overrides change it too.
        job = TrainJobConfig(experiment=job.experiment, compute=job.compute, dataset=job.dataset)
    return job


def main(argv: list[str] | None = None) -> int:
    """Run the training job; returns the process exit code."""
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        job = resolve_job(args)
        storage = storage_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        logger.error("bad configuration: %s", err)
        return 2
    logger.info("resolved config:\n%s", json.dumps(job.to_dict(), indent=1))
    if args.print_config:
        print(json.dumps(job.to_dict(), indent=1))
        return 0
    from pipelines.training.trainer import run_training  # imports Ray; keep --help and config errors fast

    try:
        outcome = run_training(job, storage)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    for warning in outcome.warnings:
        logger.warning("%s", warning)
    logger.info("run %s finished after %d epochs; checkpoint %s%s", outcome.run_id, outcome.epochs_run,
                outcome.checkpoint_path,
                f"; WARNING: {len(outcome.warnings)} head(s) collapsed, see above" if outcome.warnings else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
