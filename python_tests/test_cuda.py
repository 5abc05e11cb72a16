"""CUDA tests (marker ``cuda``): what ``make gpu-check`` runs on a GPU machine; skipped without one.

Every custom op on CUDA against its plain-PyTorch reference run on the CPU in float64, for
float32/float64/bfloat16/float16 weights and awkward shapes (1xN, Nx1, 4097x33, non-contiguous
and transposed views); the CUDA C++ kernel, the Triton kernel and the reference on the same
inputs (``backend=``); one training step of an MLP and of a ResNet-18 with ``penalty()`` and
with ``accumulate_grad()`` on weights shared with a CPU run (TF32 off); no host sync in a dense
or conv penalty step (``torch.cuda.set_sync_debug_mode("error")``); the penalty step captured
in a CUDA graph and replayed; ``torch.compile`` with inductor; two runs bit-identical.

Host syncs left on the GPU paths of ``SpectralPenalty`` (each one a ``cudaStreamSynchronize``):
  * the schedule: with ``start_step > 0`` or ``every > 1`` each call reads ``step_count`` to
    decide whether to skip the step (the default schedule reads nothing; under torch.compile
    the schedule is a device-side mask). Kept: a mask in eager mode would run the full penalty
    on every skipped step (the paper's burn-in is 80% of training).
  * the first call after construction, ``reset()`` or ``load_state_dict`` reads ``initialized``
    (warm start with ``n_iter_init``); later calls do not.
  * ``conv_power_step_`` / ``conv_operator_norms`` with ``tol > 0`` read each step's estimate
    (to stop early); the penalty uses ``tol = 0``. The conv path's finiteness check is a
    device-side ``where`` on CUDA (csrc/cpu/conv_operator_cpu.cpp), not a read.
  * without the compiled CUDA kernels (a CPU-only build of the extension on a GPU machine) the
    conv ops fall back to the Python reference, which reads the weights' finiteness per layer.
  * the FFT norm (``conv_norm="fft"``) is not checked here.

``SPECREG_FAST_TEST_DEVICE=cpu`` runs the tests that do not need CUDA itself on the CPU (a dry
run of this file on a machine without a GPU; the CPU kernels then stand in for the CUDA ones).
"""
import copy
import os

import pytest
import torch
import torch.nn as nn

import specreg_fast as sf
from specreg_fast import backends, ops
from specreg_fast.benchmarks.suite import make_resnet18
from specreg_fast.reference import ConvSpec

DEVICE = os.environ.get("SPECREG_FAST_TEST_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="no GPU")]
needs_gpu = pytest.mark.skipif(not (ON_GPU and torch.cuda.is_available()), reason="needs a GPU itself")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Accumulation is float32 for float32/bfloat16/float16 weights (float64 for float64), so the
# results differ from the float64 reference by float32 rounding over sums of ~4k terms.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11)}
TOL32 = dict(rtol=3e-5, atol=3e-6)


def tol(dtype):
    return TOL.get(dtype, TOL32)


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 off, so that matmuls and convolutions on the GPU round like the CPU's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cpu64(x):
    """A CPU float64 (complex128) copy of a tensor, or of every tensor in a list."""
    if isinstance(x, (list, tuple)):
        return [_cpu64(t) for t in x]
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().to("cpu", copy=True)
    if x.is_complex():
        return x.to(torch.complex128)
    return x.to(torch.float64) if x.is_floating_point() else x.clone()


def _close(got, want, dtype, msg=""):
    if isinstance(got, (list, tuple)):
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, dtype, f"{msg}[{i}]")
        return
    torch.testing.assert_close(_cpu64(got), _cpu64(want), equal_nan=True, msg=msg or None, **tol(dtype))


