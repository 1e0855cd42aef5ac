"""Benchmarks for Trackstar Mirror: `make bench` (python -m bench)."""
