"""Benchmarks: one script per claim, each run as ``python -m benchmarks.<name> [--quick] [--out FILE]``."""
