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
