"""Benchmarks for mpx: run as `python -m benchmarks.<name>` (see each module's docstring)."""
