"""Every CUDA kernel of the package runs under the host emulation (scripts/cuda_emulate, the
tests in test_cuda_build.py): each ``__global__`` function of csrc/cuda/ is launched by the
emulator. A new kernel fails this test until the emulator drives it too."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
_LAUNCH = re.compile(r"\b(\w+_kernel)\s*<[^;]*?>\s*\(")


def _kernels_in(paths, pattern):
    found = set()
    for p in paths:
        with open(p) as f:
            found |= set(pattern.findall(f.read()))
    return found


def test_every_cuda_kernel_is_emulated():
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu*"))
    kernels = _kernels_in(cuda_sources, _GLOBAL)
    assert {"fused_rows_kernel", "reduce_partials_kernel", "finalize_kernel", "bilinear_rows_kernel",
            "sum_tiles_kernel"} <= kernels, kernels
    emulated = _kernels_in(glob.glob(os.path.join(ROOT, "scripts", "cuda_emulate", "*.cpp")), _LAUNCH)
    assert kernels <= emulated, f"CUDA kernels not run by scripts/cuda_emulate: {sorted(kernels - emulated)}"
