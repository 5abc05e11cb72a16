"""The paper's circular-conv norm (method="fft"): the matrix-free batched per-frequency power
step (specreg_fast::circular_power_step_) and fft.circular_conv_norms, checked against
svdvals of the explicit circular operator matrix (reference.conv_operator_matrix), the
per-block SVD, the reference step, gradcheck in float64 and opcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import specreg_fast as sf
from specreg_fast import fft, ops
from specreg_fast import reference as ref
from specreg_fast.reference import ConvSpec


def _spec(d, cin=4, cout=5, k=3, stride=1, dilation=1, groups=1, n=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = n or {1: 12, 2: 6, 3: 4}[d] * stride
    w = torch.randn(cout, cin // groups, *([k] * d), generator=g, dtype=dtype)
    return ConvSpec(weight=w, input_shape=(cin, *([n] * d)), stride=(stride,) * d,
                    padding=(dilation * (k - 1) // 2,) * d, dilation=(dilation,) * d, groups=groups,
                    padding_mode="circular")


def _circular_matrix(spec):
    """The explicit matrix of x -> conv(circular_pad(x)) with padding lo = span//2,
    hi = span - span//2 (span = dilation*(k-1)): the full wrap-around conv."""
    d = spec.ndim
    n = math.prod(spec.input_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(spec.input_shape))
    k = spec.weight.shape[2:]
    pad = []
    for i in reversed(range(d)):
        span = spec.dilation[i] * (k[i] - 1)
        pad += [span // 2, span - span // 2]
    xp = torch.nn.functional.pad(eye, pad, mode="circular")
    conv = [torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d][d - 1]
    out = conv(xp, spec.weight.double(), stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
    return out.reshape(n, -1).t()


def _exact(spec):
    return torch.linalg.svdvals(_circular_matrix(spec))[0].item()


CASES = [
    # d, cin, cout, k, stride, dilation, groups
    (1, 3, 4, 3, 1, 1, 1),
    (1, 4, 4, 5, 3, 1, 2),
    (1, 2, 3, 3, 2, 2, 1),
    (2, 3, 4, 3, 1, 1, 1),
    (2, 4, 6, 3, 2, 1, 1),
    (2, 4, 4, 5, 1, 1, 2),
    (2, 3, 4, 1, 2, 1, 1),
    (2, 4, 4, 3, 3, 1, 4),
    (2, 2, 3, 3, 1, 2, 1),
    (3, 2, 3, 3, 1, 1, 1),
    (3, 2, 2, 1, 2, 1, 1),
]


@pytest.mark.parametrize("d,cin,cout,k,stride,dilation,groups", CASES)
def test_power_iteration_converges_to_svdvals_of_the_circular_matrix(d, cin, cout, k, stride, dilation, groups,
                                                                     conv_kernel):
    spec = _spec(d, cin, cout, k, stride, dilation, groups)
    exact = _exact(spec)
    st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(1))
    est = fft.circular_conv_norms([spec], st, n_iter=300).item()
    assert abs(est - exact) <= 1e-8 * exact
    # the per-block SVD (exact=True) is the same number
    assert abs(fft.circular_conv_norms([spec], exact=True).item() - exact) <= 1e-10 * exact


@pytest.mark.parametrize("d,cin,cout,k,stride,dilation,groups", CASES[:6])
def test_per_frequency_estimates_match_the_block_power_iteration(d, cin, cout, k, stride, dilation, groups):
    """The matrix-free step is the batched block power iteration: after t steps from the
    same start, max_w |P(w) v_t(w)| equals the explicit-block iteration's value."""
    spec = _spec(d, cin, cout, k, stride, dilation, groups)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(spec.input_shape, dtype=torch.float64, generator=g)
    # the step's conv pads dilation*(k-1)//2 in front: the same phases as these blocks
    P = ref.circular_transfer_blocks(spec.weight, spec.input_shape[1:], stride, dilation, dilation * (k - 1) // 2,
                                     groups)
    # (freq..., groups, C_out/g, C_in/g * phases) -> per frequency the block-diagonal matrix over
    # the groups: group g maps input channels [g C_in/g, (g+1) C_in/g) (channel-major with their
    # phases, as V below) to output channels [g C_out/g, (g+1) C_out/g)
    P = P.reshape(-1, groups, cout // groups, (cin // groups) * stride ** d)
    P = torch.stack([torch.block_diag(*blocks) for blocks in P])
    assert P.shape[1:] == (cout, cin * stride ** d)
    for t in (1, 3):
        x = x0.clone()
        est, _, _ = ops.circular_power_step_([spec.weight], [x], fft.circular_params(spec), t)
        # explicit blocks: v(w) from the polyphase DFT of x0 in the block's (channel, phase) order
        X = torch.fft.fftn(ops.polyphase_split(x0, [stride] * d), dim=list(range(1, d + 1)), norm="ortho")
        V = X.reshape(X.shape[0], -1).t()  # (freq, C_in * phases), channel-major
        V = V / V.norm(dim=1, keepdim=True)
        for _ in range(t - 1):
            V = torch.einsum("bij,bj->bi", P.conj().transpose(1, 2), torch.einsum("bij,bj->bi", P, V))
            V = V / V.norm(dim=1, keepdim=True)
        ref_est = torch.einsum("bij,bj->bi", P, V).norm(dim=1).max().item()
        assert est.item() == pytest.approx(ref_est, rel=1e-10)


@pytest.mark.parametrize("d,cin,cout,k,stride,dilation,groups", CASES[:8])
def test_one_cpp_step_equals_one_reference_step(d, cin, cout, k, stride, dilation, groups, conv_kernel):
    spec = _spec(d, cin, cout, k, stride, dilation, groups, dtype=torch.float32)
    x = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(2))
    params = fft.circular_params(spec)
    x1, x2 = x.clone(), x.clone()
    e1, xt1, yt1 = ops.circular_power_step_([spec.weight], [x1], params, 1)
    xt2, yt2 = [torch.empty_like(xt1[0])], [torch.empty_like(yt1[0])]
    e2 = ops.circular_power_step_reference([spec.weight], [x2], xt2, yt2, params, 1)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1, x2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xt1, xt2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yt1, yt2, rtol=1e-4, atol=1e-5)
    # the returned pair carries the estimate: <y*, A x*> = estimate
    s = ops.conv_sigma([spec.weight], xt1, yt1, params, ["circular"])
    torch.testing.assert_close(s, e1, rtol=1e-5, atol=1e-6)


