"""The benchmark scripts' timing helpers: those of the installed package's suite."""
from specreg_fast.benchmarks.timing import (fmt_time, interleaved, machine, paired_overhead, read_bandwidth,  # noqa: F401
                                            save_json)
