"""Shared test settings: Ray's token auth is disabled deliberately for local test clusters.

The test process ends with ``os._exit(<pytest's exit status>)`` once pytest has reported and every other
``pytest_unconfigure`` ran: two default runs of 693 tests that had all passed or reported their failures then died
with a segmentation fault (exit 139) in the interpreter's finalisation, where native libraries loaded by the tests
(pyarrow's S3 client, Ray, torch's threads) are torn down; pyarrow's S3 is known to crash there intermittently
(apache/arrow#38352). The status is pytest's own, so a failing test still fails the run.
``SECU_TEST_NORMAL_EXIT=1`` keeps the normal interpreter exit (to reproduce the crash).
"""

import os
import sys

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# The heaviest end-to-end checks (a real `ray start --head` + `ray job submit`, simulated autoscaling,
# repeated warm-started training runs) are kept out of the default run to hold it well under 20
# minutes on 2 cores; `make test-slow` runs them.
_SLOW_PATHS = ("tests/e2e/", "tests/jobs/test_recluster.py")
_SLOW_TESTS: tuple[str, ...] = ()


def pytest_collection_modifyitems(config: object, items: list) -> None:  # type: ignore[type-arg]
    for item in items:
        path = str(item.path).replace("\\", "/")
        if any(p in path for p in _SLOW_PATHS) or item.name in _SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: object) -> None:
    if not _EXIT_STATUS or os.environ.get("SECU_TEST_NORMAL_EXIT") == "1":
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