def test_gradient_is_the_closed_form_and_matches_the_exact_gradient():
    spec = _spec(2, 3, 4, 3, 2, 1, 1)
    st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(0))
    fft.circular_conv_norms([spec], st, n_iter=500)
    w = spec.weight.clone().requires_grad_(True)

    def f(w_):
        return fft.circular_conv_norms([ConvSpec(**{**spec.__dict__, "weight": w_})], st, update=False)

    # f(W) = max_w |P_W(w) v(w)| at fixed vectors: its derivative is the closed form
    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-6)
    (g_fast,) = torch.autograd.grad(f(w).sum(), w)
    w2 = spec.weight.clone().requires_grad_(True)
    exact = fft.circular_conv_norms([ConvSpec(**{**spec.__dict__, "weight": w2})], exact=True)
    (g_exact,) = torch.autograd.grad(exact.sum(), w2)
    torch.testing.assert_close(g_fast, g_exact, rtol=1e-6, atol=1e-8)


def test_gradient_at_a_self_conjugate_top_frequency():
    """A kernel with equal taps peaks at w = 0 (real block, no mirror): gradient still exact."""
    w = torch.full((2, 2, 3, 3), 0.3, dtype=torch.float64) + 0.01 * torch.randn(2, 2, 3, 3, dtype=torch.float64)
    spec = ConvSpec(weight=w, input_shape=(2, 6, 6), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                    padding_mode="circular")
    st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(0))
    fft.circular_conv_norms([spec], st, n_iter=300)
    w1 = w.clone().requires_grad_(True)
    s = fft.circular_conv_norms([ConvSpec(**{**spec.__dict__, "weight": w1})], st, update=False)
    (g1,) = torch.autograd.grad(s.sum(), w1)
    w2 = w.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(fft.circular_conv_norms([ConvSpec(**{**spec.__dict__, "weight": w2})],
                                                        exact=True).sum(), w2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-8)


