"""specreg_fast::lowrank_power_step_ (csrc/cpu/lowrank_step_cpu.cpp, the reference in
specreg_fast/ops/lowrank_step.py): power steps on maps W + s B A without building them, checked
against the SVD of the explicit matrix (reference.lowrank_sigma_exact), the power iteration on it
(reference.lowrank_power_iteration), opcheck, and the argument checks."""
import math

import pytest
import torch

import specreg_fast as sf
from specreg_fast import reference
from specreg_fast.ops import lowrank_power_step_, lowrank_power_step_reference
from specreg_fast.ops.lowrank_step import map_acc_dtype

OP = torch.ops.specreg_fast.lowrank_power_step_

pytestmark = pytest.mark.skipif(not sf.ops.HAS_CPP_EXT, reason="compiled extension not built")


def _maps(specs, seed=0):
    """specs: (m, n, r, s, W dtype, factor dtype, transposed base) per map; returns the op's
    argument lists with fresh unit vectors."""
    g = torch.Generator().manual_seed(seed)
    Ws, As, Bs, ss, us, vs = [], [], [], [], [], []
    for m, n, r, s, wdt, fdt, tr in specs:
        W = torch.randn(n, m, generator=g).to(wdt).t() if tr else torch.randn(m, n, generator=g).to(wdt)
        A = torch.randn(r, n, generator=g).to(fdt)
        B = torch.randn(m, r, generator=g).to(fdt)
        acc = map_acc_dtype(W, A, B)
        v = torch.randn(n, generator=g, dtype=torch.float64).to(acc)
        v /= v.norm()
        u = torch.randn(m, generator=g, dtype=torch.float64).to(acc)
        u /= u.norm()
        Ws.append(W), As.append(A), Bs.append(B), ss.append(s), us.append(u), vs.append(v)
    return Ws, As, Bs, ss, us, vs


F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
MIXED = [(40, 30, 4, 0.7, F64, F64, False), (17, 64, 2, -1.3, F64, F64, True), (64, 9, 8, 2.0, F64, F64, False),
         (300, 260, 16, 0.5, F64, F64, False)]


def test_converges_to_the_svd_of_the_explicit_map_for_every_map_of_one_call():
    Ws, As, Bs, ss, us, vs = _maps(MIXED)
    est = lowrank_power_step_(Ws, As, Bs, ss, us, vs, n_iter=3000, tol=0.0)
    assert est.dtype == F64 and est.shape == (len(MIXED),)
    for l in range(len(MIXED)):
        want = reference.lowrank_sigma_exact(Ws[l], As[l], Bs[l], ss[l])
        assert abs(est[l].item() - want.item()) <= 1e-9 * want.item(), l
        M = reference.lowrank_matrix(Ws[l], As[l], Bs[l], ss[l])
        assert abs((us[l] @ M @ vs[l]).item() - want.item()) <= 1e-9 * want.item(), l


@pytest.mark.parametrize("wdt,fdt", [(F32, F32), (BF16, F32), (F16, F32), (F64, F64), (F32, F64), (BF16, BF16)])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_steps_equal_the_power_iteration_on_the_explicit_matrix(wdt, fdt, n_iter):
    specs = [(48, 33, 3, 0.8, wdt, fdt, False), (20, 70, 5, -0.4, wdt, fdt, wdt in (F32, F64)),
             (600, 130, 16, 1.7, wdt, fdt, False)]
    Ws, As, Bs, ss, us, vs = _maps(specs, seed=1)
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    est = lowrank_power_step_(Ws, As, Bs, ss, us, vs, n_iter=n_iter)
    acc = map_acc_dtype(Ws[0], As[0], Bs[0])
    tol = dict(rtol=1e-11, atol=1e-12) if acc == F64 else dict(rtol=2e-4, atol=2e-5)
    assert est.dtype == acc
    for l in range(len(specs)):
        sig, u, v = reference.lowrank_power_iteration(Ws[l], As[l], Bs[l], ss[l], u0[l], v0[l], n_iter)
        assert us[l].dtype == acc
        torch.testing.assert_close(us[l], u, **tol)
        torch.testing.assert_close(vs[l], v, **tol)
        torch.testing.assert_close(est[l], sig.to(est.dtype), **tol)
    # the registered reference kernel (any device) takes the same steps
    ru, rv = [u.clone() for u in u0], [v.clone() for v in v0]
    rest = lowrank_power_step_reference(Ws, As, Bs, ss, ru, rv, n_iter, 0.0)
    for l in range(len(specs)):
        torch.testing.assert_close(us[l], ru[l], **tol)
        torch.testing.assert_close(vs[l], rv[l], **tol)
    torch.testing.assert_close(est, rest, **tol)


