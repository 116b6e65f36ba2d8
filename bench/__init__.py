"""Benchmarks: `python -m bench.inference`, `bench.training`, `bench.scaling` (see docs/benchmarks.md)."""