# ----------------------------------------------------------------------------- dense ops
def _weight(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if layout == "transposed":
        W = torch.randn(n, m, generator=g).t()
    elif layout == "strided":
        W = torch.randn(m, 2 * n + 1, generator=g)[:, 1::2]
    else:
        W = torch.randn(m, n, generator=g)
    return W.to(DEVICE).to(dtype)


DENSE_CASES = [((1, 257), "contiguous"), ((257, 1), "contiguous"), ((4097, 33), "contiguous"),
               ((70, 45), "transposed"), ((64, 130), "strided"), ((33, 4097), "transposed")]


def _moved(st):
    return sf.PowerState([u.to(DEVICE) for u in st.us], [v.to(DEVICE) for v in st.vs])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", DENSE_CASES, ids=lambda c: str(c))
def test_dense_ops_match_float64_reference(shape, layout, dtype):
    W = _weight(shape, dtype, layout)
    other = _weight((40, 24), dtype, "contiguous", seed=3)  # a second layer in the same launch
    weights = [W, other]
    st = _moved(sf.init_power_state([w.cpu() for w in weights], generator=torch.Generator().manual_seed(1)))
    us64, vs64 = _cpu64(st.us), _cpu64(st.vs)
    est = ops.power_step_(weights, st.us, st.vs, 3, 0.0)
    est64 = ops.power_step_reference(_cpu64(weights), us64, vs64, 3, 0.0)
    assert est.device.type == DEVICE and est.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(est, est64, dtype, "estimates")
    _close(st.us + st.vs, us64 + vs64, dtype, "vectors")
    _close(ops.sigma(weights, st.us, st.vs), ops.sigma_reference(_cpu64(weights), us64, vs64), dtype, "sigma")
    _close(ops.power_step_(weights, st.us, st.vs, 0, 0.0), ops.sigma_reference(_cpu64(weights), us64, vs64), dtype,
           "n_iter=0")


def test_dense_zero_nonfinite_and_tol_conventions():
    bad = torch.randn(6, 5)
    bad[2, 3] = float("nan")
    weights = [w.to(DEVICE) for w in (torch.zeros(7, 4), bad, torch.randn(40, 6), torch.diag(torch.tensor([3., 1.])))]
    st = _moved(sf.init_power_state([w.cpu() for w in weights], generator=torch.Generator().manual_seed(1)))
    before = [t.clone() for t in st.us + st.vs]
    us64, vs64 = _cpu64(st.us), _cpu64(st.vs)
    est = ops.power_step_(weights, st.us, st.vs, 40, 1e-4)
    est64 = ops.power_step_reference(_cpu64(weights), us64, vs64, 40, 1e-4)
    assert est[0] == 0 and torch.isnan(est[1])
    for i in (0, 1):  # zero W keeps the vectors, non-finite W rolls them back
        assert torch.equal(st.us[i], before[i]) and torch.equal(st.vs[i], before[len(weights) + i])
    torch.testing.assert_close(_cpu64(est), est64, rtol=1e-4, atol=1e-6, equal_nan=True)


# ----------------------------------------------------------------------------- conv ops
def _conv_cases():
    """(name, module, input shape): zero/reflect/circular padding, stride, dilation, groups, 1-D,
    transposed, a ResNet-18 shape."""
    torch.manual_seed(0)
    return [("2d s2", nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 9, 7)),
            ("2d reflect dil2", nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect"), (4, 8, 8)),
            ("2d circular groups2", nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"), (4, 8, 8)),
            ("1d", nn.Conv1d(3, 7, 5, padding=2), (3, 33)),
            ("2d transposed s2", nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 5, 5)),
            ("resnet 128->256 s2", nn.Conv2d(128, 256, 3, stride=2, padding=1, bias=False), (128, 16, 16))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _conv_cases()])
