import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    import specreg_fast

    return (f"specreg_fast: HAS_CPP_EXT={specreg_fast.HAS_CPP_EXT} HAS_CUDA_EXT={specreg_fast.HAS_CUDA_EXT} "
            f"torch={torch.__version__} threads={torch.get_num_threads()} FORCE_CUDA={os.getenv('FORCE_CUDA')}")
