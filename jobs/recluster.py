"""Scheduled reclustering of a growing collection: ``python -m jobs.recluster`` (one tick per call).

Each call ingests the source's new images, trains a few epochs warm-started from the previous tick,
keeps cluster ids stable (Hungarian matching of centers to the previous tick), infers the collection
and writes a drift summary. Details: ``pipelines/recluster/tick.py``; schedule: jobs/README.md and
cluster_configs/kuberay/cronjob-recluster.yaml.

Examples:
    python -m jobs.recluster --storage ./data --run-id lake --source ./incoming --dataset lake
    python -m jobs.recluster --storage s3://bucket/secu --s3-endpoint http://127.0.0.1:9000 \\
        --run-id lake-recluster --source s3://bucket/incoming/ --epochs 3 --set compute.num_workers=4

Outputs (run id <run-id>-<tick>, tick = --tick or the UTC start time): runs/<run_id>/checkpoint-aligned/,
assignments/, drift.json, metrics.json, report/; the series record runs/<run-id>/recluster.json.
Exit codes: 0 done, 2 bad configuration or tick already completed, 3 another tick of the series holds
the lock (runs/<run-id>/_recluster.lock).

The config file holds training keys (recipe, compute: {...}, experiment keys) plus the sections recluster: {...}
(ReclusterOptions: epochs, infer_scope, warm_start, report, lock_ttl_hours, split, shard_size, max_pixels)
and inference: {...} (the options of jobs.infer); --set takes the same keys (recluster.epochs=3).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from jobs.common import EXIT_LOCKED, job_parser, open_storage, run_job
from jobs.options import TRAIN_HELP, build_options, build_train_job, collect, section, train_keys
from pipelines.training.job_config import TrainJobConfig
from secu.recipes import RECIPE_NAMES

logger = logging.getLogger("jobs.recluster")

__all__ = ["EXIT_LOCKED", "build_parser", "main", "recluster", "resolve"]
"""EXIT_LOCKED (from jobs.common) is the exit code of a tick refused by the series lock."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the reclustering job."""
    parser = job_parser("secu recluster", __doc__, config_help="YAML file of training keys plus the sections "
                        "recluster: and inference: (see above)",
                        set_help=f"override {TRAIN_HELP}, recluster.<option> (epochs, infer_scope, lock_ttl_hours, "
                                 "shard_size, split, ...) or inference.<option> (batch_size, concurrency, ...)")
    parser.add_argument("--run-id", required=True, metavar="BASE",
                        help="the reclustering series; each tick is the training run BASE-TICK")
    parser.add_argument("--tick", default=None, help="tick id (default: the UTC start time, e.g. 20261123T030000Z); "
                                                     "a completed tick id is refused, a failed one resumes")
    parser.add_argument("--source", default=None,
                        help="images to ingest first (same specs as jobs.ingest); omit to recluster the dataset as is")
    parser.add_argument("--dataset", default=None, help="dataset name under <storage>/datasets (default: BASE)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per tick (recluster.epochs, "
                                                                 "default 2)")
    parser.add_argument("--infer-scope", choices=("all", "new"), default=None,
                        help="assign the whole collection (default) or only shards with images new since the last tick")
    parser.add_argument("--no-warm-start", action="store_true", help="train every tick from scratch")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                        help="named hyperparameters (default fashion-mnist-cpu unless --config sets one)")
    return parser


def resolve(args: argparse.Namespace) -> tuple[TrainJobConfig, Any, Any]:
    """The training template, ``ReclusterOptions`` and ``InferenceOptions`` of the arguments (validated)."""
    from pipelines.outputs.inference import InferenceOptions
    from pipelines.recluster.tick import ReclusterOptions

    space = train_keys(recluster=ReclusterOptions(), inference=InferenceOptions())
    values = collect(space, args.config, args.overrides, {
        "recipe": args.recipe, "dataset": args.dataset, "recluster.epochs": args.epochs,
        "recluster.infer_scope": args.infer_scope, "recluster.warm_start": False if args.no_warm_start else None,
        "recluster.report": False if args.no_report else None})
    train = {k: v for k, v in values.items() if not k.startswith(("recluster.", "inference."))}
    if train.pop("run_id", None):
        logger.warning("run_id is ignored: each tick is the training run %s-<tick>", args.run_id)
    template = build_train_job(train | {"run_id": args.run_id, "dataset": train.get("dataset") or args.run_id})
    options = build_options(ReclusterOptions, section(values, "recluster"), "recluster.")
    inference = build_options(InferenceOptions, section(values, "inference"), "inference.")
    return template, options, inference


def recluster(args: argparse.Namespace) -> int:
    """The job: resolve the settings, check the storage and the dataset, run one tick."""
    template, options, inference = resolve(args)
    storage = open_storage(args)
    from pipelines.dataset.info import load_dataset_info
    from pipelines.recluster.tick import run_recluster

    if args.source is None:
        load_dataset_info(storage, template.dataset)  # FileNotFoundError before the lock and Ray
    logger.info("reclustering series %s on dataset %s; options %s", args.run_id, template.dataset, options)
    result = run_recluster(storage, template, args.run_id, tick=args.tick, source=args.source, options=options,
                           inference=inference)
    summary = {"run_id": result.run_id, "previous_run_id": result.previous_run_id, "added": result.added,
               "num_samples": result.num_samples, "new_images": result.new_images, "rows": result.rows,
               "checkpoint": result.checkpoint, "assignments": result.assignments, "report": result.report}
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one reclustering tick; returns the exit code (see the module docstring)."""
    return run_job(recluster, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
