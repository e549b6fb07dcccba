"""Benchmarks of careservice against its own ceilings and Postfix: `python -m bench [--quick]`."""