def test_conv_ops_match_float64_reference(case, dtype):
    _, mod, in_shape = _conv_cases()[case]
    mod = mod.to(DEVICE).to(dtype)
    spec = ConvSpec.from_module(mod, in_shape, weight=mod.weight.detach())
    w0 = spec.weight.cpu().to(torch.float64 if dtype == torch.float64 else torch.float32)
    st = sf.init_conv_state([ConvSpec.from_module(mod, in_shape, weight=w0)], generator=torch.Generator().manual_seed(1))
    xs, ys = [x.to(DEVICE) for x in st.xs], [y.to(DEVICE) for y in st.ys]
    params, modes = ops.pack_conv_params([spec])
    W = [spec.weight]
    W64, xs64, ys64 = _cpu64(W), _cpu64(xs), _cpu64(ys)
    # the functional ops first (they read xs/ys), then the in-place step
    _close(ops.conv_sigma(W, xs, ys, params, modes), ops.conv_sigma_reference(W64, xs64, ys64, params, modes), dtype,
           "conv_sigma")
    _close(ops.conv_adjoint(W, xs, ys, params, modes), ops.conv_adjoint_reference(W64, xs64, ys64, params, modes),
           dtype, "conv_adjoint")
    gw64 = ops.conv_weight_grad_reference(W64, xs64, ys64, params, modes)
    _close(ops.conv_weight_grad(W, xs, ys, params, modes), gw64, dtype, "conv_weight_grad")
    G = [torch.ones_like(W[0])]
    ops.conv_weight_grad_add_(G, W, xs, ys, params, modes)
    if dtype in (torch.float32, torch.float64):  # (a low-precision .grad rounds the sum itself)
        _close(G, [1 + gw64[0]], dtype, "conv_weight_grad_add_")
    est = ops.conv_power_step_(W, xs, ys, params, modes, 3, 0.0)
    est64 = ops.conv_power_step_reference(W64, xs64, ys64, params, modes, 3, 0.0)
    _close(est, est64, dtype, "conv_power_step_")
    _close(xs + ys, xs64 + ys64, dtype, "conv vectors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_circular_power_step_matches_float64_reference(dtype, stride):
    mod = nn.Conv2d(4, 6, 3, stride=stride, padding=1, padding_mode="circular", bias=False).to(dtype)
    spec = ConvSpec.from_module(mod, (4, 8, 8), weight=mod.weight.detach())
    st = sf.init_circular_state([spec], generator=torch.Generator().manual_seed(1))
    from specreg_fast.fft import circular_params

    params = circular_params(spec)
    W, xs = [spec.weight.to(DEVICE)], [x.to(DEVICE) for x in st.xs]
    W64, xs64 = _cpu64(W), _cpu64(xs)
    est, x_tops, y_tops = ops.circular_power_step_(W, xs, params, 3)
    x_t64 = [torch.empty_like(x) for x in xs64]
    y_t64 = [x.new_empty(s) for x, s in zip(xs64, ops.circular_output_shapes(W64, xs64, params))]
    est64 = ops.circular_power_step_reference(W64, xs64, x_t64, y_t64, params, 3)
    _close(est, est64, dtype, "estimates")
    _close(xs, xs64, dtype, "per-frequency vectors")
    # the top pair is defined up to a sign: compare through <y, A x> = estimate
    _close(ops.conv_sigma(W, x_tops, y_tops, params, ["circular"]), est64, dtype, "top pair")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("m,n", [(64, 3), (33, 70), (512, 512)])
def test_batched_power_step_matches_float64_reference(dtype, m, n):
    g = torch.Generator().manual_seed(0)
    P = torch.randn(5, m, n, generator=g, dtype=torch.complex128 if dtype.is_complex else torch.float64).to(dtype)
    v = torch.randn(5, n, generator=g, dtype=P.dtype)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    u = torch.zeros(5, m, dtype=P.dtype)
    Pd, ud, vd = P.to(DEVICE), u.to(DEVICE), v.to(DEVICE)
    u64, v64 = _cpu64(u), _cpu64(v)
    s = ops.batched_power_step_(Pd, ud, vd, 4)
    s64 = ops.batched_power_step_reference(_cpu64(P), u64, v64, 4)
    real = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    _close(s, s64, real, "sigma")
    _close([ud, vd], [u64, v64], real, "vectors")


def test_shifted_cholesky_info_matches_cpu():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 9, 9, dtype=torch.complex128, generator=g)
    H = A @ A.conj().transpose(1, 2)
    top = torch.linalg.eigvalsh(H)[:, -1]
    shift = top * torch.tensor([1.01, 0.99, 2.0, 0.5, 1.001, 0.9], dtype=torch.float64)
    want = ops.shifted_cholesky_info(H, shift)
    got = ops.shifted_cholesky_info(H.to(DEVICE), shift.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    assert (want[[0, 2, 4]] == 0).all() and (want[[1, 3, 5]] > 0).all()


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_every_backend_on_the_same_inputs(dtype):
    """CUDA C++ kernel vs Triton kernel vs reference (on CUDA: cuda/triton/reference; the
    ``backend=`` keyword of power_step_ and spectral_norms)."""
    avail = backends.available(torch.device(DEVICE))
    if ON_GPU:  # all three run where the extension has CUDA kernels and triton imports
        assert ("cuda" in avail) == sf.HAS_CUDA_EXT and ("triton" in avail) == backends.has_triton(), avail
    weights = [_weight(s, dtype, lay, seed=i) for i, (s, lay) in enumerate(DENSE_CASES)]
    start = sf.init_power_state([w.cpu() for w in weights], generator=torch.Generator().manual_seed(2))
    results = {}
    for b in avail:
        st = _moved(sf.PowerState([u.clone() for u in start.us], [v.clone() for v in start.vs]))
        est = backends.power_step_(weights, st.us, st.vs, 3, 0.0, backend=b)
        sig = sf.spectral_norms(weights, st, n_iter=2, backend=b)
        results[b] = (est, sig, st.us + st.vs)
    ref = results["reference"]
    for b, (est, sig, vecs) in results.items():
        _close(est, ref[0], dtype, f"{b} estimates")
        _close(sig, ref[1], dtype, f"{b} spectral_norms")
        _close(vecs, ref[2], dtype, f"{b} vectors")


@needs_gpu
def test_bench_gpu_rows_report_bandwidth_and_ratio():
    from specreg_fast.benchmarks import suite

    rows = suite.gpu_rows([(512, 384)], repeats=3)
    got = {r["backend"]: r for r in rows}
    assert set(got) == {"reference loop", *backends.available(torch.device("cuda"))}
    for r in rows:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["gbps"] > 0
        assert r["ratio_vs_reference"] == pytest.approx(got["reference loop"]["median_s"] / r["median_s"])
    peak = suite.gpu_peak_bandwidth(torch.cuda.get_device_name())
    if peak is not None:
        assert all(r["frac_read_bw"] == pytest.approx(r["gbps"] * 1e9 / peak) for r in rows)


# ----------------------------------------------------------------------------- training steps
def _mlp():
    return nn.Sequential(nn.Linear(784, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)), (784,)


def _one_step(model, route, x, y, gamma=1.0):
    """One SGD step with the penalty in the loss (route 'penalty') or accumulate_grad();
    returns the gradients, the penalty's sigmas and the new parameters."""
    pen = sf.SpectralPenalty(model, gamma=gamma, n_iter=1, n_iter_init=3)
    with torch.no_grad():
        model(x[:1])  # discovery: forward order, conv input sizes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    if route == "penalty":
        loss = loss + pen()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if route == "accumulate_grad":
        pen.accumulate_grad()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    return grads, pen.last_sigmas.detach().clone(), [p.detach().clone() for p in model.parameters()]


def _rel_err(a, b):
    a, b = _cpu64(a), _cpu64(b)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


# norm-wise relative error of a whole gradient, GPU vs CPU, TF32 off: float32 rounding through
# a ResNet's forward and backward, against float64's
STEP_TOL = {torch.float32: 1e-3, torch.float64: 1e-9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("route", ["penalty", "accumulate_grad"])
@pytest.mark.parametrize("make", [_mlp, make_resnet18], ids=["mlp", "resnet18"])
def test_training_step_matches_cpu(make, route, dtype):
    torch.manual_seed(0)
    model, in_shape = make()
    model = model.to(dtype)
    x = torch.randn(4, *in_shape, dtype=dtype)
    y = torch.randint(0, 10, (4,))
    cpu = _one_step(copy.deepcopy(model), route, x, y)
    dev = _one_step(copy.deepcopy(model).to(DEVICE), route, x.to(DEVICE), y.to(DEVICE))
    names = [n for n, _ in model.named_parameters()]
    _close(dev[1], cpu[1], torch.float32 if dtype != torch.float64 else dtype, "sigmas")
    for kind, a, b in (("grad", dev[0], cpu[0]), ("param", dev[2], cpu[2])):
        for n, ga, gb in zip(names, a, b):
            assert _rel_err(ga, gb) <= STEP_TOL[dtype], (kind, n, _rel_err(ga, gb))


# ----------------------------------------------------------------------------- no host sync
def _warm_penalty(make, **kw):
    torch.manual_seed(0)
    model, in_shape = make()
    model = model.to(DEVICE)
    x = torch.randn(4, *in_shape, device=DEVICE)
    pen = sf.SpectralPenalty(model, gamma=0.5, **kw)
    model(x)
    pen().backward()  # first call: discovery, validation, warm start (these read the device)
    pen.accumulate_grad()
    return model, pen, x


def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), (3, 16, 16)


@needs_gpu
@pytest.mark.parametrize("make", [_mlp, _small_cnn], ids=["dense", "conv"])
def test_penalty_step_has_no_host_sync(make):
    model, pen, x = _warm_penalty(make)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(x).square().mean() + pen()
        loss.backward()
        pen.accumulate_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@needs_gpu
def test_scheduled_penalty_reads_the_counter():
    """The one sync the list above keeps: a schedule other than the default reads step_count
    (this test fails once that read is gone, so the list can be updated)."""
    model, pen, x = _warm_penalty(_mlp, start_step=0, every=2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
            pen()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- graphs, compile, determinism
def test_torch_compile_inductor_matches_eager():
    def make():
        torch.manual_seed(0)
        model, in_shape = _mlp()
        model = model.to(DEVICE)
        pen = sf.SpectralPenalty(model, gamma=0.5, n_iter=1, n_iter_init=1)
        model(torch.randn(1, *in_shape, device=DEVICE))
        pen()
        return model, pen

    (me, pe), (mc, pc) = make(), make()

    def loss_fn(model, pen, x):
        return model(x).square().mean() + pen()

    compiled = torch.compile(loss_fn, backend="inductor", fullgraph=True)
    for _ in range(2):
        x = torch.randn(8, 784, device=DEVICE)
        le, lc = loss_fn(me, pe, x), compiled(mc, pc, x)
        ge = torch.autograd.grad(le, list(me.parameters()))
        gc = torch.autograd.grad(lc, list(mc.parameters()))
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pc.get_buffer("v_0"), pe.get_buffer("v_0"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [_mlp, _small_cnn], ids=["dense", "conv"])
def test_two_runs_are_bit_identical(make):
    """The dense kernels sum in a fixed order (no atomics); the conv ops are as deterministic
    as cuDNN's algorithms, which ``cudnn.deterministic`` pins."""
    def run():
        torch.manual_seed(0)
        model, in_shape = make()
        model = model.to(DEVICE)
        pen = sf.SpectralPenalty(model, gamma=0.5, scope="all")
        x = torch.randn(4, *in_shape, device=DEVICE)
        model(x)
        for _ in range(3):
            model.zero_grad()
            pen().backward()
            pen.accumulate_grad()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None] + [pen.last_sigmas.clone()]

    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        first, second = run(), run()
    finally:
        torch.backends.cudnn.deterministic = saved
    assert len(first) == len(second) > 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
def test_penalty_step_in_a_cuda_graph():
    """The dense power step and sigma captured in a CUDA graph: each replay is one more power
    step on the same buffers, equal to the reference's step from the same state. (Last in this
    file: a kernel that is not capture-safe may leave the CUDA context unusable.)"""
    torch.manual_seed(0)
    weights = [torch.randn(300, 200, device="cuda"), torch.randn(128, 300, device="cuda")]
    st = _moved(sf.init_power_state([w.cpu() for w in weights], generator=torch.Generator().manual_seed(1)))
    eager = _moved(sf.PowerState([u.clone() for u in st.us], [v.clone() for v in st.vs]))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (allocations, table upload)
        ops.power_step_(weights, st.us, st.vs, 1, 0.0)
    torch.cuda.current_stream().wait_stream(s)
    ops.power_step_reference(weights, eager.us, eager.vs, 1, 0.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        est = ops.power_step_(weights, st.us, st.vs, 1, 0.0)
        sig = ops.sigma(weights, st.us, st.vs)
    for _ in range(3):
        graph.replay()
        want = ops.power_step_reference(weights, eager.us, eager.vs, 1, 0.0)
        torch.cuda.synchronize()
        torch.testing.assert_close(est, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sig, ops.sigma_reference(weights, eager.us, eager.vs), rtol=1e-5, atol=1e-6)
        for a, b in zip(st.us + st.vs, eager.us + eager.vs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
