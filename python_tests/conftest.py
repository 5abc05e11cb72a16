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


def pytest_sessionstart(session):
    # A compiled extension older than the C++ sources it is built from runs yesterday's kernels:
    # the tests then pass or fail for code that is no longer there (a stale build showed three
    # fuzz findings that the sources had already fixed). Only in a source checkout (csrc/ next
    # to the imported package); a copied extension carries the copy's time and is not caught.
    import glob

    import specreg_fast

    if not specreg_fast.HAS_CPP_EXT:
        return
    from specreg_fast import _C

    root = os.path.dirname(os.path.dirname(os.path.abspath(specreg_fast.__file__)))
    patterns = ["*.h", "*.cpp", "cpu/*"] + (["cuda/*"] if specreg_fast.HAS_CUDA_EXT else [])
    sources = [f for p in patterns for f in glob.glob(os.path.join(root, "csrc", p))]
    if sources:
        newest = max(sources, key=os.path.getmtime)
        if os.path.getmtime(newest) > os.path.getmtime(_C.__file__):
            pytest.exit(f"the compiled extension {_C.__file__} is older than {newest}: rebuild it "
                        f"(python setup.py build_ext --inplace, or make build) before testing", returncode=4)
