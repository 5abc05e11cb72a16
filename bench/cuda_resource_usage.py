"""Register / spill / shared-memory report of the compiled CUDA kernels (no GPU needed).

Runs ``cuobjdump --dump-resource-usage`` on the built extension (``specreg_fast/_C_cuda.so``, built
with FORCE_CUDA=1) and writes bench/cuda_resource_usage.txt: one line per (arch, kernel) with
REG (registers per thread), STACK and LOCAL (bytes; nonzero LOCAL means spills) and SHARED
(static shared memory, bytes). The raw cuobjdump output is appended.

    FORCE_CUDA=1 python setup.py build_ext --inplace && python bench/cuda_resource_usage.py
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuobjdump_path() -> str:
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
             shutil.which("cuobjdump") or ""]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise FileNotFoundError("cuobjdump not found (CUDA_HOME/bin, PATH, triton's bundled bin)")


def extension_path() -> str:
    hits = sorted(glob.glob(os.path.join(ROOT, "specreg_fast", "_C_cuda*.so")))  # the CUDA kernels' library
    if not hits:
        raise FileNotFoundError("specreg_fast/_C_cuda*.so not built (FORCE_CUDA=1 python setup.py build_ext --inplace)")
    return hits[0]


def _demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    # "void specreg_fast::cuda::(anonymous namespace)::fused_rows_kernel<c10::BFloat16, float>(...)"
    m = re.search(r"::(\w+_kernel)(<[^()]*>)?\(", name)
    return (m.group(1) + (m.group(2) or "")) if m else name


def resource_usage(so: str) -> tuple:
    raw = subprocess.run([cuobjdump_path(), "--dump-resource-usage", so], capture_output=True, text=True,
                         check=True).stdout
    rows: List[Dict[str, object]] = []
    arch = None
    pending = None
    for line in raw.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            pending = m.group(1)
            continue
        if pending and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(dict(arch=arch, mangled=pending, REG=int(vals.get("REG", 0)), STACK=int(vals.get("STACK", 0)),
                             SHARED=int(vals.get("SHARED", 0)), LOCAL=int(vals.get("LOCAL", 0))))
            pending = None
    for r, d in zip(rows, _demangle([r["mangled"] for r in rows])):
        r["kernel"] = _short(d)
    return rows, raw


def format_table(rows) -> str:
    head = f"{'arch':<6} {'kernel':<48} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SHARED':>6}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        lines.append(f"{r['arch']:<6} {r['kernel']:<48} {r['REG']:>4} {r['STACK']:>5} {r['LOCAL']:>5} {r['SHARED']:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    so = extension_path()
    rows, raw = resource_usage(so)
    if not rows:
        sys.exit(f"{so} has no CUDA kernels: build with FORCE_CUDA=1")
    text = (f"# cuobjdump --dump-resource-usage {os.path.relpath(so, ROOT)}\n"
            "# REG: registers/thread; STACK, LOCAL (spills), SHARED (static smem): bytes\n"
            + format_table(rows) + "\n\n# raw cuobjdump output\n" + raw)
    print(format_table(rows))
    with open(os.path.join(ROOT, "bench", "cuda_resource_usage.txt"), "w") as f:
        f.write(text)
