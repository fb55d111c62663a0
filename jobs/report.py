"""Render a static HTML report of a run's clusters: ``python -m jobs.report``.

Writes <storage>/runs/<run-id>/report/index.html with one page per cluster (clusters/c0042.html),
thumbnails read from the dataset's shards, a cluster-size chart, training curves and, with labels,
a confusion heat map. Open index.html in a browser; no server is needed. Uploaded when the storage
is s3://.

Examples:
    python -m jobs.report --storage ./data --run-id fm
    python -m jobs.report --storage ./data --run-id fm --head 1 --set top=12 --set random=8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs.common import add_storage_args, setup_logging, storage_from_args
from jobs.evaluate import output_name_from_args
from jobs.job_options import resolve_options

logger = logging.getLogger("jobs.report")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the report job."""
    parser = argparse.ArgumentParser(prog="secu report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True, help="the run whose assignments are shown")
    parser.add_argument("--output-name", default=None, help="assignment output under the run (default assignments)")
    parser.add_argument("--dataset", default=None, help="shortcut for --output-name assignments-<dataset>")
    parser.add_argument("--head", type=int, default=None, help="the head whose clusters get pages (default 0)")
    parser.add_argument("--config", type=Path, default=None, help="YAML mapping of report options")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option: top, random, page_size, thumb_px, seed, threads (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    add_storage_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Render and publish the report; returns the exit code (2 for errors a user can fix)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from pipelines.outputs.report import ReportOptions, build_report

    try:
        storage = storage_from_args(args)
        options = resolve_options(ReportOptions, args.config, args.overrides, {"head": args.head})
        result = build_report(storage, args.run_id, output_name_from_args(args), options)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as err:
        logger.error("%s", err)
        return 2
    print(result.uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
