"""``jobs.common.run_job``: which errors end a job with exit code 2 (or 3) and a message, which propagate."""

from __future__ import annotations

import argparse
import errno
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs.common import (
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_USER_ERROR,
    classify_error,
    job_parser,
    run_job,
)
from pipelines.dataset.bad_input import BadInputError
from pipelines.run_lock import LockHeldError

REPO = Path(__file__).resolve().parents[2]


def raising(err: BaseException) -> Callable[[argparse.Namespace], int]:
    def body(args: argparse.Namespace) -> int:
        raise err

    return body


def run(body: Callable[[argparse.Namespace], int]) -> int:
    return run_job(body, job_parser("secu test", None, storage=False), [])


@pytest.mark.parametrize(("err", "code", "kind"), [
    (ValueError("optim.lr=-1 must be positive"), EXIT_USER_ERROR, "bad configuration"),
    (FileNotFoundError("dataset 'x' does not exist"), EXIT_USER_ERROR, "not found"),
    (PermissionError("cannot access bucket 'b'"), EXIT_USER_ERROR, "storage"),
    (ConnectionError("cannot reach S3 endpoint"), EXIT_USER_ERROR, "storage"),
    (OSError("When reading 'x': AWS Error ACCESS_DENIED during HeadObject operation"), EXIT_USER_ERROR, "storage"),
    (OSError(errno.ENOSPC, "No space left on device"), EXIT_USER_ERROR, "storage"),
    (BadInputError("too much bad input: 5 of 20 samples bad"), EXIT_USER_ERROR, "bad input"),
    (LockHeldError("another run holds lock runs/b/_recluster.lock"), EXIT_LOCKED, "refused"),
])
def test_user_errors_give_their_exit_code_and_one_line(err: BaseException, code: int, kind: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert run(raising(err)) == code
    [message] = caplog.messages
    assert message.startswith(f"secu test: {kind}: {' '.join(str(err).split())}")
    if "AWS Error" in str(err):
        assert message.endswith("(check --storage, --s3-endpoint and the AWS_* credentials in the environment)")


@pytest.mark.parametrize("err", [ZeroDivisionError("division by zero"), RuntimeError("a bug"),
                                 TypeError("'int' object is not iterable"), KeyError("x"),
                                 OSError(errno.EIO, "Input/output error")])
def test_bugs_propagate(err: BaseException) -> None:
    with pytest.raises(type(err)):
        run(raising(err))


def test_a_value_error_from_inside_a_library_is_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    """Only our own ``raise`` of a ValueError names a setting to fix; numpy's, even on our call, is a bug."""
    import numpy as np

    def shape_bug(args: argparse.Namespace) -> int:
        np.concatenate([np.zeros((2, 2)), np.zeros((2, 3))])
        return 0

    with pytest.raises(ValueError, match="dimensions"):
        run(shape_bug)
    with caplog.at_level(logging.ERROR):
        assert run(raising(ValueError("optim.lr=-1 must be positive"))) == EXIT_USER_ERROR


def test_a_remote_value_error_is_judged_by_its_traceback_text() -> None:
    from ray.exceptions import RayTaskError

    ours = (f'Traceback (most recent call last):\n  File "{REPO}/secu/overrides.py", line 25, in merge\n'
            '    raise ValueError(\nValueError: unknown config key')
    numpy = (f'Traceback (most recent call last):\n  File "{REPO}/secu/kmeans.py", line 9, in fit\n'
             '    x = np.concatenate(parts)\nValueError: all the input array dimensions')
    user = RayTaskError("f", ours, ValueError("unknown config key 'optim.nokey'")).as_instanceof_cause()
    found = classify_error(user)
    assert found is not None and found.kind == "bad configuration"
    uploaded = ours.replace(str(REPO), "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_ab12")
    found = classify_error(RayTaskError("f", uploaded, ValueError("unknown config key")).as_instanceof_cause())
    assert found is not None, "a submitted job's workers run our code from Ray's uploaded copy"
    bug = RayTaskError("f", numpy, ValueError("all the input array dimensions")).as_instanceof_cause()
    assert classify_error(bug) is None


def test_interrupt_exits_130(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert run(raising(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert "interrupted" in caplog.text


def test_the_body_gets_the_parsed_arguments() -> None:
    parser = job_parser("secu test", None, set_help="override", storage=False)
    assert run_job(lambda args: len(args.overrides), parser, ["--set", "a=1", "--set", "b=2"]) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error, exit 2
        run_job(lambda args: 0, parser, ["--log-level", "LOUD"])
    assert exit_info.value.code == 2


SCRIPT = """
import sys
from jobs.common import job_parser, run_job
def body(args):
    if args.log_level != "INFO":
        raise FileNotFoundError("run 'r' has no checkpoint: train it first")
    return 1 // 0
sys.exit(run_job(body, job_parser("secu test", None, storage=False), sys.argv[1:]))
"""


def test_a_bug_prints_its_traceback_and_a_user_error_does_not() -> None:
    bug = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO)
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and "ZeroDivisionError" in bug.stderr
    user = subprocess.run([sys.executable, "-c", SCRIPT, "--log-level", "WARNING"], capture_output=True, text=True,
                          cwd=REPO)
    assert user.returncode == 2
    assert "Traceback" not in user.stderr
    assert user.stderr.strip().endswith("secu test: not found: run 'r' has no checkpoint: train it first")
    debug = subprocess.run([sys.executable, "-c", SCRIPT, "--log-level", "DEBUG"], capture_output=True, text=True,
                           cwd=REPO)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # asked for: the traceback of a user error


def test_botocore_errors_of_s3fs_are_storage_errors() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError

    unreachable = classify_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/x"))
    assert unreachable is not None and unreachable.kind == "storage"
    assert "http://127.0.0.1:9/bucket/x" in unreachable.message and "--s3-endpoint" in unreachable.message
    assert classify_error(NoCredentialsError()) is not None
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")
    assert classify_error(denied) is not None
    assert classify_error(ParamValidationError(report="bad parameter")) is None  # our call was wrong: a bug


def test_ray_wrappers_count_as_the_error_they_carry() -> None:
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    task = RayTaskError("decode", "Traceback ...\nBadInputError: too much", BadInputError("too much bad input: 3 of 9"))
    found = classify_error(task.as_instanceof_cause())
    assert found is not None and (found.kind, found.message) == ("bad input", "too much bad input: 3 of 9")
    workers = WorkerGroupError("rank 1 failed", {1: FileNotFoundError("shard-000001.tar does not exist")})
    found = classify_error(workers)
    assert found is not None and found.message == "shard-000001.tar does not exist"
    assert classify_error(WorkerGroupError("rank 0 failed", {0: ZeroDivisionError("x")})) is None
    assert classify_error(RayTaskError("f", "Traceback ...", ZeroDivisionError("x")).as_instanceof_cause()) is None


@pytest.mark.ray
def test_bad_input_raised_in_a_ray_data_task(ray_cluster: None, caplog: pytest.LogCaptureFixture) -> None:
    """Ray Data hands the driver a UserCodeException without the cause; the remote traceback names it."""
    import ray.data

    def decode(batch: dict[str, object]) -> dict[str, object]:
        raise BadInputError("too much bad input: 5 of 20 samples bad (the policy allows 2)")

    def body(args: argparse.Namespace) -> int:
        ray.data.range(4).map_batches(decode).materialize()
        return 0

    with caplog.at_level(logging.ERROR):
        assert run(body) == EXIT_USER_ERROR
    assert caplog.messages[-1] == "secu test: bad input: too much bad input: 5 of 20 samples bad (the policy allows 2)"
