"""Benchmarks (``python -m bench.<name>``): numbers, not asserts; see bench/RESULTS.md."""
