"""The conv-operator ops (specreg_fast::conv_power_step_ / conv_sigma / conv_adjoint) and
conv.conv_operator_norms, checked against svdvals of the explicit operator matrix
(reference.conv_operator_matrix), the reference power step, and autograd/opcheck."""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn as nn

from specreg_fast import conv, ops
from specreg_fast import reference as ref
from specreg_fast.reference import ConvSpec

MODES = ("zeros", "circular", "reflect", "replicate")
SIZES = {1: (11,), 2: (7, 5), 3: (5, 4, 5)}


def _module(dim, cin, cout, k, transposed=False, **kw):
    cls = ([nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d] if transposed
           else [nn.Conv1d, nn.Conv2d, nn.Conv3d])[dim - 1]
    return cls(cin, cout, k, bias=False, **kw)


def _built(dim, *, stride=1, padding=0, dilation=1, groups=1, mode="zeros", transposed=False, output_padding=0,
           cin=4, cout=4, k=3, seed=0, dtype=torch.float64, sizes=None):
    """The torch module of a case and its input shape (C_in, *spatial)."""
    torch.manual_seed(seed)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:
        kw["output_padding"] = output_padding
    else:
        kw["padding_mode"] = mode
    m = _module(dim, cin, cout, k, transposed, **kw).to(dtype)
    return m, (cin,) + (sizes or SIZES[dim])


def _spec(dim, **case):
    m, shape = _built(dim, **case)
    return ConvSpec.from_module(m, shape, weight=m.weight.detach())


def _torch_output_shape(case):
    """PyTorch's own verdict on a case's geometry, independent of this package: the module's
    output shape on a zero input, or None where PyTorch rejects the geometry."""
    m, shape = _built(**case)
    try:
        with torch.no_grad():
            return tuple(m(torch.zeros((1,) + shape, dtype=m.weight.dtype)).shape[1:])
    except RuntimeError:
        return None


def _assert_rejected_if_invalid(case, spec) -> bool:
    """True (after checking that the package raises a ValueError naming the layer, for the
    state and the power step alike) where PyTorch rejects the geometry; False where it is valid."""
    if _torch_output_shape(case) is not None:
        return False
    with pytest.raises(ValueError, match="case"):
        conv._output_shape(spec, "case")
    with pytest.raises(ValueError):
        conv.init_conv_state([spec])
    return True


def _conv_cases():
    for dim, stride, padding, dilation, groups, mode in itertools.product(
            (1, 2, 3), (1, 2), (0, 1, 2, "same"), (1, 2), (1, 2, 4), MODES):
        if padding == "same" and stride != 1:
            continue
        yield dict(dim=dim, stride=stride, padding=padding, dilation=dilation, groups=groups, mode=mode)


def _transposed_cases():
    for dim, stride, padding, dilation, groups, op in itertools.product((1, 2, 3), (1, 2), (0, 1), (1, 2), (1, 2),
                                                                        (0, 1)):
        if op >= max(stride, dilation):
            continue
        yield dict(dim=dim, stride=stride, padding=padding, dilation=dilation, groups=groups, transposed=True,
                   output_padding=op)


ALL_CASES = list(_conv_cases()) + list(_transposed_cases())