def test_n_iter_zero_is_the_bilinear_form_at_the_current_vectors():
    Ws, As, Bs, ss, us, vs = _maps(MIXED)
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    est = lowrank_power_step_(Ws, As, Bs, ss, us, vs, n_iter=0)
    for l in range(len(MIXED)):
        M = reference.lowrank_matrix(Ws[l], As[l], Bs[l], ss[l])
        torch.testing.assert_close(est[l], u0[l] @ M @ v0[l], rtol=1e-12, atol=1e-12)
        assert torch.equal(us[l], u0[l]) and torch.equal(vs[l], v0[l])


def test_tol_stops_each_map_once_converged():
    Ws, As, Bs, ss, us, vs = _maps(MIXED[:2])
    est = lowrank_power_step_(Ws, As, Bs, ss, us, vs, n_iter=100000, tol=1e-12)
    for l in range(2):
        want = reference.lowrank_sigma_exact(Ws[l], As[l], Bs[l], ss[l])
        assert abs(est[l].item() - want.item()) <= 1e-8 * want.item()


def test_zero_map_keeps_its_vectors_and_a_non_finite_one_is_rolled_back():
    Ws, As, Bs, ss, us, vs = _maps([(10, 8, 2, 1.0, F64, F64, False)] * 3)
    Ws[0].zero_(), Bs[0].zero_()  # M = 0
    Bs[1][3, 1] = math.inf  # M v overflows
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    est = lowrank_power_step_(Ws, As, Bs, ss, us, vs, n_iter=4)
    assert est[0].item() == 0 and torch.equal(us[0], u0[0]) and torch.equal(vs[0], v0[0])
    assert math.isnan(est[1].item()) and torch.equal(us[1], u0[1]) and torch.equal(vs[1], v0[1])
    assert math.isfinite(est[2].item()) and not torch.equal(vs[2], v0[2])


def test_bits_do_not_depend_on_the_thread_count():
    """1, 2 and 3 threads give bit-identical vectors and estimates (fixed chunking and summation
    order): row-major, transposed and bfloat16 bases above the per-chunk size, float32 and float64."""
    specs = [(700, 900, 16, 0.5, F32, F32, False), (500, 1100, 8, -1.0, F32, F32, True),
             (900, 600, 4, 2.0, BF16, F32, False), (640, 800, 16, 0.3, F64, F64, False)]
    Ws, As, Bs, ss, us0, vs0 = _maps(specs, seed=7)

    def run(n):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            us, vs = [u.clone() for u in us0], [v.clone() for v in vs0]
            return [OP(Ws, As, Bs, ss, us, vs, 3, 0.0), *us, *vs]
        finally:
            torch.set_num_threads(old)

    ref = run(1)
    for n in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(ref, run(n))), n


def test_opcheck():
    Ws, As, Bs, ss, us, vs = _maps([(12, 9, 2, 0.5, F32, F32, False), (7, 15, 3, 1.5, BF16, F32, False)])
    torch.library.opcheck(OP.default, (Ws, As, Bs, ss, us, vs, 2, 0.0))
    Ws, As, Bs, ss, us, vs = _maps([(12, 9, 2, 0.5, F64, F64, True)])
    torch.library.opcheck(OP.default, (Ws, As, Bs, ss, us, vs, 1, 0.0))


def _bad(case):
    Ws, As, Bs, ss, us, vs = _maps([(12, 9, 2, 0.5, F32, F32, False), (7, 15, 3, 1.5, F32, F32, False)])
    if case == "A shape":
        As[1] = torch.randn(3, 14)
    elif case == "B shape":
        Bs[1] = torch.randn(7, 2)
    elif case == "scale nan":
        ss[1] = math.nan
    elif case == "scale type":
        ss[1] = "x"
    elif case == "u dtype":
        us[1] = us[1].double()
    elif case == "v shape":
        vs[1] = torch.zeros(14)
    elif case == "A dtype":
        As[1] = As[1].to(torch.int32)
    elif case == "lengths":
        ss = ss[:1]
    elif case == "n_iter":
        return (Ws, As, Bs, ss, us, vs, -1)
    elif case == "shared":
        vs[1] = torch.zeros(22)[:15]
        us[1] = vs[1].as_strided((7,), (1,), 8)
    return (Ws, As, Bs, ss, us, vs, 2)


