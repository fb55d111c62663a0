"""Cluster every image of a dataset with a trained run and publish Parquet: ``python -m jobs.infer``.

Examples:
    python -m jobs.infer --storage ./data --run-id fm
    python -m jobs.infer --storage s3://bucket/secu --s3-endpoint http://127.0.0.1:9000 --run-id fm \\
        --dataset new-images --with-embeddings
    python -m jobs.infer --storage ./data --run-id fm --checkpoint ./data/runs/fm/checkpoints/checkpoint_X \\
        --set batch_size=512 --set concurrency=4

Output: <storage>/runs/<run-id>/assignments/part-*.parquet (assignments-<dataset>/ for a dataset other
than the one the run trained on), one row per image with its source path or URI. Staged under
runs/<run-id>/_staging/ and published in one atomic step (a symbolic link switched locally; on S3 the
prefix holds _SUCCESS, which names the files). Re-running replaces the output; an interrupted run is
completed by running the same command again. A second inference of the same output is refused (exit 3).

Options (--config FILE holds them as key: value lines, --set KEY=VALUE sets one): batch_size, model_in,
concurrency, use_gpu, cpus_per_actor, with_embeddings, min_rows_per_file, max_bad_fraction.
model_in=tasks runs the model inside the read tasks (the default on CPUs), model_in=actors in a pool of model
actors (the default with GPUs or when concurrency is set).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common import job_parser, open_storage, run_job
from jobs.options import resolve_options

logger = logging.getLogger("jobs.infer")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the inference job."""
    parser = job_parser("secu infer", __doc__, config_help="YAML mapping of inference options (see above)",
                        set_help="override an inference option, e.g. batch_size=512 or min_rows_per_file=50000")
    parser.add_argument("--run-id", required=True, help="the training run whose checkpoint is used")
    parser.add_argument("--dataset", default=None,
                        help="dataset to cluster (default: the one the run trained on)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="a checkpoint directory (local or s3://) instead of the run's latest")
    parser.add_argument("--output-name", default=None,
                        help="output directory under the run (default assignments, or assignments-<dataset>)")
    parser.add_argument("--with-embeddings", action="store_true", default=None,
                        help="also write the embedding z of every image (with_embeddings=true)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model call (default 256)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="model actors (default: one per GPU, else half the CPUs)")
    parser.add_argument("--use-gpu", choices=("auto", "yes", "no"), default=None,
                        help="one GPU per actor (default auto: when the cluster has GPUs)")
    return parser


def infer(args: argparse.Namespace) -> int:
    """The job: resolve the options, check the storage, infer and publish."""
    from pipelines.outputs.inference import InferenceOptions, run_inference

    options = resolve_options(InferenceOptions, args.config, args.overrides, {
        "with_embeddings": args.with_embeddings, "batch_size": args.batch_size,
        "concurrency": args.concurrency, "use_gpu": args.use_gpu})
    storage = open_storage(args)
    result = run_inference(storage, args.run_id, dataset=args.dataset, checkpoint=args.checkpoint,
                           output_name=args.output_name, options=options)
    logger.info("published %d assignments of dataset %s (checkpoint epoch %d) at %s; %.0f images/s",
                result.rows, result.dataset, result.checkpoint_epoch, result.uri, result.images_per_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the inference; returns the exit code (2 for errors a user can fix)."""
    return run_job(infer, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