def test_opcheck():
    specs = [_spec(2, 3, 4, 3, 2, 1, 1, dtype=torch.float32), _spec(1, 4, 4, 5, 1, 1, 2, dtype=torch.float32)]
    xs = [torch.randn(s.input_shape) for s in specs]
    params = fft.circular_params(specs[0]) + fft.circular_params(specs[1])
    ws = [s.weight for s in specs]
    shapes = ops.circular_output_shapes(ws, xs, params)
    torch.library.opcheck(torch.ops.specreg_fast.circular_power_step_.default,
                          (ws, xs, [torch.empty_like(x) for x in xs], [torch.empty(sh) for sh in shapes], params, 2))


def test_reference_step_runs_below_the_autograd_key():
    """The reference kernel runs where the dispatcher has passed the Autograd key already (under a
    dispatch mode such as opcheck's, where _C_conv is not loaded): no autograd graph there, and
    the same step as in plain eager."""
    specs = [_spec(2, 3, 4, 3, 2, 1, 1), _spec(1, 4, 4, 5, 1, 2, 2)]
    params = fft.circular_params(specs[0]) + fft.circular_params(specs[1])
    ws = [s.weight for s in specs]
    xs0 = [torch.randn(s.input_shape, dtype=torch.float64) for s in specs]
    shapes = ops.circular_output_shapes(ws, xs0, params)
    outs = []
    for below in (False, True):
        xs, xt, yt = [x.clone() for x in xs0], [torch.empty_like(x) for x in xs0], [torch.empty(sh, dtype=torch.float64) for sh in shapes]
        if below:
            with torch._C._AutoDispatchBelowAutograd():
                s = ops.circular_power_step_reference(ws, xs, xt, yt, params, 2)
        else:
            s = ops.circular_power_step_reference(ws, xs, xt, yt, params, 2)
        outs.append([s, *xs, *xt, *yt])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_update_false_leaves_the_state_and_n_iter_zero_reads_it():
    spec = _spec(2)
    st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(0))
    x0 = st.xs[0].clone()
    a = fft.circular_conv_norms([spec], st, n_iter=5, update=False)
    assert torch.equal(st.xs[0], x0)
    b = fft.circular_conv_norms([spec], st, n_iter=0)
    assert torch.equal(st.xs[0], x0) and torch.equal(a, b)
    fft.circular_conv_norms([spec], st, n_iter=1)
    assert not torch.equal(st.xs[0], x0)


def test_zero_kernel_keeps_the_vectors_alive():
    """A zero-initialized conv (e.g. the last conv of a residual block) gives sigma 0 and must
    not zero the persistent vectors: once the weight moves, the estimate is right."""
    spec = _spec(2, seed=4)
    w = spec.weight.clone()
    spec0 = ConvSpec(**{**spec.__dict__, "weight": torch.zeros_like(w)})
    st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(0))
    assert fft.circular_conv_norms([spec0], st, n_iter=3).item() == 0.0
    assert torch.isfinite(st.xs[0]).all() and st.xs[0].abs().sum() > 0
    assert fft.circular_conv_norms([spec], st, n_iter=300).item() == pytest.approx(_exact(spec), rel=1e-8)


