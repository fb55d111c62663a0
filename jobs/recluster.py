"""Scheduled reclustering of a growing collection: ``python -m jobs.recluster`` (one tick per call).

Each call ingests the source's new images, trains a few epochs warm-started from the previous tick,
keeps cluster ids stable (Hungarian matching of centers to the previous tick), infers the collection
and writes a drift summary. Details: ``pipelines/recluster/tick.py``; schedule: jobs/README.md and
cluster_configs/kuberay/cronjob-recluster.yaml.

Examples:
    python -m jobs.recluster --storage ./data --run-id lake --source ./incoming --dataset lake
    python -m jobs.recluster --storage s3://bucket/secu --s3-endpoint http://127.0.0.1:9000 \
        --run-id lake-recluster --source s3://bucket/incoming/ --epochs 3 --set compute.num_workers=4

Outputs (run id <run-id>-<tick>, tick = --tick or the UTC start time): runs/<run_id>/checkpoint-aligned/,
assignments/, drift.json, metrics.json, report/; the series record runs/<run-id>/recluster.json.
Exit codes: 0 done, 2 bad configuration or tick already completed, 3 another tick of the series holds
the lock (runs/<run-id>/_recluster.lock).
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
from secu.config import apply_overrides
from secu.recipes import RECIPE_NAMES

logger = logging.getLogger("jobs.recluster")

EXIT_LOCKED = 3


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the reclustering job."""
    parser = argparse.ArgumentParser(prog="secu recluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True, metavar="BASE",
                        help="the reclustering series; each tick is the training run BASE-TICK")
    parser.add_argument("--tick", default=None, help="tick id (default: the UTC start time, e.g. 20261123T030000Z); "
                                                     "a completed tick id is refused, a failed one resumes")
    parser.add_argument("--source", default=None,
                        help="images to ingest first (same specs as jobs.ingest); omit to recluster the dataset as is")
    parser.add_argument("--dataset", default=None, help="dataset name under <storage>/datasets (default: BASE)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per tick (default 2)")
    parser.add_argument("--infer-scope", choices=("all", "new"), default=None,
                        help="assign the whole collection (default) or only shards with images new since the last tick")
    parser.add_argument("--no-warm-start", action="store_true", help="train every tick from scratch")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                        help="named hyperparameters (default fashion-mnist-cpu unless --config sets one)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML: training keys (recipe, experiment, compute) plus optional sections "
                             "recluster: {...} and inference: {...}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override: training keys (optim.lr=0.1, compute.num_workers=4), recluster.<option> "
                             "(epochs, infer_scope, lock_ttl_hours, shard_size, split, ...) or inference.<option> "
                             "(batch_size, concurrency, cpus_per_actor, ...); repeatable")
    parser.add_argument("--log-level", default="INFO")
    add_storage_args(parser)
    return parser


def resolve(args: argparse.Namespace) -> tuple[TrainJobConfig, Any, Any]:
    """The training template, ``ReclusterOptions`` and ``InferenceOptions`` of the arguments (validated)."""
    from pipelines.outputs.inference import InferenceOptions
    from pipelines.recluster.tick import ReclusterOptions

    data: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.exists():
            raise FileNotFoundError(f"config file {args.config} does not exist")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {args.config} must hold a mapping at the top level")
        data = dict(loaded)
    recluster_cfg = data.pop("recluster", None) or {}
    inference_cfg = data.pop("inference", None) or {}
    if not isinstance(recluster_cfg, dict) or not isinstance(inference_cfg, dict):
        raise ValueError("config sections recluster: and inference: must be mappings of option names to values")
    if args.recipe:
        data["recipe"] = args.recipe
    data.setdefault("recipe", "fashion-mnist-cpu")
    data["dataset"] = args.dataset or data.get("dataset") or args.run_id
    data.pop("run_id", None)  # each tick names its own run
    train_sets = [o for o in args.overrides if not o.startswith(("recluster.", "inference."))]
    recluster_sets = [o[len("recluster."):] for o in args.overrides if o.startswith("recluster.")]
    inference_sets = [o[len("inference."):] for o in args.overrides if o.startswith("inference.")]
    shortcuts = {"epochs": args.epochs, "infer_scope": args.infer_scope,
                 "warm_start": False if args.no_warm_start else None, "report": False if args.no_report else None}
    given = {k: v for k, v in shortcuts.items() if v is not None}
    options = apply_overrides(ReclusterOptions(**(recluster_cfg | given)), recluster_sets)
    inference = apply_overrides(InferenceOptions(**inference_cfg), inference_sets)
    template = apply_job_overrides(TrainJobConfig.from_dict(data | {"run_id": args.run_id}), train_sets)
    template = mark_user_set(template, data, train_sets)
    return template, options, inference


def main(argv: list[str] | None = None) -> int:
    """Run one reclustering tick; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from pipelines.recluster.tick import run_recluster
    from pipelines.run_lock import LockHeldError

    try:
        storage = storage_from_args(args)
        template, options, inference = resolve(args)
    except (TypeError, ValueError, FileNotFoundError) as err:
        logger.error("bad configuration: %s", err)
        return 2
    logger.info("reclustering series %s on dataset %s; options %s", args.run_id, template.dataset, options)
    try:
        result = run_recluster(storage, template, args.run_id, tick=args.tick, source=args.source, options=options,
                               inference=inference)
    except LockHeldError as err:
        logger.error("refused: %s", err)
        return EXIT_LOCKED
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as err:
        logger.error("%s", err)
        return 2
    summary = {"run_id": result.run_id, "previous_run_id": result.previous_run_id, "added": result.added,
               "num_samples": result.num_samples, "new_images": result.new_images, "rows": result.rows,
               "checkpoint": result.checkpoint, "assignments": result.assignments, "report": result.report}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