@pytest.mark.parametrize("case,err,match", [
    ("A shape", ValueError, r"As\[1\] must have shape \(r, 15\)"),
    ("B shape", ValueError, r"Bs\[1\] must have shape \(7, 3\)"),
    ("scale nan", ValueError, r"scales\[1\] must be finite"),
    ("scale type", TypeError, r"scales\[1\] must be a real number"),
    ("u dtype", TypeError, r"us\[1\] and vs\[1\] must be (torch.float32|Float)"),
    ("v shape", ValueError, r"vs\[1\] must have shape \(15,\)"),
    ("A dtype", TypeError, r"As\[1\] must be float32/float64/bfloat16/float16"),
    ("lengths", ValueError, r"expected one A, B, scale, u and v per weight"),
    ("n_iter", ValueError, r"n_iter must be"),
    ("shared", ValueError, r"us\[1\] and vs\[1\] share memory|vs\[1\] and us\[1\] share memory"),
])
def test_bad_input_is_a_typed_error_naming_the_argument_and_nothing_moves(case, err, match):
    Ws, As, Bs, ss, us, vs, n = _bad(case)
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    with pytest.raises(err, match=match):
        lowrank_power_step_(Ws, As, Bs, ss, us, vs, n)
    for l in range(len(us)):
        assert torch.equal(us[l], u0[l]) and torch.equal(vs[l], v0[l])
    if case != "scale type":  # the compiled kernel's own checks (a direct torch.ops call): RuntimeError
        with pytest.raises(RuntimeError, match=match):
            OP(Ws, As, Bs, ss, us, vs, n, 0.0)
        for l in range(len(us)):
            assert torch.equal(us[l], u0[l]) and torch.equal(vs[l], v0[l])
    if case not in ("scale type", "shared"):  # the registered fake/reference check the same (meta tensors)
        meta = lambda ts: [t.to("meta") for t in ts]  # noqa: E731
        with pytest.raises(err, match=match):
            OP(meta(Ws), meta(As), meta(Bs), ss, meta(us), meta(vs), n, 0.0)