def _subset():
    # Every padding mode in every dim, plus strides, dilations, groups, 'same' with an even
    # receptive field and transposed convs with output_padding: ~30 cases.
    out = []
    for dim in (1, 2, 3):
        for i, mode in enumerate(MODES):
            out.append(dict(dim=dim, mode=mode, stride=1 + (i % 2), padding=(1, 2, "same", 1)[i],
                            dilation=1 + (i // 2 + dim) % 2, groups=(1, 2, 4, 1)[(i + dim) % 4]))
        out.append(dict(dim=dim, mode="zeros", padding="same", k=4))  # asymmetric 'same'
        out.append(dict(dim=dim, mode="reflect", padding="same", k=2, dilation=1))
        out.append(dict(dim=dim, transposed=True, stride=2, padding=1, output_padding=1, groups=2))
        out.append(dict(dim=dim, transposed=True, stride=1, padding=0, dilation=2, output_padding=1))
    out.append(dict(dim=2, mode="zeros", stride=2, padding=0))
    out.append(dict(dim=2, mode="circular", padding=0, dilation=2, groups=4))
    out.append(dict(dim=2, mode="zeros", stride=2, padding=1, cin=3, cout=5, sizes=(9, 7)))
    return out


SUBSET = _subset()


def _ident(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _run_to_convergence(spec, seed=1):
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(seed))
    params, modes = ops.pack_conv_params([spec])
    s = ops.conv_power_step_([spec.weight], st.xs, st.ys, params, modes, 20000, 1e-13)
    return s[0], st


def _gap(sv):
    """Relative gap from sigma_max to the next singular value that differs from it. An exactly
    repeated sigma_max (circular convs: frequencies w and -w are conjugate) is no obstacle to
    power iteration, only a near-repeat is."""
    rel = (sv[0] - sv) / sv[0]
    distinct = rel[rel > 1e-9]
    return distinct[0].item() if len(distinct) else 1.0


def _check_converged(case):
    spec = _spec(**case)
    if _assert_rejected_if_invalid(case, spec):
        return
    sv = torch.linalg.svdvals(ref.conv_operator_matrix(spec))
    if sv[0] == 0 or _gap(sv) < 1e-3:
        pytest.skip("top two distinct singular values within 0.1%")
    est, st = _run_to_convergence(spec)
    assert abs(est.item() - sv[0].item()) <= 1e-4 * sv[0].item(), (est.item(), sv[0].item())
    # the persistent vectors are the top singular pair of the explicit matrix
    M = ref.conv_operator_matrix(spec)
    assert torch.allclose((M @ st.xs[0].reshape(-1)).norm(), sv[0], rtol=1e-4)
    # conv_operator_norms (the public API) gives the same, and its sigma is <y, A x>
    s_api = conv.conv_operator_norms([spec], st, n_iter=0)
    assert abs(s_api.item() - sv[0].item()) <= 1e-4 * sv[0].item()


@pytest.mark.parametrize("case", SUBSET, ids=_ident)
def test_converges_to_svd_subset(case, conv_kernel):
    _check_converged(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CASES, ids=_ident)
def test_converges_to_svd_full_grid(case, conv_kernel):
    _check_converged(case)


def _check_validity_like_pytorch(cases):
    """The package accepts exactly the geometries PyTorch's own conv accepts, with its output
    shape, and rejects the others with a ValueError naming the layer."""
    invalid = 0
    for case in cases:
        m, shape = _built(**case)
        spec = ConvSpec.from_module(m, shape, weight=m.weight.detach())
        try:
            with torch.no_grad():
                expect = tuple(m(torch.zeros((1,) + shape, dtype=m.weight.dtype)).shape[1:])
        except RuntimeError:  # PyTorch rejects the geometry
            invalid += 1
            with pytest.raises(ValueError, match="layer 3"):
                conv._output_shape(spec, "layer 3")
            continue
        assert tuple(conv._output_shape(spec, "layer 3")) == expect, case
    assert 0 < invalid < len(cases)  # the cases hold both kinds


def test_geometry_validity_and_output_shape_are_pytorchs():
    """A quarter of the full grid and every other case list (no SVD: about a second)."""
    _check_validity_like_pytorch(ALL_CASES[::4] + SUBSET + ADJ_CASES + DIRECT_CASES)


@pytest.mark.slow
def test_geometry_validity_and_output_shape_are_pytorchs_full_grid():
    _check_validity_like_pytorch(ALL_CASES)


def test_subset_covers_every_mode_dim_and_transposed():
    seen = {(c["dim"], c.get("mode", "zeros"), c.get("transposed", False)) for c in SUBSET}
    for dim in (1, 2, 3):
        for mode in MODES:
            assert (dim, mode, False) in seen
        assert (dim, "zeros", True) in seen


@pytest.mark.parametrize("case", SUBSET[::3], ids=_ident)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_step_matches_reference(case, dtype, conv_kernel):
    spec = _spec(**case, dtype=dtype)
    if _assert_rejected_if_invalid(case, spec):
        return
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(3))
    x0 = st.xs[0].clone()
    s_ref, y_ref, x_ref = ref.conv_power_iteration(spec, x0, 1)
    params, modes = ops.pack_conv_params([spec])
    s = ops.conv_power_step_([spec.weight], st.xs, st.ys, params, modes, 1, 0.0)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(st.ys[0], y_ref, **tol)
    torch.testing.assert_close(st.xs[0], x_ref, **tol)
    torch.testing.assert_close(s[0], s_ref.to(s.dtype), **tol)


# Shapes that exercise the direct kernels' register tiles: output pixels below, at and above
# one 16-float vector and several column tiles (masked tails), channel counts that leave
# partial row tiles, groups, strides, dilation, asymmetric padding, Conv1d/3d.
DIRECT_CASES = [
    dict(dim=2, cin=24, cout=37, k=3, padding=1, sizes=(4, 4)),
    dict(dim=2, cin=16, cout=20, k=3, padding=1, stride=2, sizes=(9, 7)),
    dict(dim=2, cin=8, cout=13, k=1, stride=2, sizes=(16, 16)),
    dict(dim=2, cin=12, cout=12, k=3, padding=2, dilation=2, groups=3, sizes=(11, 10)),
    dict(dim=2, cin=6, cout=9, k=4, padding="same", sizes=(5, 7)),
    dict(dim=1, cin=5, cout=70, k=5, padding=2, stride=2, sizes=(33,)),
    dict(dim=3, cin=4, cout=6, k=3, padding=1, sizes=(3, 4, 5)),
    dict(dim=2, cin=10, cout=18, k=3, padding=1, stride=2, mode="circular", sizes=(8, 6)),
    dict(dim=2, cin=7, cout=20, k=5, padding=2, mode="reflect", sizes=(6, 7)),
    dict(dim=1, cin=9, cout=17, k=4, padding="same", mode="replicate", sizes=(13,)),
    dict(dim=3, cin=4, cout=6, k=3, padding=1, dilation=2, mode="circular", groups=2, sizes=(4, 5, 3)),
    # stride 3 (the generic strided copy), and kernel offsets whose whole row is padding
    dict(dim=2, cin=5, cout=11, k=3, padding=1, stride=3, sizes=(10, 11)),
    dict(dim=2, cin=4, cout=6, k=3, padding=1, stride=3, mode="reflect", sizes=(7, 8)),
    dict(dim=1, cin=3, cout=7, k=5, padding=4, dilation=2, sizes=(3,)),
    # rows shorter than 8 but too many of them for the gather table (kvol L = 125 * 288 > 2^15):
    # the run-based im2col/col2im on short rows
    dict(dim=3, cin=2, cout=3, k=5, padding=2, sizes=(12, 6, 4)),
]


@pytest.mark.parametrize("case", DIRECT_CASES, ids=_ident)
def test_direct_kernels_match_aten(case, use_conv_kernel):
    """Several float32 steps of the direct kernels equal those of the ATen path, and the
    float64 iteration converges to svdvals of the explicit matrix."""
    spec = _spec(**case, dtype=torch.float32)
    out = {}
    for kernel in ("aten", "direct"):
        use_conv_kernel(kernel)
        st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(5))
        params, modes = ops.pack_conv_params([spec])
        s = ops.conv_power_step_([spec.weight], st.xs, st.ys, params, modes, 4, 0.0)
        out[kernel] = (s, st.xs[0], st.ys[0])
    for a, b in zip(out["aten"], out["direct"]):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    use_conv_kernel("direct")
    spec64 = _spec(**case, dtype=torch.float64)
    sv = torch.linalg.svdvals(ref.conv_operator_matrix(spec64))
    if _gap(sv) > 1e-3:
        est, _ = _run_to_convergence(spec64)
        assert abs(est.item() - sv[0].item()) <= 1e-6 * sv[0].item()


def _aten_conv_calls(fn):
    """How many ATen convolutions `fn` ran (the dispatcher records every call the op makes into
    ATen): which path a conv op took, read without comparing bits, so on any CPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


def _one_step(spec, n_iter=1):
    params, modes = ops.pack_conv_params([spec])
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(5))
    return lambda: ops.conv_power_step_([spec.weight], st.xs, st.ys, params, modes, n_iter, 0.0)


@pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="one path without the compiled extension")
def test_kernel_override_switches_the_computation(use_conv_kernel):
    """The override reaches the op: under "aten" every case runs ATen convolutions, under
    "direct" none (else the tests above would compare ATen with itself). Read off the
    dispatcher's record of ATen calls, not off the last bits, which depend on the CPU."""
    for case in DIRECT_CASES:
        spec = _spec(**case, dtype=torch.float64)
        use_conv_kernel("aten")
        assert _aten_conv_calls(_one_step(spec)) > 0, case
        use_conv_kernel("direct")
        assert _aten_conv_calls(_one_step(spec)) == 0, case


@pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="one path without the compiled extension")
def test_auto_routes_depthwise_layers_to_aten(use_conv_kernel):
    """Depthwise layers go to ATen under "auto" on every CPU (the direct kernels are 2.8x
    slower on ConvNeXt's 7x7 depthwise layers: bench/bench_grouped.py), and "direct" still
    takes them; both agree to float32 rounding."""
    for k, groups in ((7, 16), (3, 16), (5, 24)):
        dw = _spec(dim=2, cin=groups, cout=groups, k=k, padding=k // 2, groups=groups, sizes=(8, 8),
                   dtype=torch.float32)
        use_conv_kernel("auto")
        assert _aten_conv_calls(_one_step(dw)) > 0, (k, groups)
        use_conv_kernel("direct")
        assert _aten_conv_calls(_one_step(dw)) == 0, (k, groups)
        runs = {}
        for kern in ("aten", "direct"):
            use_conv_kernel(kern)
            params, modes = ops.pack_conv_params([dw])
            st = conv.init_conv_state([dw], generator=torch.Generator().manual_seed(3))
            s = ops.conv_power_step_([dw.weight], st.xs, st.ys, params, modes, 2, 0.0)
            runs[kern] = (s, st.xs[0], st.ys[0])
        for a, b in zip(runs["aten"], runs["direct"]):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_direct_kernels_do_not_depend_on_thread_count(use_conv_kernel):
    use_conv_kernel("direct")
    spec = _spec(dim=2, cin=64, cout=96, k=3, padding=1, sizes=(6, 6), dtype=torch.float32)
    params, modes = ops.pack_conv_params([spec])
    threads = torch.get_num_threads()
    res = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(2))
            s = ops.conv_power_step_([spec.weight], st.xs, st.ys, params, modes, 3, 0.0)
            res.append((s, st.xs[0], st.ys[0]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*res):
        assert torch.equal(a, b)


# The direct kernels' tiles exist per ISA (AVX-512, AVX2 + FMA, portable), picked at run time
# for the CPU and capped by SPECREG_FAST_CONV_ISA (read once per process): the tests above run
# the widest tile this CPU has; these run the narrower ones in a process with a lower cap, so a
# CPU with AVX-512 also checks the tiles an AVX2-only or older CPU runs.
_ISA_TESTS = ("test_direct_kernels_match_aten or (test_converges_to_svd_subset and direct) or "
              "(test_weight_grad_is_the_gradient_of_the_bilinear_form and direct) or "
              "test_direct_kernels_do_not_depend_on_thread_count")


@pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="the tiles are the compiled extension's")
@pytest.mark.parametrize("isa", ("avx2", "generic"))
def test_direct_kernels_on_each_tile_isa(isa):
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2: the cap would run the portable tile again")
    import subprocess
    import sys

    env = dict(os.environ, SPECREG_FAST_CONV_ISA=isa)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                          "-k", _ISA_TESTS], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-2000:]


