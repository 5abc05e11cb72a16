"""Build script for specreg_fast.

The C++ extension ``specreg_fast._C`` holds the op schemas (``csrc/specreg_fast.cpp``)
and the CPU kernels (``csrc/cpu/*.cpp``). CUDA sources (``csrc/cuda/*.cu``) are added
only when ``FORCE_CUDA=1`` or a GPU is visible, and ``CUDA_HOME`` points at a toolkit;
a missing toolkit is never an error for a CPU build (the pytorch_scatter convention).

Switches (environment variables):
  FORCE_CUDA=1      build the CUDA sources even without a visible GPU
  FORCE_ONLY_CPU=1  never build CUDA sources
  DEBUG=1           -O0 -g instead of -O3
  SPECREG_FAST_SANITIZE=1  AddressSanitizer + UBSan (-O1 -g, CPU only; `make sanitize`,
                    which builds into build/sanitize and preloads libasan into python)
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


def get_extensions():
    debug = _flag("DEBUG")
    sanitize = _flag("SPECREG_FAST_SANITIZE")
    with_cuda = _want_cuda() and not sanitize
    sources = [os.path.join("csrc", "specreg_fast.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -march=native: wheels must run on any x86-64. Hot loops pick their ISA at run time
    # through GCC function multi-versioning (see csrc/cpu/simd.h).
    cxx = opt + ["-fopenmp", "-fopenmp-simd", "-std=c++20"]  # torch adds -DPy_LIMITED_API itself
    define_macros = []
    extra_link = ["-fopenmp"]
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        cxx = ["-O1", "-g"] + cxx[len(opt):] + san
        extra_link += san
    ext_cls = CppExtension
    kwargs = {}
    if with_cuda:
        ext_cls = CUDAExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        define_macros.append(("WITH_CUDA", None))
        arch = os.getenv("TORCH_CUDA_ARCH_LIST")
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-v", "-lineinfo"]
        if not arch:
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc}
        kwargs["include_dirs"] = [os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes()
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        kwargs["include_dirs"] = [os.path.join(ROOT, "csrc")]
    return [
        ext_cls(
            "specreg_fast._C",
            sources,
            define_macros=define_macros,
            extra_link_args=extra_link,
            py_limited_api=True,
            **kwargs,
        )
    ]


setup(
    packages=find_packages(include=["specreg_fast", "specreg_fast.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