def test_lowrank_sigmas_is_one_op_call_for_all_maps_and_matches_the_svd(monkeypatch):
    """dense.lowrank_sigmas (the penalty's LoRA route) hands every map to one op call; sigma and
    its gradients in A and B match the SVD of the materialized map."""
    from specreg_fast import dense
    g = torch.Generator().manual_seed(3)
    maps = []
    for m, n, r, tr, k in ((20, 12, 3, False, 1), (9, 16, 2, True, 1), (14, 14, 2, False, 2), (6, 5, 0, False, 0)):
        W = torch.randn(*((n, m) if tr else (m, n)), dtype=F64, generator=g)
        Bs = tuple(torch.randn(m, r, dtype=F64, generator=g).requires_grad_() for _ in range(k))
        As = tuple(torch.randn(r, n, dtype=F64, generator=g).requires_grad_() for _ in range(k))
        maps.append(sf.layers.LowRank(W, tr, Bs, As, tuple(0.5 + i for i in range(k))))
    state = dense.init_power_state([M.like() for M in maps], generator=g)
    calls = []
    real = sf.ops.lowrank_power_step_
    monkeypatch.setattr(sf.ops, "lowrank_power_step_", lambda *a: calls.append(len(a[0])) or real(*a))
    sig = dense.lowrank_sigmas(maps, state.us, state.vs, n_iter=2000)
    assert calls == [len(maps)]
    sig.pow(2).sum().backward()
    for M, s in zip(maps, sig):
        ref = torch.linalg.svdvals(M.matrix())[0]
        assert abs(s.item() - ref.item()) <= 1e-9 * ref.item()
        if M.As:
            want = torch.autograd.grad(ref ** 2, M.Bs + M.As)
            for got, w in zip([p.grad for p in M.Bs + M.As], want):
                torch.testing.assert_close(got, w, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- CUDA device code, emulated
# The kernels of csrc/cuda/lowrank_step_kernels.cuh compiled as host C++ (scripts/cuda_emulate/,
# as test_cuda_build.py does for the dense kernels) and run with the tables and launch sequence
# of csrc/cuda/lowrank_step_cuda.cu, against the reference kernel.
_EMU_CODES = {F32: 0, F64: 1, F16: 2, BF16: 3}


@pytest.fixture(scope="module")
def lowrank_emulator(tmp_path_factory):
    import ctypes
    import os
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path_factory.mktemp("cuda_emu_lowrank") / "emu.so"
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    src = os.path.join(root, "scripts", "cuda_emulate", "emulate_lowrank_step.cpp")
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-I", os.path.join(root, "csrc"),
                        "-I", os.path.join(root, "scripts", "cuda_emulate"), "-I", tinc, src, "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return ctypes.CDLL(str(out))


def _emu_lowrank(lib, Ws, As, Bs, ss, us, vs, n_iter, tol, sms):
    import ctypes

    L = len(Ws)
    acc = us[0].dtype
    A2 = [A.to(acc).contiguous() for A in As]
    B2 = [B.to(acc).contiguous() for B in Bs]
    dims = torch.tensor([[w.shape[0], w.shape[1], w.stride(0), w.stride(1)] for w in Ws], dtype=torch.int64).flatten()
    ranks = torch.tensor([A.shape[0] for A in As], dtype=torch.int64)
    scales = torch.tensor(ss, dtype=torch.float64)
    P = ctypes.c_void_p * L
    ptrs = lambda ts: P(*[t.data_ptr() for t in ts])  # noqa: E731
    est = torch.zeros(L, dtype=acc)
    rc = lib.emu_lowrank_step(_EMU_CODES[Ws[0].dtype], L, ctypes.c_void_p(dims.data_ptr()), ptrs(Ws), ptrs(us),
                              ptrs(vs), ptrs(A2), ptrs(B2), ctypes.c_void_p(ranks.data_ptr()),
                              ctypes.c_void_p(scales.data_ptr()), ctypes.c_int64(n_iter), ctypes.c_double(tol),
                              ctypes.c_int64(sms), ctypes.c_void_p(est.data_ptr()))
    assert rc == 0
    return est


@pytest.mark.parametrize("wdt", [F32, F64, BF16])
@pytest.mark.parametrize("n_iter", [0, 2])
def test_emulated_cuda_lowrank_step_matches_reference(lowrank_emulator, wdt, n_iter):
    fdt = F64 if wdt == F64 else F32
    # 70 rows: 3 tiles of 32; a transposed base (strided loads); rank 33 > one warp's k loop
    specs = [(70, 45, 3, 0.7, wdt, fdt, False), (30, 20, 33, -0.5, wdt, fdt, wdt != BF16),
             (9, 40, 1, 1.5, wdt, fdt, False)]
    Ws, As, Bs, ss, us, vs = _maps(specs, seed=4)
    ur, vr = [u.clone() for u in us], [v.clone() for v in vs]
    est = _emu_lowrank(lowrank_emulator, Ws, As, Bs, ss, us, vs, n_iter, 0.0, sms=1)
    ref = lowrank_power_step_reference(Ws, As, Bs, ss, ur, vr, n_iter, 0.0)
    tol = dict(rtol=1e-10, atol=1e-12) if wdt == F64 else dict(rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(est, ref.to(est.dtype), **tol)
    for a, b in zip(us + vs, ur + vr):
        torch.testing.assert_close(a, b, **(dict(rtol=1e-9, atol=1e-11) if wdt == F64 else dict(rtol=1e-4, atol=1e-5)))


def test_emulated_cuda_lowrank_zero_and_nonfinite_maps(lowrank_emulator):
    Ws, As, Bs, ss, us, vs = _maps([(10, 8, 2, 1.0, F32, F32, False)] * 3, seed=5)
    Ws[0].zero_(), Bs[0].zero_()
    Bs[1][3, 1] = math.nan
    u0, v0 = [u.clone() for u in us], [v.clone() for v in vs]
    est = _emu_lowrank(lowrank_emulator, Ws, As, Bs, ss, us, vs, 3, 0.0, sms=1)
    assert est[0].item() == 0 and torch.equal(us[0], u0[0]) and torch.equal(vs[0], v0[0])
    assert math.isnan(est[1].item()) and torch.equal(us[1], u0[1]) and torch.equal(vs[1], v0[1])
    want = reference.lowrank_power_iteration(Ws[2], As[2], Bs[2], ss[2], u0[2], v0[2], 3)[0]
    torch.testing.assert_close(est[2], want, rtol=2e-5, atol=1e-5)