def test_init_state_rejects_a_kernel_larger_than_the_padded_input():
    """A geometry PyTorch's conv rejects (the dilated kernel spans more than the padded input)
    is a ValueError naming it when the state is built, not ATen's RuntimeError."""
    case = dict(dim=3, dilation=2, sizes=(5, 4, 5))
    assert _torch_output_shape(case) is None
    with pytest.raises(ValueError, match=r"init_conv_state: layer 0: input .* too small for the kernel: spatial dim 1"):
        conv.init_conv_state([_spec(**case)])


def test_bad_kernel_choice_is_a_clear_error(use_conv_kernel):
    # (a bad SPECREG_FAST_CONV_KERNEL value: test_op_contracts.py, in a fresh process)
    with pytest.raises(ValueError, match="the conv kernel must be 'auto', 'direct' or 'aten', got 'fastest'"):
        use_conv_kernel("fastest")


ADJ_CASES = [dict(dim=d, mode=m, padding=p, stride=s, k=k) for d in (1, 2, 3) for m in MODES
             for (p, s, k) in ((1, 1, 3), (2, 2, 3), ("same", 1, 4))] + \
            [dict(dim=d, transposed=True, stride=2, padding=1, output_padding=1) for d in (1, 2, 3)] + \
            [dict(dim=2, transposed=True, stride=1, padding=1, dilation=3, output_padding=2)]