def test_non_finite_weight_leaves_the_state_and_returns_nan():
    spec = _spec(2)
    w = spec.weight.clone()
    w[0, 0, 0, 0] = math.inf
    bad = ConvSpec(**{**spec.__dict__, "weight": w})
    st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(0))
    x0 = st.xs[0].clone()
    out = fft.circular_conv_norms([bad, spec], fft.CircularState([st.xs[0], st.xs[0].clone()]), n_iter=2)
    assert math.isnan(out[0].item()) and math.isfinite(out[1].item())
    assert torch.equal(st.xs[0], x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    spec = _spec(2, dtype=torch.float64)
    exact = _exact(spec)
    low = ConvSpec(**{**spec.__dict__, "weight": spec.weight.to(dtype)})
    st = fft.init_circular_state([low], generator=torch.Generator().manual_seed(0))
    assert st.xs[0].dtype == torch.float32
    est = fft.circular_conv_norms([low], st, n_iter=200)
    assert est.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(est.item() - exact) <= tol * exact


def test_compile_matches_eager():
    spec = _spec(2, dtype=torch.float32)
    st1 = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(0))
    st2 = fft.CircularState([x.clone() for x in st1.xs])

    fields = {k: v for k, v in spec.__dict__.items() if k != "weight"}  # (outside: torch 2.11's dynamo
    # cannot trace a ** of an instance __dict__)

    def f(w, xs):
        return fft.circular_conv_norms([ConvSpec(weight=w, **fields)], fft.CircularState(xs), n_iter=2)

    eager = f(spec.weight, st1.xs)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(spec.weight, st2.xs)
    torch.testing.assert_close(eager, compiled)
    torch.testing.assert_close(st1.xs[0], st2.xs[0])


def test_errors():
    spec = _spec(2)
    st = fft.init_circular_state([spec])
    zeros = ConvSpec(**{**spec.__dict__, "padding_mode": "zeros"})
    with pytest.raises(ValueError, match="assume_circular=True"):
        fft.circular_conv_norms([zeros], st)
    fft.circular_conv_norms([zeros], st, assume_circular=True)  # the full wrap-around conv's norm
    with pytest.raises(ValueError, match="stride 4 must divide the input size 6"):
        fft.circular_conv_norms([_spec(2, stride=4, n=6)], fft.init_circular_state([_spec(2, stride=4, n=6)]))
    valid = ConvSpec(**{**spec.__dict__, "padding": (0, 0)})
    with pytest.raises(ValueError, match="not a circular conv"):
        fft.circular_conv_norms([valid], st)
    tr = ConvSpec(**{**spec.__dict__, "transposed": True})
    with pytest.raises(ValueError, match="not ConvTransposeNd"):
        fft.circular_conv_norms([tr], st)
    with pytest.raises(ValueError, match="state vector must be"):
        fft.circular_conv_norms([spec], fft.CircularState([torch.zeros(4, 5, 5, dtype=torch.float64)]))
    with pytest.raises(ValueError, match="one per conv"):
        fft.circular_conv_norms([spec, spec], st)
    with pytest.raises(ValueError, match="n_iter"):
        fft.circular_conv_norms([spec], st, n_iter=-1)


def test_to_circular_padding_then_model_norm():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    sf.to_circular_padding(model)
    assert all(m.padding_mode == "circular" for m in model if isinstance(m, nn.Conv2d))
    spec = ConvSpec.from_module(model[2], (4, 8, 8))
    st = fft.init_circular_state([spec], generator=torch.Generator().manual_seed(0))
    est = fft.circular_conv_norms([spec], st, n_iter=300).item()
    # the explicit matrix of the layer itself (its own circular padding)
    exact = ref.conv_sigma_exact(spec).item()
    assert est == pytest.approx(exact, rel=1e-5)


