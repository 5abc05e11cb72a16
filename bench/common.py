"""The benchmark scripts' timing helpers: those of the installed package's suite."""
from specreg_fast.benchmarks.timing import fmt_time, interleaved, machine, read_bandwidth, save_json  # noqa: F401
