"""Self-label a trained run: ``python -m jobs.self_label`` (also under ``ray job submit``).

The second stage after clustering (SCAN; the SeCu paper does the same): fine-tune the encoder and one
head with class-balanced cross-entropy on strong views of the confident images, into a new run that
``jobs.infer``, ``jobs.evaluate`` and ``jobs.report`` then take like any other. The same --run-id resumes.

Examples:
    python -m jobs.self_label --from-run demo-fashion-mnist --run-id demo-fashion-mnist-sl --storage ./data
    python -m jobs.self_label --from-run fm1 --run-id fm1-sl --set self_label.epochs=20 \\
        --set compute.num_workers=4 --storage s3://bucket/secu --s3-endpoint http://127.0.0.1:9000

The run starts from the source run's config; --config FILE (self_label: {...}, compute: {...}, any experiment
key) and --set change it. The keys are checked before the source run is read.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common import job_parser, open_storage, run_job
from jobs.options import as_overrides, collect, train_keys

logger = logging.getLogger("jobs.self_label")

SELF_LABEL_KEYS = train_keys(without=("recipe", "run_id"))
"""The source run fixes the recipe, and --run-id names the new run."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the self-labeling job."""
    parser = job_parser("secu self-label", __doc__, config_help="YAML file of training keys (see above)",
                        set_help="override, e.g. self_label.epochs=20, self_label.threshold=0.95, "
                                 "compute.num_workers=2 or dataset=NAME")
    parser.add_argument("--from-run", required=True, help="the trained clustering run to start from")
    parser.add_argument("--run-id", default=None, help="the new run (default: <from-run>-sl); the same id resumes")
    parser.add_argument("--dataset", default=None, help="dataset to fine-tune on (default: the source run's)")
    return parser


def self_label(args: argparse.Namespace) -> int:
    """The job: check the keys and the storage, then fine-tune the source run into the new run."""
    overrides = as_overrides(collect(SELF_LABEL_KEYS, args.config, args.overrides))
    run_id = args.run_id or f"{args.from_run}-sl"
    storage = open_storage(args)
    from pipelines.training.self_label import run_self_label  # imports Ray; keep --help fast

    outcome = run_self_label(storage, args.from_run, run_id, overrides, args.dataset)
    logger.info("self-labeling run %s finished after %d epochs (%.1f%% of the images confident in the last); "
                "checkpoint %s; next: secu infer --run-id %s", outcome.run_id, outcome.epochs_run,
                100 * float(outcome.metrics.get("self_label/confident_frac", 0.0)), outcome.checkpoint_path, run_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the self-labeling stage; returns the exit code (2 for errors a user can fix)."""
    return run_job(self_label, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