@pytest.mark.parametrize("case", ADJ_CASES, ids=_ident)
def test_adjoint_is_exact(case):
    """The op's own A^T (the one the power step uses): <A x, y> = <x, A^T y> for random x, y,
    and A^T equals the transpose of the explicit operator matrix."""
    spec = _spec(**case)
    if _assert_rejected_if_invalid(case, spec):
        return
    g = torch.Generator().manual_seed(5)
    x = torch.randn(spec.input_shape, dtype=torch.float64, generator=g)
    Ax = ref.conv_apply(spec, x[None])[0]
    y = torch.randn(Ax.shape, dtype=torch.float64, generator=g)
    params, modes = ops.pack_conv_params([spec])
    (ATy,) = ops.conv_adjoint([spec.weight], [x], [y], params, modes)
    lhs, rhs = (Ax * y).sum(), (x * ATy).sum()
    assert abs(lhs - rhs) <= 1e-12 * (Ax.norm() * y.norm())
    M = ref.conv_operator_matrix(spec)
    torch.testing.assert_close(ATy.reshape(-1), M.t() @ y.reshape(-1), rtol=1e-10, atol=1e-12)
    # the Python reference kernel of the same op agrees
    (ATy_ref,) = ops.conv_adjoint_reference([spec.weight], [x], [y], params, modes)
    torch.testing.assert_close(ATy, ATy_ref, rtol=1e-10, atol=1e-12)


GRAD_CASES = [dict(dim=1, mode="reflect", padding="same", k=4), dict(dim=2, mode="circular", padding=1, stride=2),
              dict(dim=2, mode="replicate", padding=2, dilation=2, groups=2), dict(dim=3, mode="zeros", padding=1),
              dict(dim=2, transposed=True, stride=2, padding=1, output_padding=1, groups=2),
              dict(dim=1, transposed=True, stride=1, dilation=2, output_padding=1)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_ident)
