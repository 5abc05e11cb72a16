"""pytest-benchmark wrappers: `pytest bench/ --benchmark-only` (compare runs with
--benchmark-autosave / --benchmark-compare)."""
import pytest
import torch

import specreg_fast as sf
from bench_dense import MLP, SHAPES, reference_step


@pytest.mark.parametrize("shape", SHAPES + [None], ids=lambda s: "mlp" if s is None else f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_dense_step(benchmark, shape, impl):
    Ws = [torch.randn(*s) for s in ([shape] if shape else MLP)]
    st = sf.init_power_state(Ws)
    if impl == "ours":
        benchmark(sf.ops.power_step_, Ws, st.us, st.vs, 1, 0.0)
    else:
        benchmark(reference_step, Ws, st.us, st.vs)
