"""Evaluate published assignments: ``python -m jobs.evaluate``.

ACC (Hungarian), NMI and ARI per head when the dataset's manifest has labels; cluster sizes and
confidence always. Writes <storage>/runs/<run-id>/metrics.json (metrics-<suffix>.json for an output
assignments-<suffix>) and prints a table. The evaluation has no settings, so this job takes no --config
or --set.

Examples:
    python -m jobs.evaluate --storage ./data --run-id fm
    python -m jobs.evaluate --storage ./data --run-id fm --output-name assignments-fm-test
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.common import job_parser, open_storage, run_job
from pipelines.storage import Storage

logger = logging.getLogger("jobs.evaluate")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the evaluation job."""
    parser = job_parser("secu evaluate", __doc__)
    add_output_args(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics JSON instead of the table")
    return parser


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--run-id`` and the assignment output it refers to (``--output-name`` or ``--dataset``)."""
    parser.add_argument("--run-id", required=True, help="the run whose assignments are used")
    parser.add_argument("--output-name", default=None,
                        help="assignment output under the run (default assignments, or assignments-<dataset> "
                             "with --dataset)")
    parser.add_argument("--dataset", default=None,
                        help="shortcut for --output-name assignments-<dataset> (a dataset the run did not train on)")


def output_name_for(storage: Storage, args: argparse.Namespace) -> str:
    """The assignment output an evaluate/report command refers to."""
    from pipelines.outputs.assignments import DEFAULT_NAME, read_marker

    if args.output_name:
        return str(args.output_name)
    if not args.dataset:
        return DEFAULT_NAME
    try:  # the run's own dataset is published under the default name
        if read_marker(storage, args.run_id, DEFAULT_NAME).get("dataset") == args.dataset:
            return DEFAULT_NAME
    except FileNotFoundError:
        pass
    return f"{DEFAULT_NAME}-{args.dataset}"


def evaluate(args: argparse.Namespace) -> int:
    """The job: check the storage, evaluate the output, write and print the metrics."""
    from pipelines.outputs.evaluation import evaluate_assignments, format_table, write_metrics

    storage = open_storage(args)
    result = evaluate_assignments(storage, args.run_id, output_name_for(storage, args))
    where = write_metrics(storage, args.run_id, result)
    print(json.dumps(result, indent=1, default=float) if args.json else format_table(result))
    for warning in result["warnings"]:
        logger.warning("%s", warning)
    logger.info("metrics written to %s%s", where,
                f"; WARNING: {len(result['warnings'])} head(s) collapsed, see above" if result["warnings"] else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the exit code (2 for errors a user can fix)."""
    return run_job(evaluate, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