def test_sigma_gradcheck(case, conv_kernel):
    spec = _spec(**{**case, "sizes": {1: (7,), 2: (5, 4), 3: (4, 3, 4)}[case["dim"]], "cin": 2, "cout": 4})
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(2))
    params, modes = ops.pack_conv_params([spec])
    W = spec.weight.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda w: ops.conv_sigma([w], st.xs, st.ys, params, modes), (W,))


@pytest.mark.parametrize("case", GRAD_CASES[:3] + GRAD_CASES[4:5], ids=_ident)
def test_sigma_gradient_is_gradient_of_exact_norm(case, conv_kernel):
    """At convergence d sigma/dW equals the gradient of svdvals(explicit matrix)[0]."""
    spec = _spec(**{**case, "sizes": {1: (7,), 2: (5, 4), 3: (4, 3, 4)}[case["dim"]]})
    sv = torch.linalg.svdvals(ref.conv_operator_matrix(spec))
    if (sv[0] - sv[1]) / sv[0] < 1e-3:
        pytest.skip("top two singular values too close (the gradient of sigma_max needs a simple top value)")
    # the gradient is linear in the vectors' error (the estimate only quadratic): run a fixed,
    # generous number of steps rather than stopping on the estimate
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(1))
    conv.conv_operator_norms([spec], st, n_iter=3000)
    W = spec.weight.clone().requires_grad_(True)
    s = conv.conv_operator_norms([ConvSpec(**{**spec.__dict__, "weight": W})], st, n_iter=0)
    (g,) = torch.autograd.grad(s[0], W)
    W2 = spec.weight.clone().requires_grad_(True)
    n = math.prod(spec.input_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(spec.input_shape))
    M = ref.conv_apply(ConvSpec(**{**spec.__dict__, "weight": W2}), eye).reshape(n, -1)
    (g_exact,) = torch.autograd.grad(torch.linalg.svdvals(M)[0], W2)
    torch.testing.assert_close(g, g_exact, rtol=1e-5, atol=1e-7)


def _two_layer_args():
    specs = [_spec(2, mode="reflect", padding=1, dtype=torch.float32),
             _spec(1, transposed=True, stride=2, padding=1, output_padding=1, groups=2, dtype=torch.float32)]
    st = conv.init_conv_state(specs, generator=torch.Generator().manual_seed(0))
    params, modes = ops.pack_conv_params(specs)
    return specs, st, params, modes


def test_opcheck_power_step():
    specs, st, params, modes = _two_layer_args()
    torch.library.opcheck(torch.ops.specreg_fast.conv_power_step_.default,
                          ([s.weight for s in specs], st.xs, st.ys, params, modes, 2, 0.0))


def test_opcheck_sigma():
    specs, st, params, modes = _two_layer_args()
    ws = [s.weight.clone().requires_grad_(True) for s in specs]
    torch.library.opcheck(torch.ops.specreg_fast.conv_sigma.default, (ws, st.xs, st.ys, params, modes))


def test_sigma_from_step_equals_sigma_and_its_gradient():
    """The step's estimate is <y, A x> at the new vectors: conv_sigma_from_step gives the same
    value without a convolution, and the same gradient."""
    specs, st, params, modes = _two_layer_args()
    est = ops.conv_power_step_([s.weight for s in specs], st.xs, st.ys, params, modes, 3, 0.0)
    ws1 = [s.weight.clone().requires_grad_(True) for s in specs]
    ws2 = [s.weight.clone().requires_grad_(True) for s in specs]
    a = ops.conv_sigma_from_step(ws1, st.xs, st.ys, params, modes, est)
    b = ops.conv_sigma(ws2, st.xs, st.ys, params, modes)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(a.sum(), ws1)
    g2 = torch.autograd.grad(b.sum(), ws2)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y)
    torch.library.opcheck(torch.ops.specreg_fast.conv_sigma_from_step.default, (ws1, st.xs, st.ys, params, modes, est))


