"""Small helpers shared by the job entrypoints: storage arguments and logging setup."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipelines.storage import Storage


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--storage ROOT`` (required), ``--s3-endpoint URL`` and ``--s3-region``."""
    parser.add_argument("--storage", required=True, metavar="ROOT",
                        help="local directory or s3://bucket/prefix holding datasets/ and runs/")
    parser.add_argument("--s3-endpoint", default=os.environ.get("SECU_S3_ENDPOINT"), metavar="URL",
                        help="S3 endpoint (MinIO, moto, ...); default $SECU_S3_ENDPOINT or AWS. Credentials "
                             "come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")
    parser.add_argument("--s3-region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        help="region used to sign S3 requests (default $AWS_DEFAULT_REGION or us-east-1)")


SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the entrypoint process of a ``ray job submit`` job."""


def running_as_submitted_job() -> bool:
    """True inside the entrypoint of a job started by ``ray job submit`` (or the job SDK)."""
    return SUBMITTED_JOB_ENV in os.environ


def storage_from_args(args: argparse.Namespace) -> Storage:
    """The validated Storage of ``add_storage_args``' arguments (ValueError on a bad root).

    Inside a submitted job the working directory is the uploaded copy of ``--working-dir``, which Ray
    deletes with the job, so a relative local root is refused there.
    """
    root = str(args.storage)
    if running_as_submitted_job() and "://" not in root and not os.path.isabs(os.path.expanduser(root)):
        raise ValueError(
            f"--storage {root!r} is a relative path inside a `ray job submit` job, where it would point into the "
            "job's uploaded working directory (deleted with the job, and on one node only): pass "
            "s3://bucket/prefix, or an absolute path that every node of the cluster shares"
        )
    return Storage(root, s3_endpoint=args.s3_endpoint or None, s3_region=args.s3_region)


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a job process (time, level, logger name, message)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
