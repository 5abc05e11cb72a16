import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The CPU conv ops have two code paths for non-transposed convs: ATen (oneDNN) convolutions
# and the direct im2col kernels of csrc/cpu/conv_gemm_cpu.cpp. specreg_fast.conv.set_conv_kernel
# (or SPECREG_FAST_CONV_KERNEL, read once per process) forces one; "auto" (the default) picks
# by size. Transposed convs take the ATen path under every setting. Tests that take this
# fixture run once per setting; use_conv_kernel switches inside a test. Both restore the
# previous choice afterwards.
@pytest.fixture
def use_conv_kernel():
    from specreg_fast.conv import set_conv_kernel

    previous = []

    def use(choice):
        previous.append(set_conv_kernel(choice))

    yield use
    if previous:
        set_conv_kernel(previous[0])


@pytest.fixture(params=("auto", "direct", "aten"))
def conv_kernel(request, use_conv_kernel):
    use_conv_kernel(request.param)
    return request.param


def pytest_report_header(config):
    import specreg_fast

    return (f"specreg_fast: HAS_CPP_EXT={specreg_fast.HAS_CPP_EXT} HAS_CUDA_EXT={specreg_fast.HAS_CUDA_EXT} "
            f"torch={torch.__version__} threads={torch.get_num_threads()} FORCE_CUDA={os.getenv('FORCE_CUDA')}")


def _triton_is_cuda():
    try:
        from specreg_fast.triton import registered
    except ImportError:
        return False
    return "power_step_" in registered()


def pytest_sessionstart(session):
    # A compiled extension older than the C++ sources it is built from runs yesterday's kernels:
    # the tests then pass or fail for code that is no longer there (a stale build showed three
    # fuzz findings that the sources had already fixed). Only in a source checkout (csrc/ next
    # to the imported package); a copied extension carries the copy's time and is not caught.
    import glob

    import specreg_fast

    if not specreg_fast.HAS_CPP_EXT:
        return

    root = os.path.dirname(os.path.dirname(os.path.abspath(specreg_fast.__file__)))
    # each library against its own sources (setup.py): one may be rebuilt without the others
    conv = ["conv_geometry.h", "stable_*.h", "cpu/conv_*", "cpu/circular_conv_cpu.cpp"]
    libs = {"_C": ["specreg_fast.cpp", "cpu/power_step_cpu.cpp", "cpu/batched_power_cpu.cpp",
                   "cpu/shifted_cholesky_cpu.cpp", "cpu/simd.*"] + conv}
    if specreg_fast.HAS_CUDA_EXT and not _triton_is_cuda():
        libs["_C_cuda"] = conv + ["cuda/*", "stable_*.h"]  # the .cu kernels are on the stable ABI
    for name, patterns in libs.items():
        lib = glob.glob(os.path.join(os.path.dirname(specreg_fast.__file__), f"{name}.*so"))
        sources = [f for p in patterns for f in glob.glob(os.path.join(root, "csrc", p))]
        if not lib or not sources:
            continue
        newest = max(sources, key=os.path.getmtime)
        if os.path.getmtime(newest) > os.path.getmtime(lib[0]):
            pytest.exit(f"the compiled extension {lib[0]} is older than {newest}: rebuild it "
                        f"(python setup.py build_ext --inplace, or make build) before testing", returncode=4)