def _weight_grad_case(case, dtype):
    """(spec, state, a random output-gradient y, params, modes, conv_weight_grad of (x, y))."""
    spec = _spec(**case, dtype=dtype)
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(4))
    y = torch.randn(st.ys[0].shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    params, modes = ops.pack_conv_params([spec])
    (gw,) = ops.conv_weight_grad([spec.weight], st.xs, [y], params, modes)
    return spec, st, y, params, modes, gw


@pytest.mark.parametrize("case", DIRECT_CASES + GRAD_CASES, ids=_ident)
def test_weight_grad_is_the_gradient_of_the_bilinear_form(case, conv_kernel):
    """conv_weight_grad(W, x, y) = d<y, A(W) x>/dW by autograd through the plain-PyTorch
    operator (reference.conv_apply), for every path and geometry, float32 and float64."""
    for dtype, tol in ((torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, dict(rtol=1e-4, atol=1e-5))):
        spec, st, y, params, modes, gw = _weight_grad_case(case, dtype)
        W = spec.weight.clone().requires_grad_(True)
        val = (y * ref.conv_apply(ConvSpec(**{**spec.__dict__, "weight": W}), st.xs[0][None])[0]).sum()
        (g_ref,) = torch.autograd.grad(val, W)
        assert gw.dtype == dtype and gw.shape == W.shape
        torch.testing.assert_close(gw, g_ref, **tol)


@pytest.mark.parametrize("case", DIRECT_CASES + GRAD_CASES, ids=_ident)
def test_weight_grad_add_adds_the_weight_gradient_in_place(case, conv_kernel):
    """conv_weight_grad_add_ leaves grads[l] + conv_weight_grad(...)[l] in the same tensor, for a
    contiguous grad of the accumulation dtype (the direct kernels add in their registers), a
    bfloat16 grad and a non-contiguous one."""
    for dtype, tol in ((torch.float64, dict(rtol=1e-12, atol=1e-12)), (torch.float32, dict(rtol=1e-5, atol=1e-5))):
        spec, st, y, params, modes, gw = _weight_grad_case(case, dtype)
        g0 = torch.randn(spec.weight.shape, dtype=dtype, generator=torch.Generator().manual_seed(6))
        grads = [g0.clone(), g0.to(torch.bfloat16), g0.clone().transpose(0, 1).contiguous().transpose(0, 1)]
        ptrs = [g.data_ptr() for g in grads]
        for G in grads:
            ops.conv_weight_grad_add_([G], [spec.weight], st.xs, [y], params, modes)
        assert [g.data_ptr() for g in grads] == ptrs
        torch.testing.assert_close(grads[0], g0 + gw, **tol)
        torch.testing.assert_close(grads[2], g0 + gw, **tol)
        torch.testing.assert_close(grads[1], (g0.to(torch.bfloat16) + gw).to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_weight_grad_add_checks_before_writing_and_opcheck():
    specs, st, params, modes = _two_layer_args()
    ws = [s.weight for s in specs]
    grads = [torch.zeros_like(w) for w in ws]
    bad = [grads[0], torch.zeros(3, 3)]
    with pytest.raises(ValueError, match=r"grads\[1\] must have the weight's shape"):
        ops.conv_weight_grad_add_(bad, ws, st.xs, st.ys, params, modes)
    assert not bad[0].any()  # the first layer was not written either
    with pytest.raises(ValueError, match="same length"):
        ops.conv_weight_grad_add_(grads[:1], ws, st.xs, st.ys, params, modes)
    torch.library.opcheck(torch.ops.specreg_fast.conv_weight_grad_add_.default, (grads, ws, st.xs, st.ys, params, modes))
    # the registered reference (other devices, no extension) adds the same
    g_ref = [torch.ones_like(w) for w in ws]
    g_op = [torch.ones_like(w) for w in ws]
    ops.conv_weight_grad_add_reference(g_ref, ws, st.xs, st.ys, params, modes)
    ops.conv_weight_grad_add_(g_op, ws, st.xs, st.ys, params, modes)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same length"):
        ops.conv_weight_grad_add_reference(g_ref[:1], ws, st.xs, st.ys, params, modes)


def test_weight_grad_low_precision_weight_gives_float32():
    spec = _spec(2, padding=1, dtype=torch.float32)
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(4))
    params, modes = ops.pack_conv_params([spec])
    (g32,) = ops.conv_weight_grad([spec.weight], st.xs, st.ys, params, modes)
    (g16,) = ops.conv_weight_grad([spec.weight.bfloat16()], st.xs, st.ys, params, modes)
    assert g16.dtype == torch.float32
    torch.testing.assert_close(g16, g32, rtol=2e-2, atol=2e-3)


def test_opcheck_weight_grad():
    specs, st, params, modes = _two_layer_args()
    torch.library.opcheck(torch.ops.specreg_fast.conv_weight_grad.default,
                          ([s.weight for s in specs], st.xs, st.ys, params, modes))


def test_opcheck_adjoint():
    specs, st, params, modes = _two_layer_args()
    torch.library.opcheck(torch.ops.specreg_fast.conv_adjoint.default,
                          ([s.weight for s in specs], st.xs, st.ys, params, modes))


def test_grouped_call_matches_separate_calls_and_reference_kernel():
    specs = [_spec(2, mode=m, padding=1, stride=1 + i % 2, seed=i) for i, m in enumerate(MODES)] + \
            [_spec(3, transposed=True, stride=2, padding=1, output_padding=1), _spec(1, padding="same", k=4)]
    st_a = conv.init_conv_state(specs, generator=torch.Generator().manual_seed(0))
    st_b = conv.ConvState([x.clone() for x in st_a.xs], [y.clone() for y in st_a.ys])
    st_c = conv.ConvState([x.clone() for x in st_a.xs], [y.clone() for y in st_a.ys])
    params, modes = ops.pack_conv_params(specs)
    s_a = ops.conv_power_step_([s.weight for s in specs], st_a.xs, st_a.ys, params, modes, 3, 0.0)
    s_b = torch.cat([ops.conv_power_step_([s.weight], [x], [y], *ops.pack_conv_params([s]), 3, 0.0)
                     for s, x, y in zip(specs, st_b.xs, st_b.ys)])
    s_c = ops.conv_power_step_reference([s.weight for s in specs], st_c.xs, st_c.ys, params, modes, 3, 0.0)
    torch.testing.assert_close(s_a, s_b, rtol=0, atol=0)
    torch.testing.assert_close(s_a, s_c, rtol=1e-10, atol=1e-12)
    for a, c in zip(st_a.xs + st_a.ys, st_c.xs + st_c.ys):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_tol_stops_early_and_is_close():
    spec = _spec(2, mode="zeros", padding=1, cin=8, cout=8, sizes=(8, 8))
    exact = ref.conv_sigma_exact(spec)
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(0))
    s = conv.conv_operator_norms([spec], st, tol=1e-10, max_iter=5000)
    assert abs(s.item() - exact.item()) <= 1e-4 * exact.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_weights(dtype):
    spec64 = _spec(2, mode="circular", padding=1, cin=4, cout=6)
    spec = ConvSpec(**{**spec64.__dict__, "weight": spec64.weight.to(dtype)})
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(0))
    assert st.xs[0].dtype == torch.float32 and st.ys[0].dtype == torch.float32
    W = spec.weight.clone().requires_grad_(True)
    s = conv.conv_operator_norms([ConvSpec(**{**spec.__dict__, "weight": W})], st, tol=1e-7, max_iter=3000)
    assert s.dtype == torch.float32
    # the norm of the upcast (rounded) weight, exactly
    exact = ref.conv_sigma_exact(ConvSpec(**{**spec.__dict__, "weight": spec.weight.to(torch.float64)}))
    assert abs(s.item() - exact.item()) <= 1e-4 * exact.item()
    s.sum().backward()
    assert W.grad.dtype == dtype and torch.isfinite(W.grad.float()).all()


