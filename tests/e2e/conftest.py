"""Fixtures for the end-to-end tests (defined in tests/fixtures.py so that other test folders reuse them)."""

from tests.fixtures import moto_endpoint  # noqa: F401
