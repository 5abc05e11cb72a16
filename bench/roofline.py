"""GPU memory-roofline ESTIMATES: ``python bench/roofline.py`` runs
``specreg_fast.benchmarks.roofline`` (the suite's copy, also printed by ``specreg-fast bench``
on a machine without a GPU)."""
import sys

from specreg_fast.benchmarks.roofline import main

if __name__ == "__main__":
    sys.exit(main() and 0)
