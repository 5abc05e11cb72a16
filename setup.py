"""Build script for specreg_fast.

The compiled libraries (see get_extensions): ``specreg_fast._C`` holds the op schemas
(``csrc/specreg_fast.cpp``) and every CPU kernel, on the LibTorch stable ABI,
``specreg_fast._C_cuda`` the CUDA kernels
(``csrc/cuda/``), built only when ``FORCE_CUDA=1`` or a GPU is visible, and ``CUDA_HOME``
points at a toolkit; a missing toolkit is never an error for a CPU build (the pytorch_scatter
convention).

Switches (environment variables):
  FORCE_CUDA=1      build the CUDA sources even without a visible GPU
  FORCE_ONLY_CPU=1  never build CUDA sources
  DEBUG=1           -O0 -g instead of -O3
  SPECREG_FAST_SANITIZE=1  AddressSanitizer + UBSan (-O1 -g, CPU only; `make sanitize`,
                    which builds into build/sanitize and preloads libasan into python)
  SPECREG_FAST_GENERIC=1  only the generic path of the CPU hot loops (no target_clones ISA
                    clones, no AVX-512 conv tiles; csrc/cpu/simd.h): to test what a CPU without
                    AVX2 runs (`make test-generic`)
  MAX_JOBS=N        parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from the nvcc on PATH; a symlinked /usr/local/bin/nvcc would make
# that /usr/local, which has no CUDA libraries. Prefer the toolkit's own directory.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    for _cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(_cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = _cand
            break

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.getenv(name, "0") == "1"


def _want_cuda():
    if _flag("FORCE_ONLY_CPU"):
        return False
    if CUDA_HOME is None or torch.version.cuda is None:
        if _flag("FORCE_CUDA"):
            print("specreg_fast: FORCE_CUDA=1 but no CUDA toolkit (CUDA_HOME) or CPU-only torch; "
                  "building the CPU extension only", file=sys.stderr)
        return False
    return _flag("FORCE_CUDA") or torch.cuda.is_available()


def _nvidia_wheel_includes():
    # torch's cu13 wheels ship the CUDA library headers (cuBLAS, cuSPARSE, ...) under
    # site-packages/nvidia/cu13/include rather than in CUDA_HOME.
    out = []
    torch_dir = os.path.dirname(torch.__file__)
    for cand in glob.glob(os.path.join(os.path.dirname(torch_dir), "nvidia", "cu*", "include")):
        out.append(cand)
    return out


# The oldest torch the stable-ABI library must load on: it is compiled against that torch's
# stable headers (TORCH_TARGET_VERSION), whatever torch builds it; pyproject.toml's torch floor.
TORCH_TARGET = (2, 11)
# The CPU conv kernels (also compiled, device-generic, into _C_cuda: csrc/cuda/conv_device_*.cpp).
CONV_SOURCES = ["cpu/conv_operator_cpu.cpp", "cpu/circular_conv_cpu.cpp", "cpu/conv_gemm_cpu.cpp"]
STABLE_SOURCES = ["specreg_fast.cpp", "cpu/power_step_cpu.cpp", "cpu/batched_power_cpu.cpp",
                  "cpu/shifted_cholesky_cpu.cpp", "cpu/simd.cpp", "cpu/lowrank_step_cpu.cpp",
                  "cpu/depthwise_cpu.cpp"] + CONV_SOURCES


class BuildExt(BuildExtension):
    """torch's BuildExtension, then specreg_fast/_build_info.py beside the built libraries (the
    source tree with --inplace, the wheel's build dir otherwise): the CUDA that _C_cuda was
    built against, which specreg_fast/ops.py reads before it loads the library (the library
    links that major's runtime, so another major cannot load it)."""

    def run(self):
        super().run()
        with_cuda = any(e.name == "specreg_fast._C_cuda" for e in self.extensions)
        out = os.path.join(ROOT if self.inplace else self.build_lib, "specreg_fast")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "_build_info.py"), "w") as f:
            f.write('"""Written by setup.py (BuildExt): the build of the compiled libraries."""\n')
            f.write(f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}  # None: built without _C_cuda\n")
            # the torch that built the libraries (both on the stable ABI of TORCH_TARGET on)
            f.write(f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n")


def get_extensions():
    """Two libraries, so that each loads where it can:

    * ``_C``: the schemas and every CPU kernel (dense, conv, batched, Cholesky), on the LibTorch
      stable ABI (one binary for every torch from ``TORCH_TARGET`` on; no CUDA dependency);
    * ``_C_cuda``: every CUDA kernel (with ``FORCE_CUDA=1`` or a visible GPU), loaded only on a
      torch of the same CUDA major; on the stable ABI too (its ``.cu`` kernels and the
      device-generic conv code of ``csrc/cpu/``), so any torch from ``TORCH_TARGET`` on."""
    debug = _flag("DEBUG")
    sanitize = _flag("SPECREG_FAST_SANITIZE")
    with_cuda = _want_cuda() and not sanitize
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -march=native: wheels must run on any x86-64. Hot loops pick their ISA at run time
    # through GCC function multi-versioning (see csrc/cpu/simd.h).
    cxx = opt + ["-fopenmp", "-fopenmp-simd", "-std=c++20"]  # torch adds -DPy_LIMITED_API itself
    if _flag("SPECREG_FAST_GENERIC"):
        cxx.append("-DSPECREG_GENERIC_ONLY")
    extra_link = ["-fopenmp"]
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        cxx = ["-O1", "-g"] + cxx[len(opt):] + san
        extra_link += san
    include = [os.path.join(ROOT, "csrc")]
    target = f"-DTORCH_TARGET_VERSION=0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"
    src = lambda names: [os.path.join("csrc", n) for n in names]  # noqa: E731
    exts = [
        CppExtension("specreg_fast._C", src(STABLE_SOURCES), include_dirs=include, extra_link_args=extra_link,
                     extra_compile_args={"cxx": cxx + [target]}, py_limited_api=True),
    ]
    if with_cuda:
        sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        arch = os.getenv("TORCH_CUDA_ARCH_LIST")
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-v", "-lineinfo"]
        if not arch:
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        # Every source of _C_cuda is on the stable ABI: nvcc and c++ compile them against the stable
        # headers of TORCH_TARGET (ATen/ATen.h refuses to compile with it, so nothing unstable slips in).
        exts.append(CUDAExtension(
            "specreg_fast._C_cuda", sources, define_macros=[("WITH_CUDA", None)], extra_link_args=extra_link,
            extra_compile_args={"cxx": cxx + ["-DWITH_CUDA", target], "nvcc": nvcc + [target]},
            include_dirs=include + _nvidia_wheel_includes(), py_limited_api=True))
    return exts


setup(
    packages=find_packages(include=["specreg_fast", "specreg_fast.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExt.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # abi3, from requires-python's 3.10
)
