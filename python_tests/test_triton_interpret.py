"""Triton kernels run by the Triton interpreter on CPU tensors, against the references.

These tests need ``TRITON_INTERPRET=1`` set before triton is imported, so they run in their
own pytest process (``make test`` does: ``TRITON_INTERPRET=1 pytest
python_tests/test_triton_interpret.py``); in any other process they skip. Sizes are small:
the interpreter executes every program in Python.
"""
import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 in its own process (see make test)"),
]

triton = pytest.importorskip("triton")

from specreg_fast import ops  # noqa: E402


def _tk():
    from specreg_fast.triton import batched_power, power_step

    return power_step, batched_power


def _state(weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    us, vs = [], []
    for W in weights:
        v = torch.randn(W.shape[1], generator=g)
        v = v / v.norm().clamp_min(1e-30) if W.shape[1] else v
        us.append(torch.zeros(W.shape[0]))
        vs.append(v)
    return us, vs


def _run_both(weights, n_iter, tol=0.0):
    ps, _ = _tk()
    us, vs = _state(weights)
    ur, vr = [u.clone() for u in us], [v.clone() for v in vs]
    est = ps.power_step_(weights, us, vs, n_iter, tol)
    ref = ops.power_step_reference(weights, ur, vr, n_iter, tol)
    return est, ref, us, vs, ur, vr


# (300, 5): 38 row blocks at the interpreter's BLOCK_M = 8, more than one REDUCE_PARTS step.
SHAPES = [[(37, 23)], [(5, 70), (64, 40), (1, 9), (9, 1)], [(24, 24), (33, 17), (300, 5)]]


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "+".join(f"{m}x{n}" for m, n in s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_power_step_matches_reference(shapes, dtype):
    weights = [torch.randn(m, n).to(dtype) for m, n in shapes]
    est, ref, us, vs, ur, vr = _run_both(weights, 3)
    assert est.dtype == torch.float32
    torch.testing.assert_close(est, ref, rtol=2e-5, atol=1e-5)
    for a, b in zip(us + vs, ur + vr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_power_step_converges_to_svd():
    torch.manual_seed(1)
    weights = [torch.randn(20, 12), torch.randn(8, 30)]
    ps, _ = _tk()
    us, vs = _state(weights)
    est = ps.power_step_(weights, us, vs, 200, 0.0)
    exact = torch.stack([torch.linalg.svdvals(W.double())[0] for W in weights]).float()
    torch.testing.assert_close(est, exact, rtol=1e-4, atol=0)
    # The returned estimate is u^T W v at the new vectors.
    torch.testing.assert_close(est, torch.stack([u @ W @ v for W, u, v in zip(weights, us, vs)]), rtol=1e-4, atol=0)


def test_mixed_dtypes_and_strides_in_one_call():
    base = torch.randn(30, 11)
    weights = [base.t(), torch.randn(16, 40)[:, ::2], torch.randn(12, 7).bfloat16()]
    est, ref, us, vs, ur, vr = _run_both(weights, 2)
    torch.testing.assert_close(est, ref, rtol=2e-5, atol=1e-5)
    for a, b in zip(us + vs, ur + vr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_zero_and_nonfinite_weights():
    bad = torch.randn(6, 5)
    bad[2, 3] = math.nan
    inf = torch.randn(4, 4)
    inf[0, 0] = math.inf
    weights = [torch.zeros(7, 4), bad, torch.randn(9, 6), inf]
    ps, _ = _tk()
    us, vs = _state(weights)
    u_before, v_before = [u.clone() for u in us], [v.clone() for v in vs]
    est = ps.power_step_(weights, us, vs, 3, 0.0)
    assert est[0] == 0 and torch.isnan(est[1]) and torch.isfinite(est[2]) and torch.isnan(est[3])
    for l in (0, 1, 3):  # zero W keeps the vectors; non-finite W rolls them back
        assert torch.equal(us[l], u_before[l]) and torch.equal(vs[l], v_before[l])
    ur, vr = [u.clone() for u in u_before], [v.clone() for v in v_before]
    ref = ops.power_step_reference(weights, ur, vr, 3, 0.0)
    torch.testing.assert_close(est, ref, rtol=2e-5, atol=1e-5, equal_nan=True)


def test_empty_layers_and_n_iter_zero():
    weights = [torch.randn(0, 5), torch.randn(6, 0), torch.randn(8, 3)]
    est, ref, us, vs, ur, vr = _run_both(weights, 2)
    torch.testing.assert_close(est, ref, rtol=2e-5, atol=1e-5)
    ps, _ = _tk()
    us, vs = _state([torch.randn(5, 4)])
    us[0] = torch.randn(5)
    W = torch.randn(5, 4)
    est0 = ps.power_step_([W], us, vs, 0, 0.0)  # n_iter = 0: u^T W v, vectors untouched
    torch.testing.assert_close(est0, (us[0] @ W @ vs[0]).reshape(1), rtol=1e-5, atol=1e-5)


def test_tol_stops_each_layer_like_the_reference():
    weights = [torch.diag(torch.tensor([3.0, 1.0, 0.5])), torch.randn(10, 6)]
    est, ref, us, vs, ur, vr = _run_both(weights, 50, tol=1e-3)
    torch.testing.assert_close(est, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(us + vs, ur + vr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigma_matches_reference(dtype):
    ps, _ = _tk()
    weights = [torch.randn(19, 13).to(dtype), torch.randn(4, 33).to(dtype).t()]
    us = [torch.randn(W.shape[0]) for W in weights]
    vs = [torch.randn(W.shape[1]) for W in weights]
    torch.testing.assert_close(ps.sigma(weights, us, vs), ops.sigma_reference(weights, us, vs), rtol=1e-5,
                               atol=1e-5)


def test_bad_input_raises_before_touching_state():
    ps, _ = _tk()
    W = torch.randn(4, 3)
    u, v = torch.zeros(4), torch.ones(3)
    with pytest.raises(TypeError, match="weights\\[0\\]"):
        ps.power_step_([W.double()], [u.double()], [v.double()], 1, 0.0)
    with pytest.raises(ValueError, match="vs\\[0\\]"):
        ps.power_step_([W], [u], [torch.ones(4)], 1, 0.0)
    assert torch.equal(u, torch.zeros(4))


# ----------------------------------------------------------------------------- batched
@pytest.mark.parametrize("B,m,n", [(3, 5, 7), (2, 16, 9), (2, 40, 300), (1, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_batched_power_matches_reference_and_svd(B, m, n, dtype):
    _, bp = _tk()
    g = torch.Generator().manual_seed(B * 100 + m)
    P = torch.randn(B, m, n, dtype=dtype, generator=g)
    v = torch.randn(B, n, dtype=dtype, generator=g)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    u = torch.zeros(B, m, dtype=dtype)
    s_ref, u_ref, v_ref = bp.batched_power_reference(P, u, v, 12)
    s, u1, v1 = bp.batched_power_iteration(P, u.clone(), v.clone(), 12)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u1, u_ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(v1, v_ref, rtol=1e-3, atol=1e-4)
    # Power iteration bounds sigma_max from below.
    exact = torch.linalg.matrix_norm(P.to(torch.complex128 if dtype.is_complex else torch.float64), ord=2)
    assert bool((s.double() <= exact * (1 + 1e-5)).all())


def test_batched_power_converges_and_handles_zero_blocks():
    _, bp = _tk()
    P = torch.randn(3, 6, 4, dtype=torch.complex64)
    P[1] = 0
    v = torch.randn(3, 4, dtype=torch.complex64)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    u = torch.zeros(3, 6, dtype=torch.complex64)
    v_before = v.clone()
    s, u1, v1 = bp.batched_power_iteration(P, u, v, 300)
    exact = torch.linalg.matrix_norm(P.to(torch.complex128), ord=2).float()
    torch.testing.assert_close(s, exact, rtol=1e-4, atol=1e-6)
    assert s[1] == 0 and torch.equal(v1[1], v_before[1])


def test_batched_power_rejects_bad_input():
    _, bp = _tk()
    with pytest.raises(ValueError, match="P"):
        bp.batched_power_iteration(torch.randn(3, 4), torch.zeros(3), torch.zeros(4), 1)
    with pytest.raises(ValueError, match="v"):
        bp.batched_power_iteration(torch.randn(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 5), 1)


# ----------------------------------------------------------------------------- through the public API
def test_spectral_norms_backend_triton_matches_reference():
    import specreg_fast
    from specreg_fast import backends

    assert "triton" in backends.available(torch.device("cpu"))  # CPU tensors only under the interpreter
    weights = [torch.randn(21, 14), torch.randn(9, 30).bfloat16(), torch.randn(6, 5, dtype=torch.float64)]
    st_a = specreg_fast.init_power_state(weights, generator=torch.Generator().manual_seed(3))
    st_b = specreg_fast.init_power_state(weights, generator=torch.Generator().manual_seed(3))
    got = specreg_fast.spectral_norms(weights, st_a, n_iter=4, backend="triton")
    ref = specreg_fast.spectral_norms(weights, st_b, n_iter=4, backend="reference")
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)
    for a, b in zip(st_a.us + st_a.vs, st_b.us + st_b.vs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # tol mode through the API (early stop per layer on the device-side flags)
    def fresh():
        return specreg_fast.init_power_state(weights[:1], generator=torch.Generator().manual_seed(4))

    got = specreg_fast.spectral_norms(weights[:1], fresh(), tol=1e-4, max_iter=30, backend="triton")
    ref = specreg_fast.spectral_norms(weights[:1], fresh(), tol=1e-4, max_iter=30, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_every_gpu_config_matches_reference():
    # The GPU launch configs (not only the interpreter's small one), on shapes that take both
    # the narrow (n <= BLOCK_N) and the chunked column paths and several row blocks.
    ps, _ = _tk()
    weights = [torch.randn(70, 300), torch.randn(130, 40), torch.randn(20, 64).t()]
    for cfg in ps.CONFIGS:
        us, vs = _state(weights)
        ur, vr = [u.clone() for u in us], [v.clone() for v in vs]
        est = ps.power_step_(weights, us, vs, 2, 0.0, config=cfg)
        ref = ops.power_step_reference(weights, ur, vr, 2, 0.0)
        torch.testing.assert_close(est, ref, rtol=2e-5, atol=1e-5, msg=lambda m: f"{cfg}: {m}")
        for a, b in zip(us + vs, ur + vr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ps.sigma(weights, us, vs, config=cfg), ops.sigma_reference(weights, us, vs),
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- low-rank (LoRA) maps
def _lowrank_maps(specs, seed=0):
    """specs: (m, n, r, s, W dtype, transposed base); float32 factors and unit v."""
    g = torch.Generator().manual_seed(seed)
    Ws, As, Bs, ss, us, vs = [], [], [], [], [], []
    for m, n, r, s, dt, tr in specs:
        W = torch.randn(n, m, generator=g).to(dt).t() if tr else torch.randn(m, n, generator=g).to(dt)
        As.append(torch.randn(r, n, generator=g))
        Bs.append(torch.randn(m, r, generator=g))
        v = torch.randn(n, generator=g)
        vs.append(v / v.norm().clamp_min(1e-30) if n else v)
        us.append(torch.zeros(m))
        Ws.append(W)
        ss.append(s)
    return Ws, As, Bs, ss, us, vs


# (300, 5, r 3): 38 row blocks at BLOCK_M = 8, more than one REDUCE_PARTS step of the r-partials
LOWRANK = [[(37, 23, 4, 0.7, False)], [(5, 70, 2, -1.2, False), (64, 40, 16, 0.3, True), (9, 1, 1, 2.0, False)],
           [(300, 5, 3, 1.5, False), (24, 24, 5, 0.5, False)]]


@pytest.mark.parametrize("specs", LOWRANK, ids=lambda s: "+".join(f"{m}x{n}r{r}" for m, n, r, *_ in s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_power_step_matches_reference(specs, dtype):
    from specreg_fast.triton import lowrank_step

    Ws, As, Bs, ss, us, vs = _lowrank_maps([(m, n, r, s, dtype, tr) for m, n, r, s, tr in specs])
    ur, vr = [u.clone() for u in us], [v.clone() for v in vs]
    est = lowrank_step.lowrank_power_step_(Ws, As, Bs, ss, us, vs, 3, 0.0)
    ref = ops.lowrank_power_step_reference(Ws, As, Bs, ss, ur, vr, 3, 0.0)
    assert est.dtype == torch.float32
    torch.testing.assert_close(est, ref, rtol=2e-5, atol=1e-5)
    for a, b in zip(us + vs, ur + vr):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_lowrank_power_step_converges_to_svd_and_keeps_conventions():
    from specreg_fast import reference
    from specreg_fast.triton import lowrank_step

    Ws, As, Bs, ss, us, vs = _lowrank_maps([(30, 20, 3, 0.8, torch.float32, False)] * 3)
    Ws[1].zero_(), Bs[1].zero_()  # the zero map: vectors kept, estimate 0
    Bs[2][4, 0] = math.nan  # non-finite: vectors as before, NaN
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    est = lowrank_step.lowrank_power_step_(Ws, As, Bs, ss, us, vs, 300, 0.0)
    want = reference.lowrank_sigma_exact(Ws[0], As[0], Bs[0], ss[0]).item()
    assert abs(est[0].item() - want) <= 1e-5 * want
    assert est[1].item() == 0 and torch.equal(vs[1], v0[1])
    assert math.isnan(est[2].item()) and torch.equal(us[2], u0[2]) and torch.equal(vs[2], v0[2])
