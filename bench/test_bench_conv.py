"""pytest-benchmark wrappers of bench_conv.py: `pytest bench/test_bench_conv.py --benchmark-only`."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_conv import RESNET18_CIFAR, make_specs, reference_steps  # noqa: E402
from specreg_fast import conv, ops  # noqa: E402


@pytest.mark.parametrize("layer", list(range(len(RESNET18_CIFAR))) + [None],
                         ids=lambda l: "resnet18" if l is None else "{}-{}-k{}-s{}-p{}-{}".format(*RESNET18_CIFAR[l]))
@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_conv_operator_step(benchmark, layer, impl):
    specs = make_specs()
    if layer is not None:
        specs = [specs[layer]]
    st = conv.init_conv_state(specs, generator=torch.Generator().manual_seed(0))
    if impl == "ours":
        params, modes = ops.pack_conv_params(specs)
        benchmark(ops.conv_power_step_, [s.weight for s in specs], st.xs, st.ys, params, modes, 1, 0.0)
    else:
        benchmark(reference_steps, specs, st.xs, 1)