def test_mixed_dtypes_return_float64():
    specs = [_spec(1, dtype=torch.float32), _spec(1, dtype=torch.float64)]
    st = conv.init_conv_state(specs)
    assert conv.conv_operator_norms(specs, st).dtype == torch.float64


def test_zero_weight_keeps_vectors():
    spec = _spec(2, mode="reflect", padding=1)
    st = conv.init_conv_state([spec], generator=torch.Generator().manual_seed(0))
    zero = ConvSpec(**{**spec.__dict__, "weight": torch.zeros_like(spec.weight)})
    x0, y0 = st.xs[0].clone(), st.ys[0].clone()
    s = conv.conv_operator_norms([zero], st, n_iter=3)
    assert s.item() == 0.0
    assert torch.equal(st.xs[0], x0) and torch.equal(st.ys[0], y0)


def test_nonfinite_weight_rolls_back_only_that_layer():
    specs = [_spec(2, padding=1), _spec(1, mode="circular", padding=1)]
    st = conv.init_conv_state(specs, generator=torch.Generator().manual_seed(0))
    w = specs[0].weight.clone()
    w[0, 0, 0, 0] = float("nan")
    bad = [ConvSpec(**{**specs[0].__dict__, "weight": w}), specs[1]]
    x0, y0, x1 = st.xs[0].clone(), st.ys[0].clone(), st.xs[1].clone()
    s = conv.conv_operator_norms(bad, st, n_iter=2)
    assert math.isnan(s[0].item()) and math.isfinite(s[1].item())
    assert torch.equal(st.xs[0], x0) and torch.equal(st.ys[0], y0)
    assert not torch.equal(st.xs[1], x1)


def _snapshot(st):
    return [t.clone() for t in st.xs + st.ys]


def _unchanged(st, snap):
    return all(torch.equal(a, b) for a, b in zip(st.xs + st.ys, snap))


@pytest.mark.parametrize("breakage", ["x_shape", "y_shape", "x_dtype", "count", "mode", "geometry", "n_iter",
                                      "tol", "weight_dtype"])
