"""What every job entrypoint shares: its parser's common options, the storage it opens, and ``run_job``.

``run_job`` decides, once for all jobs, which errors a user can fix: those end the job with exit code 2
(3 for a held lock) and one paragraph on stderr, without a traceback; every other exception is a bug and
propagates with its traceback. ``--log-level DEBUG`` also logs the traceback of a user error.
"""

from __future__ import annotations

import argparse
import linecache
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import bad_input_in_text, disk_full, inner_errors
from pipelines.run_lock import LockHeldError
from pipelines.storage import Storage

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
"""A problem the user can fix: bad value or key, missing dataset/run/checkpoint, storage, bad input."""
EXIT_LOCKED = 3
"""Another run holds the lock of the series or dataset (``LockHeldError``): retry when it has finished."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT), as a shell reports it."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the entrypoint process of a ``ray job submit`` job."""

_STORAGE_HINT = "check --storage, --s3-endpoint and the AWS_* credentials in the environment"


def job_parser(prog: str, description: str | None, *, config_help: str | None = None,
               set_help: str | None = None, storage: bool = True) -> argparse.ArgumentParser:
    """A job's parser with ``--log-level``, the storage options and, when helps are given, ``--config FILE``
    and ``--set KEY=VALUE``; the job adds its own options to it."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = parser.add_argument_group("configuration and logging")
    if config_help:
        common.add_argument("--config", type=Path, default=None, metavar="FILE", help=config_help)
    if set_help:
        common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help=f"{set_help}; repeatable, applied after --config and the shortcut options")
    common.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO",
                        help="log level (default INFO; DEBUG also logs the traceback of an error)")
    if storage:
        add_storage_args(parser.add_argument_group("storage"))
    return parser


def add_storage_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--storage ROOT`` (required), ``--s3-endpoint URL`` and ``--s3-region``."""
    parser.add_argument("--storage", required=True, metavar="ROOT",
                        help="local directory or s3://bucket/prefix holding datasets/ and runs/")
    parser.add_argument("--s3-endpoint", default=os.environ.get("SECU_S3_ENDPOINT"), metavar="URL",
                        help="S3 endpoint (MinIO, moto, ...); default $SECU_S3_ENDPOINT or AWS. Credentials "
                             "come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")
    parser.add_argument("--s3-region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        help="region used to sign S3 requests (default $AWS_DEFAULT_REGION or us-east-1)")


def running_as_submitted_job() -> bool:
    """True inside the entrypoint of a job started by ``ray job submit`` (or the job SDK)."""
    return SUBMITTED_JOB_ENV in os.environ


def storage_from_args(args: argparse.Namespace) -> Storage:
    """The validated Storage of ``add_storage_args``' arguments (ValueError on a bad root); no I/O.

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


def open_storage(args: argparse.Namespace) -> Storage:
    """``storage_from_args``, checked to be reachable (bucket, endpoint, credentials) before any work."""
    storage = storage_from_args(args)
    storage.check_reachable()
    return storage


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a job process (time, level, logger name, message)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@dataclass(frozen=True)
class UserFailure:
    """How ``run_job`` reports an exception the user can fix."""

    exit_code: int
    kind: str
    """What went wrong, in words: bad configuration, not found, storage, bad input, refused."""
    message: str


def run_job(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: list[str] | None) -> int:
    """Parse ``argv``, set up logging and run ``body``; returns the exit code of the job.

    ``classify_error`` is the one place that decides what a user can fix; anything else propagates.
    """
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return body(args)
    except KeyboardInterrupt:
        logger.error("%s: interrupted", parser.prog)
        return EXIT_INTERRUPTED
    except Exception as err:
        found = classify_error(err)
        if found is None:
            raise
        logger.debug("%s: traceback of the error below", parser.prog, exc_info=True)
        logger.error("%s: %s: %s", parser.prog, found.kind, found.message)
        return found.exit_code


def classify_error(err: BaseException) -> UserFailure | None:
    """The report of an error the user can fix, None for a bug (see the module docstring).

    User errors: ``LockHeldError`` (exit 3); ``BadInputError`` (the bad-input budget); ``FileNotFoundError``
    (a missing dataset, run, checkpoint or config file); ``ValueError`` raised by our own code (a bad value or
    key: ``raised_by_our_code``; one raised inside numpy, torch or another library is a bug); and storage
    errors: ``PermissionError``, ``ConnectionError``, ``TimeoutError``, ``NotADirectoryError``,
    ``IsADirectoryError``, a full or read-only disk, pyarrow's S3 ``OSError`` ("AWS Error ...") and botocore's
    connection, credential and client errors (s3fs). Ray's wrappers (a failed task, Ray Data UDF or Train
    worker) count as the error they carry.
    """
    if _is_ray_error(err):
        return _classify_ray_error(err)
    bad_input = _loaded_class("pipelines.dataset.bad_input", "BadInputError")
    damaged = _loaded_class("pipelines.training.checkpoint_integrity", "CheckpointDamagedError")
    if isinstance(err, LockHeldError):
        return UserFailure(EXIT_LOCKED, "refused", _one_paragraph(err))
    if bad_input is not None and isinstance(err, bad_input):
        return UserFailure(EXIT_USER_ERROR, "bad input", _one_paragraph(err))
    if damaged is not None and isinstance(err, damaged):
        return UserFailure(EXIT_USER_ERROR, "damaged checkpoint", _one_paragraph(err))
    if isinstance(err, FileNotFoundError):
        return UserFailure(EXIT_USER_ERROR, "not found", _one_paragraph(err))
    if isinstance(err, ValueError) and raised_by_our_code(err):
        return UserFailure(EXIT_USER_ERROR, "bad configuration", _one_paragraph(err))
    if isinstance(err, PermissionError | ConnectionError | TimeoutError | NotADirectoryError | IsADirectoryError):
        return UserFailure(EXIT_USER_ERROR, "storage", _one_paragraph(err))
    if disk_full(err):
        return UserFailure(EXIT_USER_ERROR, "storage", _one_paragraph(err))
    if isinstance(err, OSError) and "AWS Error" in str(err):
        return UserFailure(EXIT_USER_ERROR, "storage", f"{_one_paragraph(err)} ({_STORAGE_HINT})")
    if isinstance(err, _botocore_errors()):
        return UserFailure(EXIT_USER_ERROR, "storage", f"{type(err).__name__}: {_one_paragraph(err)} ({_STORAGE_HINT})")
    return None


_OUR_TOP_DIRS = ("secu", "pipelines", "jobs", "benchmarks", "tests")
_REPO_ROOT = Path(__file__).resolve().parents[1]
_REMOTE_FRAME = re.compile(r'File "([^"]+)", line \d+, in [^\n]*\n[ \t]*([^\n]*)')


def raised_by_our_code(err: BaseException) -> bool:
    """Whether ``err`` comes from a ``raise`` statement in this repository's packages (``secu``, ``pipelines``,
    ``jobs``, ...): those name a value or key to fix, while a ValueError from inside numpy, torch or another
    library (a shape mismatch, also when our code made the call) is a bug whose traceback must show. Read from
    the innermost frame; an error that crossed a process boundary keeps no traceback object, and then its
    remote traceback text decides; with neither it counts as ours (the message is all there is)."""
    tb = err.__traceback__
    if tb is None:
        return _remote_origin_ours(err)
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return _our_raise(filename, linecache.getline(filename, tb.tb_lineno))


def _remote_origin_ours(err: BaseException) -> bool:
    """``raised_by_our_code`` from the remote traceback text a Ray wrapper carries (True without any)."""
    frames = _REMOTE_FRAME.findall(f"{err}\n{getattr(err, 'traceback_str', '') or ''}")
    return _our_raise(*frames[-1]) if frames else True


def _our_raise(filename: str, line: str) -> bool:
    """Whether ``line`` is a ``raise`` in one of our files. A file is ours when a tail of its path that starts at
    one of our package folders is a file of this copy of the code: that holds here, and for the paths of another
    process or node (Ray's uploaded working directory of a submitted job, another site-packages)."""
    if not line.strip().startswith("raise"):
        return False
    parts = Path(filename).parts
    return any(part in _OUR_TOP_DIRS and _REPO_ROOT.joinpath(*parts[i:]).is_file() for i, part in enumerate(parts))


def _one_paragraph(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _loaded_class(module: str, name: str) -> type[BaseException] | None:
    """A class of a module only when that module is imported (no instance can exist otherwise)."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _botocore_errors() -> tuple[type[BaseException], ...]:
    """botocore's (s3fs') unreachable-endpoint, timeout, credential and S3 error classes, when loaded."""
    names = ("ConnectionError", "HTTPClientError", "NoCredentialsError", "PartialCredentialsError", "ClientError")
    found = (_loaded_class("botocore.exceptions", name) for name in names)
    return tuple(cls for cls in found if cls is not None)


def _is_ray_error(err: BaseException) -> bool:
    module = type(err).__module__
    return module == "ray" or module.startswith("ray.")


def _classify_ray_error(err: BaseException) -> UserFailure | None:
    for inner in inner_errors(err):
        if isinstance(inner, ValueError) and inner.__traceback__ is None and not _remote_origin_ours(err):
            continue  # raised inside a library on the remote side: a bug
        found = classify_error(inner)
        if found is not None:
            return found
    message = bad_input_in_text(err)  # a Ray Data UDF's error reaches the driver only as text
    if message is not None:
        return UserFailure(EXIT_USER_ERROR, "bad input", message)
    return None
