"""Ingest images into WebDataset shards with stable ids: ``python -m jobs.ingest``.

Examples:
    python -m jobs.ingest --source idx:/usr/share/datasets/fashion-mnist --split all \
        --dataset fashion-mnist --storage ./data
    python -m jobs.ingest --source ./photos --dataset photos --storage s3://bucket/secu \
        --s3-endpoint http://127.0.0.1:9000
    python -m jobs.ingest --source cifar10:./cifar-10-batches-py --split train --dataset cifar10 \
        --storage ./data

Sources: idx:DIR (Fashion-MNIST/MNIST), cifar10:DIR, cifar100:DIR, cifar100-20:DIR, stl10:DIR,
folder:DIR or a plain directory (class sub-folders become labels), s3://bucket/prefix.
Re-running the same command adds nothing; running it after new images arrived appends them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common import add_storage_args, setup_logging, storage_from_args
from pipelines.dataset.info import MAX_SHARD_SIZE

logger = logging.getLogger("jobs.ingest")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the ingest job."""
    parser = argparse.ArgumentParser(prog="secu ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="what to ingest (see above)")
    parser.add_argument("--dataset", required=True, help="dataset name under <storage>/datasets")
    parser.add_argument("--split", default="train",
                        help="array sources: train, test, unlabeled (STL-10), a comma list, or all")
    parser.add_argument("--shard-size", type=int, default=10_000,
                        help=f"samples per shard (1..{MAX_SHARD_SIZE})")
    parser.add_argument("--max-pixels", type=int, default=50_000_000,
                        help="file sources: skip (and count) images with more pixels")
    parser.add_argument("--limit", type=int, default=None, help="ingest only the source's first N images")
    parser.add_argument("--ray", choices=("auto", "on", "off"), default="auto",
                        help="parallel shard tasks on Ray: auto = when the source needs more than one "
                             "shard or a cluster is given by RAY_ADDRESS")
    parser.add_argument("--log-level", default="INFO")
    add_storage_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ingest; returns the process exit code (2 for errors a user can fix)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    import os

    from pipelines.dataset.ingest import IngestOptions, ingest
    from pipelines.dataset.sources import open_source

    try:
        storage = storage_from_args(args)
        options = IngestOptions(shard_size=args.shard_size, max_pixels=args.max_pixels, limit=args.limit)
        source = open_source(args.source, split=args.split, s3_endpoint=args.s3_endpoint,
                             s3_region=args.s3_region)
        items = len(source.items) if args.limit is None else min(args.limit, len(source.items))
        use_ray = args.ray == "on" or (
            args.ray == "auto" and (items > args.shard_size or bool(os.environ.get("RAY_ADDRESS")))
        )
        if use_ray:
            import ray

            if not ray.is_initialized():
                ray.init(log_to_driver=True)
        options.use_ray = use_ray
        result = ingest(storage, args.dataset, source, options, source_spec=args.source, split=args.split)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, RuntimeError) as err:
        logger.error("%s", err)
        return 2
    logger.info("dataset %s: %d samples (+%d new, %d already present, skipped %s) at %s", result.dataset,
                result.num_samples, result.added, result.already_present, result.skipped or "none",
                storage.uri("datasets", result.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
