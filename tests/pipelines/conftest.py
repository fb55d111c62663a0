"""Fixtures for the pipeline tests (defined in tests/fixtures.py so that other test folders reuse them)."""

from tests.fixtures import moto_endpoint, ray_cluster, s3_bucket  # noqa: F401