def test_bad_inputs_raise_and_leave_state(breakage):
    specs = [_spec(2, padding=1), _spec(1, mode="reflect", padding=2)]
    st = conv.init_conv_state(specs)
    snap = _snapshot(st)
    kw = {}
    if breakage == "x_shape":
        st.xs[1] = torch.randn(4, 10, dtype=torch.float64)
        snap = _snapshot(st)
    elif breakage == "y_shape":
        st.ys[1] = torch.randn(4, 12, dtype=torch.float64)
        snap = _snapshot(st)
    elif breakage == "x_dtype":
        st.xs[1] = st.xs[1].float()
        snap = _snapshot(st)
    elif breakage == "count":
        specs = specs + [_spec(1)]
    elif breakage == "mode":
        specs[1] = ConvSpec(**{**specs[1].__dict__, "padding_mode": "mirror"})
    elif breakage == "geometry":
        specs[1] = ConvSpec(**{**specs[1].__dict__, "padding": (20,)})  # reflect pad > input size
    elif breakage == "n_iter":
        kw["n_iter"] = -1
    elif breakage == "tol":
        kw["tol"] = float("nan")
    elif breakage == "weight_dtype":
        specs[1] = ConvSpec(**{**specs[1].__dict__, "weight": specs[1].weight.to(torch.int64)})
    with pytest.raises((ValueError, TypeError)) as info:
        conv.conv_operator_norms(specs, st, **kw)
    if breakage in ("x_shape", "y_shape", "x_dtype", "mode", "geometry", "weight_dtype"):
        assert "specs[1]" in str(info.value)
    assert _unchanged(st, snap)


def test_op_level_validation_names_layer():
    specs = [_spec(2, padding=1), _spec(1)]
    st = conv.init_conv_state(specs)
    params, modes = ops.pack_conv_params(specs)
    snap = _snapshot(st)
    with pytest.raises(ValueError, match="ys\\[1\\]"):
        ops.conv_power_step_([s.weight for s in specs], st.xs, [st.ys[0], st.ys[1][:, :-1].contiguous()], params,
                             modes, 1, 0.0)
    with pytest.raises(ValueError, match="params"):
        ops.conv_power_step_([s.weight for s in specs], st.xs, st.ys, params[:-1], modes, 1, 0.0)
    with pytest.raises(ValueError, match="layer 1"):
        ops.conv_power_step_([s.weight for s in specs], st.xs, st.ys, params, ["zeros", "mirror"], 1, 0.0)
    assert _unchanged(st, snap)


def test_torch_compile_fullgraph_matches_eager():
    specs = [_spec(2, mode="replicate", padding=1, dtype=torch.float32),
             _spec(1, transposed=True, stride=2, padding=1, output_padding=1, dtype=torch.float32)]
    st_e = conv.init_conv_state(specs, generator=torch.Generator().manual_seed(0))
    st_c = conv.ConvState([x.clone() for x in st_e.xs], [y.clone() for y in st_e.ys])

    def penalty(specs, st):
        return (conv.conv_operator_norms(specs, st, n_iter=2) ** 2).sum()

    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    ws_e = [s.weight.clone().requires_grad_(True) for s in specs]
    ws_c = [s.weight.clone().requires_grad_(True) for s in specs]
    mk = lambda ws: [ConvSpec(**{**s.__dict__, "weight": w}) for s, w in zip(specs, ws)]  # noqa: E731
    pe = penalty(mk(ws_e), st_e)
    pc = compiled(mk(ws_c), st_c)
    torch.testing.assert_close(pc, pe)
    pe.backward()
    pc.backward()
    for a, b in zip(ws_e, ws_c):
        torch.testing.assert_close(a.grad, b.grad)
    for a, b in zip(st_e.xs + st_e.ys, st_c.xs + st_c.ys):
        torch.testing.assert_close(a, b)


def test_conv_operator_norm_module():
    m = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode="reflect", bias=False).double()
    s = conv.conv_operator_norm(m, (3, 9, 8), tol=1e-12, max_iter=5000)
    exact = ref.conv_sigma_exact(ConvSpec.from_module(m, (3, 9, 8)))
    assert abs(s.item() - exact.item()) <= 1e-4 * exact.item()


def test_reference_adjoint_runs_below_the_autograd_key():
    """The reference kernels run where the dispatcher has passed the Autograd key already (a
    CompositeExplicitAutograd kernel under a dispatch mode, e.g. opcheck's SchemaCheckMode, where
    _C_conv is not loaded): no autograd graph is recorded there, so the adjoint of the reference
    must not come from autograd.grad. Each padding mode's adjoint against the explicit operator."""
    for case in GRAD_CASES:
        spec = _spec(**case)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(spec.input_shape, dtype=torch.float64, generator=g)
        y = torch.randn(ref.conv_apply(spec, x[None])[0].shape, dtype=torch.float64, generator=g)
        params, modes = ops.pack_conv_params([spec])
        with torch._C._AutoDispatchBelowAutograd():
            (ATy,) = ops.conv_adjoint_reference([spec.weight], [x], [y], params, modes)
        M = ref.conv_operator_matrix(spec)
        torch.testing.assert_close(ATy.reshape(-1), M.t() @ y.reshape(-1), rtol=1e-10, atol=1e-12, msg=str(case))
