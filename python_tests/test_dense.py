"""Dense ops (specreg_fast::power_step_, specreg_fast::sigma) against exact answers."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specreg_fast as sf
from specreg_fast import ops
from specreg_fast import reference as ref

from spectral_testing import matrix_with_gap

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Tolerance of the converged sigma vs the SVD of the weight as stored: accumulation is in
# float32 (float64 for float64), so the error is the float32 rounding of the sums, far below
# the storage precision of bf16/fp16 weights.
SIGMA_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def _converge(weights, n=300):
    state = sf.init_power_state(weights, generator=torch.Generator().manual_seed(1))
    sig = sf.spectral_norms(weights, state, n_iter=n)
    return sig, state


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (37, 53), (300, 17), (64, 64)])
def test_converges_to_matrix_norm(dtype, shape):
    W = (matrix_with_gap(*shape, gap=0.8, seed=sum(shape)) * 2.5).to(dtype)
    sig, _ = _converge([W], n=200)
    exact = torch.linalg.matrix_norm(W.double(), 2)
    assert sig.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(sig.double()[0] - exact) / exact < SIGMA_RTOL[dtype]


_SHAPES = dict(m=st.integers(1, 2048), n=st.integers(1, 2048), layout=st.sampled_from(["contig", "transposed", "sliced"]),
               dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_SHAPES)
def test_random_shapes_and_views(m, n, layout, dtype, seed):
    _check_random(m, n, layout, dtype, seed)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_SHAPES)
def test_random_shapes_and_views_long(m, n, layout, dtype, seed):
    _check_random(m, n, layout, dtype, seed)


def _check_random(m, n, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # A planted, well-separated top singular value keeps the iteration count small for any shape.
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(max(m, n))
    a, b = torch.randn(m, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    W += 3.0 * torch.outer(a / a.norm(), b / b.norm())
    if layout == "transposed":
        W = W.t().contiguous().t()
    elif layout == "sliced":
        W = torch.cat([W, W], dim=1)[:, ::2] if n > 0 else W
    W = W.to(dtype)
    sig, state = _converge([W], n=60)
    exact = torch.linalg.matrix_norm(W.double(), 2)
    assert abs(sig.double()[0] - exact) / exact < max(SIGMA_RTOL[dtype], 1e-4)
    assert torch.isfinite(state.us[0]).all() and torch.isfinite(state.vs[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
def test_one_step_equals_reference_step(dtype, layout):
    torch.manual_seed(3)
    Ws = [torch.randn(130, 77), torch.randn(5, 300), torch.randn(1, 8), torch.randn(64, 1)]
    if layout == "transposed":
        Ws = [W.t().contiguous().t() for W in Ws]
    elif layout == "strided":
        Ws = [torch.randn(W.shape[0], 2 * W.shape[1])[:, ::2] for W in Ws]
    Ws = [W.to(dtype) for W in Ws]
    state = sf.init_power_state(Ws, generator=torch.Generator().manual_seed(0))
    before = [(u.clone(), v.clone()) for u, v in zip(state.us, state.vs)]
    est = ops.power_step_(Ws, state.us, state.vs, 1, 0.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for l, W in enumerate(Ws):
        s_ref, u_ref, v_ref = ref.power_iteration(W, *before[l], n_iter=1)
        torch.testing.assert_close(state.us[l], u_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(state.vs[l], v_ref, atol=tol, rtol=tol)
        assert abs(est[l].double() - s_ref.double()) <= 10 * tol * abs(s_ref.double())
    # sigma op = u^T W v at the new vectors
    s = ops.sigma(Ws, state.us, state.vs)
    for l, W in enumerate(Ws):
        want = state.us[l].double() @ W.double() @ state.vs[l].double()
        assert abs(s[l].double() - want) <= 10 * tol * abs(want)


def test_grouped_list_of_mixed_dtypes_and_shapes():
    Ws = [matrix_with_gap(50, 40, 0.7, torch.float32, 1) * 2, matrix_with_gap(20, 90, 0.7, torch.float64, 2) * 3,
          matrix_with_gap(33, 33, 0.7, torch.bfloat16, 3)]
    sig, state = _converge(Ws, n=100)
    assert sig.dtype == torch.float64
    for l, W in enumerate(Ws):
        exact = torch.linalg.matrix_norm(W.double(), 2)
        assert abs(sig[l] - exact) / exact < 1e-4


def test_tol_stops_early_and_matches():
    W = matrix_with_gap(200, 100, 0.5) * 4
    state = sf.init_power_state([W], generator=torch.Generator().manual_seed(0))
    s = sf.spectral_norms([W], state, tol=1e-12, max_iter=500)
    assert abs(s[0] - 4.0) < 1e-9


def test_deterministic_and_thread_count_independent_value():
    W = torch.randn(3000, 700)
    outs = []
    for threads in (1, 2, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            state = sf.init_power_state([W], generator=torch.Generator().manual_seed(0))
            outs.append((sf.spectral_norms([W], state, n_iter=5).clone(), state.vs[0].clone()))
        finally:
            torch.set_num_threads(old)
    # same thread count: bit-identical
    assert torch.equal(outs[1][0], outs[2][0]) and torch.equal(outs[1][1], outs[2][1])
    # different thread count: same value to float32 rounding
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=0)


def test_zero_matrix_keeps_vectors_and_gives_zero():
    W = torch.zeros(7, 5)
    state = sf.init_power_state([W], generator=torch.Generator().manual_seed(0))
    u0, v0 = state.us[0].clone(), state.vs[0].clone()
    s = sf.spectral_norms([W], state, n_iter=3)
    assert s.item() == 0.0
    assert torch.equal(state.us[0], u0) and torch.equal(state.vs[0], v0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_rolls_back_vectors(bad):
    good = torch.randn(6, 4)
    W = torch.randn(8, 5)
    W[3, 2] = bad
    state = sf.init_power_state([good, W], generator=torch.Generator().manual_seed(0))
    u0, v0 = state.us[1].clone(), state.vs[1].clone()
    s = sf.spectral_norms([good, W], state, n_iter=4)
    assert math.isnan(s[1].item()) and math.isfinite(s[0].item())
    assert torch.equal(state.us[1], u0) and torch.equal(state.vs[1], v0)
    # the reference kernel (used on devices without a kernel) follows the same convention
    state2 = sf.init_power_state([good, W], generator=torch.Generator().manual_seed(0))
    s2 = ops.power_step_reference([good, W], state2.us, state2.vs, 4, 0.0)
    assert math.isnan(s2[1].item()) and torch.equal(state2.us[1], u0)


def test_reference_kernel_agrees_with_cpp():
    Ws = [torch.randn(40, 30), torch.randn(9, 70, dtype=torch.float64), torch.randn(16, 16).half()]
    a = sf.init_power_state(Ws, generator=torch.Generator().manual_seed(0))
    b = sf.init_power_state(Ws, generator=torch.Generator().manual_seed(0))
    sa = ops.power_step_(Ws, a.us, a.vs, 3, 0.0)
    sb = ops.power_step_reference(Ws, b.us, b.vs, 3, 0.0)
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-6)
    for x, y in zip(a.vs + a.us, b.vs + b.us):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_empty_list():
    s = sf.spectral_norms([], sf.PowerState([], []))
    assert s.shape == (0,)


@pytest.mark.parametrize("what", ["u_len", "v_len", "dtype", "count", "dim", "wdtype"])
def test_bad_input_raises_and_modifies_nothing(what):
    Ws = [torch.randn(6, 4), torch.randn(5, 3)]
    state = sf.init_power_state(Ws)
    snap = [t.clone() for t in state.us + state.vs]
    if what == "u_len":
        state.us[1] = torch.zeros(4)
        err, match = ValueError, r"weights\[1\].*u must have shape \(5,\)"
    elif what == "v_len":
        state.vs[1] = torch.zeros(7)
        err, match = ValueError, r"weights\[1\].*v must have shape \(3,\)"
    elif what == "dtype":
        state.vs[1] = state.vs[1].double()
        err, match = ValueError, r"weights\[1\].*torch.float32"
    elif what == "count":
        state.us.pop()
        err, match = ValueError, "one per weight"
    elif what == "dim":
        Ws[1] = torch.randn(5, 3, 1)
        err, match = ValueError, r"weights\[1\].*2-D"
    else:
        Ws[1] = Ws[1].to(torch.int32)
        err, match = TypeError, r"weights\[1\].*float"
    with pytest.raises(err, match=match):
        sf.spectral_norms(Ws, state, n_iter=2)
    assert torch.equal(state.us[0], snap[0]) and torch.equal(state.vs[0], snap[2])


def test_gradcheck_float64_with_known_gap():
    W = matrix_with_gap(12, 9, gap=0.7, seed=5) * 2.0
    state = sf.init_power_state([W], generator=torch.Generator().manual_seed(0))
    sf.spectral_norms([W], state, n_iter=200)

    def f(w):
        return sf.spectral_norms([w], state, update=False)

    assert torch.autograd.gradcheck(f, (W.clone().requires_grad_(),))
    # at convergence the gradient u v^T is d sigma_max / dW (exact from the SVD)
    Wr = W.clone().requires_grad_()
    f(Wr)[0].backward()
    U, S, Vh = torch.linalg.svd(W)
    g_exact = torch.outer(U[:, 0], Vh[0])
    g_exact = g_exact * torch.sign((g_exact * Wr.grad).sum())
    torch.testing.assert_close(Wr.grad, g_exact, atol=1e-8, rtol=0)


def test_gradient_flows_to_all_dtypes():
    Ws = [torch.randn(8, 6, requires_grad=True), torch.randn(5, 7, dtype=torch.bfloat16, requires_grad=True)]
    state = sf.init_power_state(Ws)
    sf.spectral_norms(Ws, state, n_iter=30).pow(2).sum().backward()
    assert Ws[0].grad.dtype == torch.float32 and Ws[1].grad.dtype == torch.bfloat16
    torch.testing.assert_close(Ws[0].grad, 2 * ops.sigma([Ws[0].detach()], state.us[:1], state.vs[:1])[0]
                               * torch.outer(state.us[0], state.vs[0]))


def test_opcheck():
    Ws = [torch.randn(10, 6), torch.randn(4, 9, dtype=torch.float64)]
    state = sf.init_power_state(Ws)
    torch.library.opcheck(torch.ops.specreg_fast.power_step_.default, (Ws, state.us, state.vs, 2, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
    Wg = [w.clone().requires_grad_() for w in Ws]
    torch.library.opcheck(torch.ops.specreg_fast.sigma.default, (Wg, state.us, state.vs))
    est = ops.power_step_(Ws, state.us, state.vs, 1, 0.0)
    torch.library.opcheck(torch.ops.specreg_fast.sigma_from_step.default, (Wg, state.us, state.vs, est))


def test_opcheck_power_step_aot_dispatch_dynamic():
    # The mutation of the vector lists must survive AOT functionalization with dynamic shapes.
    # (test_autograd_registration does not apply: the op is no-grad by design, it registers no
    # autograd formula and its inputs never require grad.)
    Ws = [torch.randn(10, 6), torch.randn(4, 9)]
    state = sf.init_power_state(Ws)
    torch.library.opcheck(torch.ops.specreg_fast.power_step_.default, (Ws, state.us, state.vs, 2, 0.0),
                          test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("case", ["fp32", "fp64", "tol", "zero", "nan", "lowp"])
def test_sigma_read_off_the_step_equals_u_W_v(case):
    # spectral_norms takes the value from power_step_'s estimate (no second read of W): it
    # must equal u^T W v at the new vectors to float rounding, with gradient u v^T.
    torch.manual_seed(5)
    dt = torch.float64 if case == "fp64" else torch.float32
    Ws = [torch.randn(300, 200, dtype=dt), torch.randn(50, 700, dtype=dt).t(), torch.randn(1, 40, dtype=dt)]
    if case == "zero":
        Ws[1] = torch.zeros(700, 50)
    if case == "nan":
        Ws[0][3, 4] = math.nan
    if case == "lowp":
        Ws = [W.to(torch.bfloat16) for W in Ws]
    Ws = [W.requires_grad_() for W in Ws]
    state = sf.init_power_state(Ws)
    kw = dict(tol=1e-4, max_iter=50) if case == "tol" else dict(n_iter=3)
    got = sf.spectral_norms(Ws, state, **kw)
    want = ops.sigma_reference([W.detach() for W in Ws], state.us, state.vs)
    rtol = 1e-12 if case == "fp64" else 1e-5
    torch.testing.assert_close(got.detach(), want, rtol=rtol, atol=1e-6, equal_nan=True)
    if case == "nan":
        assert math.isnan(got[0].item())
        return
    got.sum().backward()
    for W, u, v in zip(Ws, state.us, state.vs):
        torch.testing.assert_close(W.grad.float(), torch.outer(u, v).to(W.dtype).float(), rtol=0, atol=1e-6)


def test_torch_compile_fullgraph_matches_eager():
    Ws = [torch.randn(20, 12, requires_grad=True), torch.randn(7, 20, requires_grad=True)]
    s_e = sf.init_power_state(Ws, generator=torch.Generator().manual_seed(0))
    s_c = sf.init_power_state(Ws, generator=torch.Generator().manual_seed(0))

    def penalty(ws, us, vs):
        return sf.spectral_norms(ws, sf.PowerState(us, vs), n_iter=2).pow(2).sum()

    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        pe = penalty(Ws, s_e.us, s_e.vs)
        ge = torch.autograd.grad(pe, Ws)
        pc = compiled(Ws, s_c.us, s_c.vs)
        gc = torch.autograd.grad(pc, Ws)
        torch.testing.assert_close(pc, pe)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
    for a, b in zip(s_c.vs, s_e.vs):  # the in-place update happened under compile too
        torch.testing.assert_close(a, b)


def test_spectral_norm_stateless():
    W = torch.randn(30, 20, dtype=torch.float64)
    s = sf.spectral_norm(W, tol=1e-13, max_iter=20000)
    assert abs(s - torch.linalg.matrix_norm(W, 2)) / s < 1e-6
    conv_w = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    s = sf.spectral_norm(conv_w, tol=1e-13, max_iter=20000)
    assert abs(s - torch.linalg.matrix_norm(conv_w.reshape(8, -1), 2)) / s < 1e-6


def test_from_step_wrappers_match_the_registered_ops():
    """The eager route of ops.sigma_from_step / ops.conv_sigma_from_step (an autograd.Function
    sharing the ops' backward helpers) gives the same value, gradients and gradient dtypes
    as the registered ops; a malformed call is refused on both."""
    from specreg_fast import conv
    from specreg_fast.reference import ConvSpec

    g = torch.Generator().manual_seed(3)
    Ws = [torch.randn(8, 6, generator=g), torch.randn(5, 7, generator=g).bfloat16()]
    st = sf.init_power_state(Ws, generator=g)
    est = ops.power_step_(Ws, st.us, st.vs, 2, 0.0)
    Wc = torch.randn(4, 3, 3, 3, generator=g)
    spec = ConvSpec(weight=Wc, input_shape=(3, 5, 6), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=1,
                    padding_mode="reflect", transposed=False, output_padding=(0, 0))
    cst = conv.init_conv_state([spec], generator=g)
    params, modes = ops.pack_conv_params([spec])
    cest = ops.conv_power_step_([Wc], cst.xs, cst.ys, params, modes, 2, 0.0)
    calls = {
        "wrapper": (lambda w: ops.sigma_from_step(w, st.us, st.vs, est),
                    lambda w: ops.conv_sigma_from_step(w, cst.xs, cst.ys, params, modes, cest)),
        "op": (lambda w: torch.ops.specreg_fast.sigma_from_step(w, st.us, st.vs, est),
               lambda w: torch.ops.specreg_fast.conv_sigma_from_step(w, cst.xs, cst.ys, params, modes, cest)),
    }
    out = {}
    for route, (dense_fn, conv_fn) in calls.items():
        wd = [w.clone().requires_grad_() for w in Ws]
        wc = [Wc.clone().requires_grad_()]
        a, b = dense_fn(wd), conv_fn(wc)
        (a * torch.tensor([2.0, -3.0])).sum().add(b.sum() * 5.0).backward()
        out[route] = (a.detach(), b.detach(), [w.grad for w in wd + wc])
    torch.testing.assert_close(out["wrapper"][0], est)
    for x, y in zip(out["wrapper"][:2], out["op"][:2]):
        assert torch.equal(x, y)
    for x, y in zip(out["wrapper"][2], out["op"][2]):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert out["wrapper"][2][1].dtype == torch.bfloat16
    wd = [w.clone().requires_grad_() for w in Ws]
    with pytest.raises((ValueError, RuntimeError)):
        ops.sigma_from_step(wd, st.us[:1], st.vs, est)
    with pytest.raises(ValueError, match=r"est must hold one estimate per layer, shape \(2,\)"):
        ops.sigma_from_step(wd, st.us, st.vs, est[:1])
