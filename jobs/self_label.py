"""Self-label a trained run: ``python -m jobs.self_label`` (also under ``ray job submit``).

The second stage after clustering (SCAN; the SeCu paper does the same): fine-tune the encoder and one
head with class-balanced cross-entropy on strong views of the confident images, into a new run that
``jobs.infer``, ``jobs.evaluate`` and ``jobs.report`` then take like any other. The same --run-id resumes.

Examples:
    python -m jobs.self_label --from-run demo-fashion-mnist --run-id demo-fashion-mnist-sl --storage ./data
    python -m jobs.self_label --from-run fm1 --run-id fm1-sl --set self_label.epochs=20 \\
        --set compute.num_workers=4 --storage s3://bucket/secu --s3-endpoint http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common import add_storage_args, setup_logging, storage_from_args

logger = logging.getLogger("jobs.self_label")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the self-labeling job."""
    parser = argparse.ArgumentParser(prog="secu self-label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", required=True, help="the trained clustering run to start from")
    parser.add_argument("--run-id", default=None, help="the new run (default: <from-run>-sl); the same id resumes")
    parser.add_argument("--dataset", default=None, help="dataset to fine-tune on (default: the source run's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. self_label.epochs=20, self_label.threshold=0.95, "
                             "compute.num_workers=2 (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    add_storage_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the self-labeling stage; returns the exit code (2 for errors a user can fix)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    run_id = args.run_id or f"{args.from_run}-sl"
    try:
        storage = storage_from_args(args)
        from pipelines.training.self_label import run_self_label  # imports Ray; keep --help fast

        outcome = run_self_label(storage, args.from_run, run_id, args.overrides, args.dataset)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as err:
        logger.error("%s", err)
        return 2
    logger.info("self-labeling run %s finished after %d epochs (%.1f%% of the images confident in the last); "
                "checkpoint %s; next: secu infer --run-id %s", outcome.run_id, outcome.epochs_run,
                100 * float(outcome.metrics.get("self_label/confident_frac", 0.0)), outcome.checkpoint_path, run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
