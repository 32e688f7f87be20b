"""Benchmarks: side-by-side runs against named baselines; a table and JSON each."""
