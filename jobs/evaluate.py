"""Evaluate published assignments: ``python -m jobs.evaluate``.

ACC (Hungarian), NMI and ARI per head when the dataset's manifest has labels; cluster sizes and
confidence always. Writes <storage>/runs/<run-id>/metrics.json (metrics-<suffix>.json for an output
assignments-<suffix>) and prints a table.

Examples:
    python -m jobs.evaluate --storage ./data --run-id fm
    python -m jobs.evaluate --storage ./data --run-id fm --output-name assignments-fm-test
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common import add_storage_args, setup_logging, storage_from_args

logger = logging.getLogger("jobs.evaluate")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the evaluation job."""
    parser = argparse.ArgumentParser(prog="secu evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True, help="the run whose assignments are evaluated")
    parser.add_argument("--output-name", default=None,
                        help="assignment output under the run (default assignments, or assignments-<dataset> "
                             "with --dataset)")
    parser.add_argument("--dataset", default=None,
                        help="shortcut for --output-name assignments-<dataset> (a dataset the run did not train on)")
    parser.add_argument("--json", action="store_true", help="print the metrics JSON instead of the table")
    parser.add_argument("--log-level", default="INFO")
    add_storage_args(parser)
    return parser


def output_name_from_args(args: argparse.Namespace) -> str:
    """The assignment output an evaluate/report command refers to."""
    from pipelines.outputs.assignments import DEFAULT_NAME, read_marker
    from pipelines.storage import Storage

    if args.output_name:
        return str(args.output_name)
    if not args.dataset:
        return DEFAULT_NAME
    storage: Storage = storage_from_args(args)
    try:  # the run's own dataset is published under the default name
        if read_marker(storage, args.run_id, DEFAULT_NAME).get("dataset") == args.dataset:
            return DEFAULT_NAME
    except FileNotFoundError:
        pass
    return f"{DEFAULT_NAME}-{args.dataset}"


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the exit code (2 for errors a user can fix)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    import json

    from pipelines.outputs.evaluation import evaluate_assignments, format_table, write_metrics

    try:
        storage = storage_from_args(args)
        name = output_name_from_args(args)
        result = evaluate_assignments(storage, args.run_id, name)
        where = write_metrics(storage, args.run_id, result)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as err:
        logger.error("%s", err)
        return 2
    print(json.dumps(result, indent=1, default=float) if args.json else format_table(result))
    for warning in result["warnings"]:
        logger.warning("%s", warning)
    logger.info("metrics written to %s%s", where,
                f"; WARNING: {len(result['warnings'])} head(s) collapsed, see above" if result["warnings"] else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
