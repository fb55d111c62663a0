"""Ingest images into WebDataset shards with stable ids: ``python -m jobs.ingest``.

Examples:
    python -m jobs.ingest --source idx:/usr/share/datasets/fashion-mnist --split all \\
        --dataset fashion-mnist --storage ./data
    python -m jobs.ingest --source ./photos --dataset photos --storage s3://bucket/secu \\
        --s3-endpoint http://127.0.0.1:9000
    python -m jobs.ingest --source cifar10:./cifar-10-batches-py --split train --dataset cifar10 \\
        --storage ./data

Sources: idx:DIR (Fashion-MNIST/MNIST), cifar10:DIR, cifar100:DIR, cifar100-20:DIR, stl10:DIR,
folder:DIR or a plain directory (class sub-folders become labels), s3://bucket/prefix.
Re-running the same command adds nothing; running it after new images arrived appends them.

Class names: folders name their classes, CIFAR and STL-10 files carry theirs; IDX files carry none, so
--label-names fashion-mnist|mnist|FILE.txt|a,b,c names them, and without it a directory whose name says
fashion-mnist or mnist gets those published names (the log says which). Re-running an ingest with names
over a dataset ingested without them adds the names (and no samples) when the labels line up.

Files that are not ingested are counted per reason (empty, not_an_image, truncated, corrupt, too_large,
non_image_file, dangling_symlink, unreadable) in the summary line, in --json and in dataset.json.

Options (--config FILE holds them as key: value lines, --set KEY=VALUE sets one): shard_size, max_pixels,
limit, use_ray, max_in_flight, lock_ttl_hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from jobs.common import job_parser, open_storage, run_job
from jobs.options import resolve_options
from pipelines.dataset.info import MAX_SHARD_SIZE

logger = logging.getLogger("jobs.ingest")

RAY_CHOICES = {"auto": None, "on": True, "off": False}


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the ingest job."""
    parser = job_parser("secu ingest", __doc__, config_help="YAML mapping of ingest options (see above)",
                        set_help="override an ingest option, e.g. shard_size=5000 or lock_ttl_hours=6")
    parser.add_argument("--source", required=True, help="what to ingest (see above)")
    parser.add_argument("--dataset", required=True, help="dataset name under <storage>/datasets")
    parser.add_argument("--split", default="train",
                        help="array sources: train, test, unlabeled (STL-10), a comma list, or all")
    parser.add_argument("--shard-size", type=int, default=None,
                        help=f"samples per shard (1..{MAX_SHARD_SIZE}, default 10000)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="file sources: skip (and count) images with more pixels (default 50000000)")
    parser.add_argument("--limit", type=int, default=None, help="ingest only the source's first N images")
    parser.add_argument("--label-names", default=None,
                        help="array sources: class names, fashion-mnist, mnist, a file with one name per line, or a "
                             "comma list (default: from the source; IDX: from the directory name)")
    parser.add_argument("--json", action="store_true",
                        help="print the result (added, skipped per reason with example paths, ...) as JSON")
    parser.add_argument("--ray", choices=tuple(RAY_CHOICES), default="auto",
                        help="parallel shard tasks on Ray (use_ray): auto = when the source needs more than one "
                             "shard or a cluster is given by RAY_ADDRESS")
    return parser


def ingest(args: argparse.Namespace) -> int:
    """The job: resolve the options, check the storage, open the source and append its new images."""
    from pipelines.dataset.ingest import IngestOptions
    from pipelines.dataset.ingest import ingest as ingest_source
    from pipelines.dataset.sources import open_source

    options = resolve_options(IngestOptions, args.config, args.overrides, {
        "shard_size": args.shard_size, "max_pixels": args.max_pixels, "limit": args.limit,
        "use_ray": RAY_CHOICES[args.ray]})
    storage = open_storage(args)
    source = open_source(args.source, split=args.split, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region,
                         label_names=args.label_names)
    if options.use_ray is None:
        items = len(source.items) if options.limit is None else min(options.limit, len(source.items))
        options.use_ray = items > options.shard_size or bool(os.environ.get("RAY_ADDRESS"))
    if options.use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=True)
    result = ingest_source(storage, args.dataset, source, options, source_spec=args.source, split=args.split)
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(result.skipped.items())) or "none"
    logger.info("dataset %s: %d samples (+%d new, %d already present, %d skipped: %s) at %s", result.dataset,
                result.num_samples, result.added, result.already_present, sum(result.skipped.values()), skipped,
                storage.uri("datasets", result.dataset))
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "location": storage.uri("datasets", result.dataset)},
                         indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ingest; returns the process exit code (2 for errors a user can fix)."""
    return run_job(ingest, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
