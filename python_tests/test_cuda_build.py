"""The CUDA side, proven without a GPU: the extension built with FORCE_CUDA=1 registers CUDA
kernels for the dense ops and its cubins for sm_80/sm_90 have no spills; backend selection
follows the documented order; the Triton kernels become the CUDA implementation when the
extension has none.

GPU execution itself is tested only where ``torch.cuda.is_available()`` (never on CI).
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import specreg_fast
from specreg_fast import backends, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_had_cuda() -> bool:
    """``make test`` exports FORCE_CUDA=1 whenever nvcc exists; then the build must have CUDA."""
    nvcc = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    return (os.environ.get("FORCE_CUDA") == "1" and bool(nvcc) and torch.version.cuda is not None
            and os.environ.get("FORCE_ONLY_CPU") != "1")


needs_cuda_build = pytest.mark.skipif(not _build_had_cuda(),
                                      reason="extension not built with CUDA (needs FORCE_CUDA=1, nvcc and a CUDA "
                                             "torch)")


@needs_cuda_build
def test_cuda_kernels_registered_for_dense_ops():
    assert specreg_fast.HAS_CPP_EXT
    for op in ("power_step_", "sigma"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"specreg_fast::{op}", "CUDA"), op
    assert specreg_fast.HAS_CUDA_EXT
    # The CUDA kernels are the extension's, so the Triton ones were not registered over them.
    from specreg_fast.triton import registered

    assert registered() == []
    assert "cuda" in backends.available(torch.device("cuda"))
    assert backends.resolve("auto", torch.device("cuda")) == "cuda"


@needs_cuda_build
def test_cuda_cubins_for_sm80_sm90_without_spills():
    spec = importlib.util.spec_from_file_location("cuda_resource_usage",
                                                  os.path.join(ROOT, "bench", "cuda_resource_usage.py"))
    cru = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cru)
    try:
        so = cru.extension_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    import specreg_fast._C as C

    assert os.path.samefile(so, C.__file__), "report must be about the extension that was imported"
    rows, _ = cru.resource_usage(so)
    print()
    print(cru.format_table(rows))
    for arch in ("sm_80", "sm_90"):
        names = {r["kernel"] for r in rows if r["arch"] == arch}
        for k in ("fused_rows_kernel<float, float>", "fused_rows_kernel<c10::BFloat16, float>",
                  "fused_rows_kernel<c10::Half, float>", "fused_rows_kernel<double, double>",
                  "reduce_partials_kernel<float>", "finalize_kernel<float>", "bilinear_rows_kernel<float, float>",
                  "sum_tiles_kernel<float>"):
            assert k in names, (arch, k, sorted(names))
    spilled = [(r["arch"], r["kernel"]) for r in rows if r["LOCAL"] or r["STACK"]]
    assert not spilled, spilled


# ----------------------------------------------------------------------------- backend selection
def test_auto_order_on_cpu():
    expect = "cpp" if ops.HAS_CPP_EXT else "reference"
    assert backends.resolve("auto", torch.device("cpu")) == expect
    assert backends.available(torch.device("meta")) == ["reference"]
    assert backends.resolve("auto", torch.device("meta")) == "reference"


def test_unavailable_or_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        backends.resolve("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="'cuda' is not available for cpu"):
        backends.resolve("cuda", torch.device("cpu"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="'triton' is not available for cpu"):
            backends.resolve("triton", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["auto", "reference"] + (["cpp"] if ops.HAS_CPP_EXT else []))
def test_spectral_norms_backend_keyword_agrees(backend):
    torch.manual_seed(0)
    weights = [torch.randn(30, 20), torch.randn(12, 40, dtype=torch.float64)]
    st_a = specreg_fast.init_power_state(weights, generator=torch.Generator().manual_seed(1))
    st_b = specreg_fast.init_power_state(weights, generator=torch.Generator().manual_seed(1))
    got = specreg_fast.spectral_norms(weights, st_a, n_iter=5, backend=backend)
    ref = specreg_fast.spectral_norms(weights, st_b, n_iter=5, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(st_a.us + st_a.vs, st_b.us + st_b.vs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_spectral_norms_bad_backend_leaves_state_alone():
    W = torch.randn(6, 4)
    st = specreg_fast.init_power_state([W])
    v0 = st.vs[0].clone()
    with pytest.raises(ValueError, match="backend"):
        specreg_fast.spectral_norms([W], st, backend="nope")
    with pytest.raises(ValueError, match="backend"):
        specreg_fast.spectral_norms([W], st, backend="nope", update=False)
    assert torch.equal(st.vs[0], v0)


_REGISTER_WITHOUT_EXTENSION = r"""
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "specreg_fast._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, _Block())
import warnings; warnings.simplefilter("ignore")
import torch, specreg_fast
from specreg_fast import triton as tb
assert not specreg_fast.HAS_CPP_EXT
before = torch._C._dispatch_has_kernel_for_dispatch_key("specreg_fast::power_step_", "CUDA")
got = tb.register()
after = [torch._C._dispatch_has_kernel_for_dispatch_key(f"specreg_fast::{op}", "CUDA") for op in ("power_step_", "sigma")]
print(before, sorted(got), after, tb.register() == got)
"""


def test_triton_registers_as_cuda_kernel_when_extension_has_none():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _REGISTER_WITHOUT_EXTENSION], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False ['power_step_', 'sigma'] [True, True] True", r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_backends_match_reference(backend, dtype):
    if backend not in backends.available(torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    weights = [torch.randn(m, n, device="cuda").to(dtype) for m, n in ((1000, 784), (784, 1024), (64, 3), (5, 0))]
    st_a = specreg_fast.init_power_state(weights, generator=torch.Generator().manual_seed(2))
    st_b = specreg_fast.init_power_state(weights, generator=torch.Generator().manual_seed(2))
    got = backends.power_step_(weights, st_a.us, st_a.vs, 4, 0.0, backend=backend)
    ref = backends.power_step_(weights, st_b.us, st_b.vs, 4, 0.0, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_dense_ops_opcheck():
    weights = [torch.randn(64, 48, device="cuda"), torch.randn(33, 70, device="cuda").bfloat16()]
    st = specreg_fast.init_power_state(weights)
    torch.library.opcheck(torch.ops.specreg_fast.sigma.default, (weights, st.us, st.vs))
    torch.library.opcheck(torch.ops.specreg_fast.power_step_.default, (weights, st.us, st.vs, 2, 0.0),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("m,n", [(64, 64), (128, 256), (512, 1024)])
def test_gpu_batched_power_matches_reference(m, n):
    pytest.importorskip("triton")
    from specreg_fast.triton.batched_power import batched_power_iteration, batched_power_reference

    P = torch.randn(8, m, n, dtype=torch.complex64, device="cuda")
    v = torch.randn(8, n, dtype=torch.complex64, device="cuda")
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    u = torch.zeros(8, m, dtype=torch.complex64, device="cuda")
    s_ref, u_ref, v_ref = batched_power_reference(P, u, v, 10)
    s, _, _ = batched_power_iteration(P, u.clone(), v.clone(), 10)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)
