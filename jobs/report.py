"""Render a static HTML report of a run's clusters: ``python -m jobs.report``.

Writes <storage>/runs/<run-id>/report/index.html with a 2-D map of a sample of the embeddings
(t-SNE or PCA, every cluster labelled and linked), a cluster-size chart, training curves, with labels
a confusion heat map and each cluster's main class, and one page per cluster (clusters/c0042.html:
its most confident, least confident and random members, 16 each, more on extra pages), thumbnails
read from the dataset's shards; with drift.json (a reclustering tick) also drift.html, the largest
flows between clusters since the previous tick. Charts are matplotlib PNGs. Open index.html in a
browser; no server is needed. Uploaded when the storage is s3://. With --mlflow-uri the report folder
and the metrics JSON are also logged to the run's MLflow run.

Examples:
    python -m jobs.report --storage ./data --run-id fm
    python -m jobs.report --storage ./data --run-id fm --head 1 --set top=24 --set random=24
    python -m jobs.report --storage ./data --run-id fm --set map_layout=pca --set map_points=5000

Options (--config FILE holds them as key: value lines, --set KEY=VALUE sets one): head, top, borderline,
random, more_pages, map_points, map_layout, page_size, thumb_px, seed, threads.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common import job_parser, open_storage, run_job
from jobs.evaluate import add_output_args, output_name_for
from jobs.options import resolve_options

logger = logging.getLogger("jobs.report")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the report job."""
    parser = job_parser("secu report", __doc__, config_help="YAML mapping of report options (see above)",
                        set_help="override a report option, e.g. top=12 or thumb_px=96")
    add_output_args(parser)
    parser.add_argument("--head", type=int, default=None, help="the head whose clusters get pages (default 0)")
    parser.add_argument("--mlflow-uri", default="", metavar="URI",
                        help="also log the report folder and the metrics JSON as artifacts of the run's MLflow run "
                             "(the training's tracking.mlflow_uri; needs pip install 'secu-ray[mlflow]')")
    parser.add_argument("--mlflow-experiment", default="secu", metavar="NAME",
                        help="the MLflow experiment of the run (the training's tracking.mlflow_experiment)")
    return parser


def report(args: argparse.Namespace) -> int:
    """The job: resolve the options, check the storage, render and publish the report."""
    from pipelines.outputs.report import ReportOptions, build_report
    from pipelines.tracking.config import TrackingConfig
    from pipelines.tracking.mlflow_run import log_report, require_mlflow

    options = resolve_options(ReportOptions, args.config, args.overrides, {"head": args.head})
    tracking = TrackingConfig(mlflow_uri=args.mlflow_uri, mlflow_experiment=args.mlflow_experiment)
    require_mlflow(tracking)
    storage = open_storage(args)
    name = output_name_for(storage, args)
    result = build_report(storage, args.run_id, name, options)
    log_report(tracking, storage, args.run_id, name)
    print(result.uri)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Render and publish the report; returns the exit code (2 for errors a user can fix)."""
    return run_job(report, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
