"""Compile every Triton kernel config ahead of time for sm_80 and sm_90 and save the
register / spill / shared-memory table (no GPU needed). Output: bench/triton_resource_usage.txt
and .json next to it.

    python bench/triton_resource_usage.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specreg_fast.triton import aot  # noqa: E402

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: AOT compilation needs the real triton.jit")
    import triton

    rows = aot.compile_all((80, 90))
    here = os.path.dirname(os.path.abspath(__file__))
    head = (f"# Triton {triton.__version__}: AOT cubin per kernel config (ptxas -v via {aot.ptxas_path()}).\n"
            "# regs per thread, spill bytes, stack bytes, smem = Triton metadata.shared (bytes).\n")
    table = head + aot.format_table(rows) + "\n"
    print(table)
    with open(os.path.join(here, "triton_resource_usage.txt"), "w") as f:
        f.write(table)
    with open(os.path.join(here, "triton_resource_usage.json"), "w") as f:
        json.dump(rows, f, indent=1)
