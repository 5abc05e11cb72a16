"""The CUDA side, proven without a GPU: the extension built with FORCE_CUDA=1 registers CUDA
kernels for the dense ops and its cubins for sm_80/sm_90 have no spills; backend selection
follows the documented order; the Triton kernels become the CUDA implementation when the
extension has none.

GPU execution itself is tested only where ``torch.cuda.is_available()`` (never on CI).
"""
import importlib.util
import os
import re
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
    for op in ("power_step_", "sigma", "conv_power_step_", "conv_sigma", "conv_weight_grad", "conv_weight_grad_add_",
               "conv_adjoint", "circular_power_step_"):
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
    import specreg_fast._C_cuda as C

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
    """Every backend (the reference one included) against power iteration written out here in
    float64 from the same start: u = W v / |W v|, v = W^T u / |W^T u|, sigma = u^T W v."""
    torch.manual_seed(0)
    weights = [torch.randn(30, 20), torch.randn(12, 40, dtype=torch.float64)]
    st = specreg_fast.init_power_state(weights, generator=torch.Generator().manual_seed(1))
    us, vs = [u.double().clone() for u in st.us], [v.double().clone() for v in st.vs]
    got = specreg_fast.spectral_norms(weights, st, n_iter=5, backend=backend)
    for l, W in enumerate(weights):
        W = W.double()
        u, v = us[l], vs[l]
        for _ in range(5):
            u = W @ v
            u = u / u.norm()
            v = W.t() @ u
            v = v / v.norm()
        torch.testing.assert_close(got[l].double(), u @ W @ v, rtol=1e-5, atol=0)
        torch.testing.assert_close(st.us[l].double(), u, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.vs[l].double(), v, rtol=1e-4, atol=1e-6)
    # five steps from a random start are not converged: the comparison is step for step
    assert abs(got[0].item() - torch.linalg.matrix_norm(weights[0].double(), 2).item()) > 1e-4


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
after = [torch._C._dispatch_has_kernel_for_dispatch_key(f"specreg_fast::{op}", "CUDA")
         for op in ("power_step_", "sigma", "batched_power_step_", "lowrank_power_step_")]
