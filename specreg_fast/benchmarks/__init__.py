"""Kernel benchmarks that ship with the package: ``specreg-fast bench`` (see :mod:`.suite`).

``timing`` (interleaved medians, read bandwidth, machine info), ``suite`` (the rows, table,
JSON and plot), ``roofline`` (GPU memory-roofline estimates for machines without a GPU).
The scripts and pytest-benchmark wrappers in the repository's ``bench/`` build on these.
"""
