"""Every CUDA kernel of the package runs under the host emulation (scripts/cuda_emulate, the
tests in test_cuda_build.py and test_lowrank_step.py): each ``__global__`` function of csrc/cuda/
is launched by a launch sequence of a csrc/cuda/*.cuh header (launch_power_steps, launch_sigma,
launch_lowrank_steps), the host code launches kernels only through those sequences and the one
launcher (csrc/cuda/stream_launcher.cuh), and the emulator runs every sequence. A new kernel fails
this test until the emulator drives it too."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
# a kernel named in a launch sequence: launch(&name_kernel<...>, grid, block, args...)
_SEQ_LAUNCH = re.compile(r"\blaunch\(\s*&(\w+_kernel)\s*<")
_SEQUENCE = re.compile(r"^void\s+(launch_\w+)\s*\(", re.M)


def _read(paths):
    out = ""
    for p in paths:
        with open(p) as f:
            out += f.read()
    return out


def test_every_cuda_kernel_is_emulated():
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu*"))
    kernels = set(_GLOBAL.findall(_read(cuda_sources)))
    assert {"fused_rows_kernel", "reduce_partials_kernel", "finalize_kernel", "bilinear_rows_kernel",
            "sum_tiles_kernel"} <= kernels, kernels
    headers = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))
    seq_header = _read(headers)
    launched = set(_SEQ_LAUNCH.findall(seq_header))
    assert kernels <= launched, f"CUDA kernels in no launch sequence: {sorted(kernels - launched)}"
    sequences = set(_SEQUENCE.findall(seq_header))
    assert {"launch_power_steps", "launch_sigma", "launch_lowrank_steps"} <= sequences, sequences
    emulator = _read(glob.glob(os.path.join(ROOT, "scripts", "cuda_emulate", "*.cpp")))
    missing = [s for s in sorted(sequences) if not re.search(rf"\b{s}\s*<", emulator)]
    assert not missing, f"launch sequences not run by scripts/cuda_emulate: {missing}"
    # the host code launches through the sequences only: one <<<...>>> (the launcher), no kernel by name
    host = _read(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    launcher = _read([os.path.join(ROOT, "csrc", "cuda", "stream_launcher.cuh")])
    assert launcher.count("<<<") == 1 and (host + seq_header).count("<<<") == 1, \
        "csrc/cuda/ launches kernels outside the shared launch sequences"
    assert not {k for k in kernels if re.search(rf"\b{k}\b", host)}, "a .cu names a kernel directly"
