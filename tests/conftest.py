"""Shared test settings: Ray's token auth is disabled deliberately for local test clusters."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# The heaviest end-to-end checks (a real `ray start --head` + `ray job submit`, simulated autoscaling,
# repeated warm-started training runs) are kept out of the default run to hold it well under 20
# minutes on 2 cores; `make test-slow` runs them.
_SLOW_PATHS = ("tests/e2e/", "tests/jobs/test_recluster.py")
_SLOW_TESTS: tuple[str, ...] = ()


def pytest_collection_modifyitems(config: object, items: list) -> None:  # type: ignore[type-arg]
    import pytest

    for item in items:
        path = str(item.path).replace("\\", "/")
        if any(p in path for p in _SLOW_PATHS) or item.name in _SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