# ----------------------------------------------------------------------------- explicit blocks
@pytest.mark.parametrize("d,cin,cout,k,stride,dilation,groups", CASES)
def test_circular_blocks_equal_the_reference_blocks(d, cin, cout, k, stride, dilation, groups):
    spec = _spec(d, cin, cout, k, stride, dilation, groups)
    pad = dilation * (k - 1) // 2
    P = fft.circular_blocks(spec.weight, spec.input_shape[1:], stride, dilation, groups, padding=pad)
    full = ref.circular_transfer_blocks(spec.weight, spec.input_shape[1:], stride, dilation, pad, groups)
    m_last = spec.input_shape[-1] // stride
    half = full[(Ellipsis, slice(0, m_last // 2 + 1)) + (slice(None),) * 3]
    torch.testing.assert_close(P, half.reshape(-1, *full.shape[-2:]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_batched_power_step_matches_reference_and_converges(dtype):
    g = torch.Generator().manual_seed(0)
    real = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    P = torch.randn(7, 5, 9, generator=g, dtype=real)
    if dtype.is_complex:
        P = torch.complex(P, torch.randn(7, 5, 9, generator=g, dtype=real))
    P[3] = 0  # a zero block keeps its vectors, sigma 0
    u = torch.zeros(7, 5, dtype=dtype)
    v = torch.randn(7, 9, generator=g, dtype=real).to(dtype)
    u2, v2 = u.clone(), v.clone()
    s1 = ops.batched_power_step_(P, u, v, 4)
    s2 = ops.batched_power_step_reference(P, u2, v2, 4)
    tol = 1e-12 if real == torch.float64 else 1e-5
    torch.testing.assert_close(s1, s2, rtol=tol, atol=tol)
    torch.testing.assert_close(v, v2, rtol=tol, atol=tol)
    torch.testing.assert_close(u, u2, rtol=tol, atol=tol)
    assert s1[3] == 0 and torch.equal(v[3], v2[3])
    s = ops.batched_power_step_(P, u, v, 500)
    exact = torch.linalg.matrix_norm(P.to(torch.complex128 if dtype.is_complex else torch.float64), 2)
    torch.testing.assert_close(s.double(), exact.double(), rtol=1e-9 if real == torch.float64 else 1e-5, atol=1e-6)


def test_batched_power_step_opcheck_and_errors():
    P = torch.randn(4, 3, 5, dtype=torch.complex64)
    torch.library.opcheck(torch.ops.specreg_fast.batched_power_step_.default,
                          (P, torch.zeros(4, 3, dtype=torch.complex64), torch.randn(4, 5, dtype=torch.complex64), 2))
    u, v = torch.zeros(4, 3, dtype=torch.complex64), torch.zeros(4, 4, dtype=torch.complex64)
    # the typed front names the shapes as the Python checks print them; the kernel itself (on the
    # stable ABI: a RuntimeError) as the C++ check does
    with pytest.raises(ValueError, match=r"vs \(4, 5\), got \(4, 3\) and \(4, 4\)"):
        ops.batched_power_step_(P, u, v)
    with pytest.raises(RuntimeError if ops.HAS_CPP_EXT else ValueError,
                       match=r"vs \(4, 5\), got [\[(]4, 3[\])] and [\[(]4, 4[\])]"):
        torch.ops.specreg_fast.batched_power_step_(P, u, v, 1)
    with pytest.raises(TypeError, match="blocks' dtype"):
        ops.batched_power_step_(P, torch.zeros(4, 3, dtype=torch.complex128), torch.zeros(4, 5, dtype=torch.complex128))


@pytest.mark.parametrize("d,cin,cout,k,stride,dilation,groups", CASES[:8])
def test_block_norms_converge_and_equal_the_matrix_free_iteration(d, cin, cout, k, stride, dilation, groups):
    spec = _spec(d, cin, cout, k, stride, dilation, groups)
    exact = _exact(spec)
    st = fft.init_circular_block_state([spec], generator=torch.Generator().manual_seed(0))
    est = fft.circular_block_norms([spec], st, n_iter=300).item()
    assert abs(est - exact) <= 1e-8 * exact


def test_block_norm_gradient_is_exact():
    spec = _spec(2, 3, 4, 3, 2, 1, 1)
    st = fft.init_circular_block_state([spec], generator=torch.Generator().manual_seed(0))
    fft.circular_block_norms([spec], st, n_iter=500)
    w = spec.weight.clone().requires_grad_(True)

    def f(w_):
        return fft.circular_block_norms([ConvSpec(**{**spec.__dict__, "weight": w_})], st, update=False)

    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-6)
    (g1,) = torch.autograd.grad(f(w).sum(), w)
    w2 = spec.weight.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(fft.circular_conv_norms([ConvSpec(**{**spec.__dict__, "weight": w2})],
                                                        exact=True).sum(), w2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-8)