print(before, sorted(got), after, tb.register() == got)
"""


def test_triton_registers_as_cuda_kernel_when_extension_has_none():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _REGISTER_WITHOUT_EXTENSION], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == ("False ['batched_power_step_', 'lowrank_power_step_', 'power_step_', 'sigma'] "
                                               "[True, True, True, True] True"), r.stdout


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


# ----------------------------------------------------------------------------- CUDA device code, emulated
# The kernels of csrc/cuda/power_step_kernels.cuh compiled as host C++ (scripts/cuda_emulate/:
# one std::thread per CUDA thread, barriers for __syncthreads and warp shuffles) and run with
# the table and launch sequence of power_step_cuda.cu. What this checks: the device code's
# indexing, vectorized/strided loads, warp and block reductions, the partial-sum layout and
# the finalize conventions. What it cannot: the stable-ABI glue of power_step_cuda.cu (allocation,
# pinned upload, stream), timing, and anything specific to real GPU memory ordering.
_EMU_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    import ctypes

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("cuda_emu") / "emu.so"
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    src = os.path.join(ROOT, "scripts", "cuda_emulate", "emulate_power_step.cpp")
    # setup.py's stable-ABI target, as nvcc compiles the kernels: only torch's header-only types
    with open(os.path.join(ROOT, "setup.py")) as f:
        major, minor = map(int, re.search(r"^TORCH_TARGET = \((\d+), (\d+)\)", f.read(), re.M).groups())
    target = f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", target, "-I", os.path.join(ROOT, "csrc"),
                        "-I", os.path.join(ROOT, "scripts", "cuda_emulate"), "-I", tinc, src, "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return ctypes.CDLL(str(out))


def _emu_args(weights, us, vs):
    import ctypes

    L = len(weights)
    dims = torch.tensor([[w.shape[0], w.shape[1], w.stride(0), w.stride(1)] for w in weights] or [[0, 0, 0, 0]],
                        dtype=torch.int64).flatten()
    P = ctypes.c_void_p * max(L, 1)
    return (dims, ctypes.c_void_p(dims.data_ptr()), P(*[w.data_ptr() for w in weights]),
            P(*[u.data_ptr() for u in us]), P(*[v.data_ptr() for v in vs]))


def _emu_power_step(lib, weights, us, vs, n_iter, tol, sms):
    import ctypes

    est = torch.zeros(len(weights), dtype=us[0].dtype)
    keep, *args = _emu_args(weights, us, vs)
    rc = lib.emu_power_step(_EMU_CODES[weights[0].dtype], len(weights), *args, ctypes.c_int64(n_iter),
                            ctypes.c_double(tol), ctypes.c_int64(sms), ctypes.c_void_p(est.data_ptr()))
    assert rc == 0
    return est


def _emu_sigma(lib, weights, us, vs, sms):
    import ctypes

    out = torch.zeros(len(weights), dtype=us[0].dtype)
    keep, *args = _emu_args(weights, us, vs)
    assert lib.emu_sigma(_EMU_CODES[weights[0].dtype], len(weights), *args, ctypes.c_int64(sms),
                         ctypes.c_void_p(out.data_ptr())) == 0
    return out


def _fresh(weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    us, vs = [], []
    for W in weights:
        acc = ops.acc_dtype(W.dtype)
        v = torch.randn(W.shape[1], generator=g, dtype=acc)
        us.append(torch.zeros(W.shape[0], dtype=acc))
        vs.append(v / v.norm() if W.shape[1] else v)
    return us, vs


def _emu_case(dtype):
    g = torch.Generator().manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return [mk(70, 45),            # 3 tiles at 32 rows, n not a multiple of the vector width
            mk(30, 100).t(),       # transposed view: strided (scalar) loads
            mk(9, 34)[:, 1:],      # rows not 16-byte aligned: scalar path
            mk(40, 64)]            # contiguous, vectorized


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sms", [1, 64], ids=["rows32", "rows16_if_fp32"])
def test_emulated_cuda_power_step_matches_reference(cuda_emulator, dtype, sms):
    weights = _emu_case(dtype)
    us, vs = _fresh(weights)
    ur, vr = [u.clone() for u in us], [v.clone() for v in vs]
    est = _emu_power_step(cuda_emulator, weights, us, vs, 3, 0.0, sms)
    ref = ops.power_step_reference(weights, ur, vr, 3, 0.0)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(est, ref.to(est.dtype), **tol)
    for a, b in zip(us + vs, ur + vr):
        torch.testing.assert_close(a, b, **(dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64
                                            else dict(rtol=1e-4, atol=1e-5)))
    uu = [torch.randn(W.shape[0], dtype=us[0].dtype) for W in weights]
    torch.testing.assert_close(_emu_sigma(cuda_emulator, weights, uu, vs, sms),
                               ops.sigma_reference(weights, uu, vs).to(us[0].dtype), **tol)


def test_emulated_cuda_zero_nonfinite_empty_and_tol(cuda_emulator):
    bad = torch.randn(6, 5)
    bad[2, 3] = float("nan")
    weights = [torch.zeros(7, 4), bad, torch.randn(40, 6), torch.randn(0, 3), torch.randn(3, 0),
               torch.diag(torch.tensor([3.0, 1.0, 0.5]))]
    us, vs = _fresh(weights)
    u_before, v_before = [u.clone() for u in us], [v.clone() for v in vs]
    ur, vr = [u.clone() for u in us], [v.clone() for v in vs]
    est = _emu_power_step(cuda_emulator, weights, us, vs, 40, 1e-3, 1)
    ref = ops.power_step_reference(weights, ur, vr, 40, 1e-3)
    torch.testing.assert_close(est, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert est[0] == 0 and torch.isnan(est[1])
    for l in (0, 1):
        assert torch.equal(us[l], u_before[l]) and torch.equal(vs[l], v_before[l])
    for a, b in zip(us + vs, ur + vr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
