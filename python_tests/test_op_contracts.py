"""Contracts of the C++ ops on bad or unusual input (issue 15, items 8, 9, 10, 15, 16): the
iteration cap and Ctrl-C, one device per call, no written vector sharing memory with another
argument, validated estimates of the *_from_step ops, the circular restart from a zero state,
bit-identical results under every thread count, and the conv kernel choice read once.

Risky cases (a hang, a signal, a fresh environment) run in a subprocess so that a failure is a
failed test, not a dead or stuck pytest."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import specreg_fast as sf
from specreg_fast import conv, ops
from specreg_fast.reference import ConvSpec

pytestmark = pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="contracts of the compiled kernels")

P = torch.ops.specreg_fast
# The ops whose CPU kernels are built on the LibTorch stable ABI (specreg_fast._C), every one now,
# the conv ops included: called directly, their argument errors are RuntimeError (the stable ABI
# has no typed errors); the typed front, specreg_fast.ops, raises the ValueError/TypeError
# (ops._checks.typed_call).
STABLE_OPS = {"power_step_", "sigma", "sigma_from_step", "batched_power_step_", "shifted_cholesky_info",
              "conv_power_step_", "conv_sigma", "conv_sigma_from_step", "conv_adjoint", "conv_weight_grad",
              "conv_weight_grad_add_", "circular_power_step_", "set_conv_kernel"}


# Tests of the compiled conv kernels themselves (their C++ checks, interrupt poll, kernel switch):
# without specreg_fast._C (HAS_CONV_EXT is HAS_CPP_EXT) the conv ops run the reference.
needs_conv_ext = pytest.mark.skipif(not ops.HAS_CONV_EXT, reason="the compiled CPU conv kernels are not loaded")


def raw_error(name, typed):
    """What a direct torch.ops.specreg_fast.<name> call raises where the front raises `typed`."""
    return RuntimeError if name in STABLE_OPS else typed


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 2-D 3x3 conv, stride 1, dilation 1, padding 1 on each side (packing: csrc/specreg_fast.cpp);
# in circular mode that is the full wrap-around padding dilation*(k-1) the circular op needs.
CONV3 = CIRC3 = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def _run(code: str, timeout: float, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env, timeout=timeout,
                          capture_output=True, text=True)


@needs_conv_ext
def test_bad_conv_isa_cap_is_a_clear_error():
    """A bad SPECREG_FAST_CONV_ISA (the cap on the direct kernels' tile ISA) is a ValueError of
    every conv call naming the variable and its values, before anything is written (fresh
    process)."""
    code = f"""
        import torch, specreg_fast as sf
        x, y = torch.randn(3, 6, 6), torch.randn(4, 6, 6)
        snap = (x.clone(), y.clone())
        try:
            sf.ops.conv_power_step_([torch.randn(4, 3, 3, 3)], [x], [y], {CONV3}, ["zeros"], 1, 0.0)
        except ValueError as e:
            assert "SPECREG_FAST_CONV_ISA must be auto, avx512, avx2 or generic, got 'avx3'" in str(e), str(e)
            assert torch.equal(x, snap[0]) and torch.equal(y, snap[1])
            print("rejected")
    """
    out = _run(code, timeout=120, env={"SPECREG_FAST_CONV_ISA": "avx3"})
    assert out.stdout.split() == ["rejected"], out.stderr[-2000:]


# ----------------------------------------------------------------------------- item 8: iteration cap
def test_cpp_cap_is_ops_max_iter():
    """The C++ cap is ops.MAX_ITER: MAX_ITER + 1 is rejected by every op with n_iter, MAX_ITER
    accepted (where a call of MAX_ITER steps is free: zero-size inputs)."""
    Wc, x, y = torch.randn(4, 3, 3, 3), torch.randn(3, 6, 6), torch.randn(4, 6, 6)
    cases = {
        "power_step_": lambda n: P.power_step_([torch.zeros(0, 3)], [torch.zeros(0)], [torch.zeros(3)], n, 0.0),
        "batched_power_step_": lambda n: P.batched_power_step_(torch.zeros(0, 2, 2), torch.zeros(0, 2),
                                                               torch.zeros(0, 2), n),
        "conv_power_step_": lambda n: P.conv_power_step_([Wc], [x], [y], CONV3, ["zeros"], n, 0.0),
        "circular_power_step_": lambda n: P.circular_power_step_([Wc], [x], [x.clone()], [y], CIRC3, n),
    }
    for name, call in cases.items():
        if name in ("power_step_", "batched_power_step_"):
            call(ops.MAX_ITER)
        with pytest.raises(raw_error(name, ValueError), match=rf"n_iter must be in \[0, {ops.MAX_ITER}\]"):
            call(ops.MAX_ITER + 1)


def test_huge_iteration_counts_are_rejected_not_run():
    """The issue's hangs (2**40 steps) raise a ValueError naming n_iter / max_iter at once
    (in a subprocess: before the cap they never return)."""
    code = f"""
        import torch, torch.nn as nn, specreg_fast as sf
        P = torch.ops.specreg_fast
        W = torch.randn(6, 5)
        calls = {{  # (every op through its typed front: see STABLE_OPS)
            "power_step_": lambda: sf.ops.power_step_([W], [torch.randn(6)], [torch.randn(5)], 2**40, 0.0),
            "batched_power_step_": lambda: sf.ops.batched_power_step_(torch.randn(3, 4, 5), torch.randn(3, 4),
                                                                      torch.randn(3, 5), 2**40),
            "conv_power_step_": lambda: sf.ops.conv_power_step_([torch.randn(4, 3, 3, 3)], [torch.randn(3, 6, 6)],
                                                                [torch.randn(4, 6, 6)], {CONV3}, ["zeros"], 2**40, 0.0),
            "circular_power_step_": lambda: sf.ops.circular_power_step_(
                [torch.randn(4, 3, 3, 3)], [torch.randn(3, 6, 6)], {CIRC3}, 2**40),
            "spectral_norm": lambda: sf.spectral_norm(W, tol=0.0, max_iter=2**40),
            "conv_operator_norm": lambda: sf.conv_operator_norm(nn.Conv2d(3, 4, 3, padding=1), (3, 6, 6),
                                                                tol=0.0, max_iter=2**40),
            "spectral_norms n_iter": lambda: sf.spectral_norms([W], sf.init_power_state([W]), n_iter=2**63),
        }}
        for name, call in calls.items():
            try:
                call()
                print(name, "returned")
            except ValueError as e:
                assert ("n_iter" in str(e) or "max_iter" in str(e)) and "{ops.MAX_ITER}" in str(e), str(e)
                print(name, "rejected")
    """
    out = _run(code, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert sum(line.endswith("rejected") for line in lines) == 7, out.stdout


# ----------------------------------------------------------------------------- item 8: Ctrl-C
@needs_conv_ext
def test_ctrl_c_stops_a_long_call_and_restores_the_vectors():
    """A call of MAX_ITER steps (minutes) gets SIGINT ~0.5 s after it starts: it must end within
    a few seconds with the KeyboardInterrupt named, its vectors as before the call. One
    subprocess runs the four looping ops one after another."""
    code = f"""
        import signal, sys, time, torch, specreg_fast
        # Python leaves SIGINT alone when it starts with it ignored (a background job of a
        # non-interactive shell: CI runners, nohup): the default handler, as in a terminal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        P = torch.ops.specreg_fast
        N = {ops.MAX_ITER}
        torch.manual_seed(0)
        W = torch.randn(1024, 1024)
        Wc = torch.randn(64, 64, 3, 3)
        blocks = torch.randn(256, 32, 32, dtype=torch.complex64)
        st = {{
            "power_step_": [torch.randn(1024), torch.randn(1024)],
            "batched_power_step_": [torch.randn(256, 32, dtype=torch.complex64),
                                    torch.randn(256, 32, dtype=torch.complex64)],
            "conv_power_step_": [torch.randn(64, 32, 32), torch.randn(64, 32, 32)],
            "circular_power_step_": [torch.randn(64, 32, 32)],
        }}
        calls = {{
            "power_step_": lambda s: P.power_step_([W, W.double()], [s[0], s[0].double()],
                                                   [s[1], s[1].double()], N, 0.0),
            "batched_power_step_": lambda s: P.batched_power_step_(blocks, s[0], s[1], N),
            "conv_power_step_": lambda s: P.conv_power_step_([Wc, Wc], [s[0], s[0].clone()], [s[1], s[1].clone()],
                                                             {CONV3} * 2, ["zeros"] * 2, N, 0.0),
            "circular_power_step_": lambda s: P.circular_power_step_(
                [Wc, Wc], [s[0], s[0].clone()], [torch.empty(64, 32, 32) for _ in range(2)],
                [torch.empty(64, 32, 32) for _ in range(2)], {CIRC3} * 2, N),
        }}
        for name, call in calls.items():
            before = [t.clone() for t in st[name]]
            print("start", name, flush=True)
            t0 = time.perf_counter()
            try:
                call(st[name])
                print("returned", name, flush=True)
            except (RuntimeError, KeyboardInterrupt) as e:
                same = all(torch.equal(a, b) for a, b in zip(before, st[name]))
                print("stopped", name, "KeyboardInterrupt" in f"{{type(e).__name__}} {{e}}", same,
                      round(time.perf_counter() - t0, 2), flush=True)
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = []
    try:
        for _ in range(4):
            line = proc.stdout.readline()
            if not line.startswith("start"):
                proc.kill()
                pytest.fail(f"{line!r} {proc.communicate()[1][-3000:]}")
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            t0 = time.perf_counter()
            ready, _, _ = select.select([proc.stdout], [], [], 30.0)  # a call deaf to SIGINT: fail, not hang
            line = proc.stdout.readline() if ready else "still running"
            results.append((line.split(), time.perf_counter() - t0))
            if not ready:
                break
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            results.append((["exit", "hangs"], 30.0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()[-2000:]
    for fields, waited in results:
        assert fields and fields[0] == "stopped" and fields[2:4] == ["True", "True"], (results, stderr)
        assert waited < 5.0, (results, stderr)


# ----------------------------------------------------------------------------- item 9: devices
@needs_conv_ext
def test_cpu_kernels_reject_a_layer_on_another_device():
    """The CPU kernels themselves (reached directly, below the fakes): a meta layer among CPU
    layers is a clear error, not uninitialized memory."""
    cpu_ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    Wc = torch.randn(4, 3, 3, 3)
    x, y = torch.randn(3, 6, 6), torch.randn(4, 6, 6)
    meta = [t.to("meta") for t in (Wc, x, y)]
    with pytest.raises(raw_error("conv_sigma", ValueError), match=r"weights\[1\] is on meta"):
        P.conv_sigma.default.redispatch(cpu_ks, [Wc, meta[0]], [x, meta[1]], [y, meta[2]], CONV3 * 2, ["zeros"] * 2)
    xs, ys = [x.clone(), meta[1]], [y.clone(), meta[2]]
    with pytest.raises(raw_error("conv_power_step_", ValueError), match=r"weights\[1\] is on meta"):
        P.conv_power_step_.default.redispatch(cpu_ks, [Wc, meta[0]], xs, ys, CONV3 * 2, ["zeros"] * 2, 2, 0.0)
    assert torch.equal(xs[0], x) and torch.equal(ys[0], y)
    with pytest.raises(raw_error("circular_power_step_", ValueError), match=r"weights\[1\] is on meta"):
        P.circular_power_step_.default.redispatch(cpu_ks, [Wc, meta[0]], [x.clone(), meta[1]],
                                                  [x.clone(), meta[1].clone()], [y.clone(), meta[2].clone()],
                                                  CIRC3 * 2, 1)
    W, u, v = torch.randn(5, 4), torch.randn(5), torch.randn(4)
    with pytest.raises(raw_error("sigma_from_step", ValueError), match="est is on meta"):
        P.sigma_from_step.default.redispatch(cpu_ks, [W], [u], [v], torch.ones(1, device="meta"))


# ----------------------------------------------------------------------------- item 10: *_from_step
def test_sigma_from_step_validates_its_arguments():
    W, u, v = torch.randn(5, 4), torch.randn(5), torch.randn(4)
    with pytest.raises(raw_error("sigma_from_step", ValueError), match=r"est must hold one estimate per layer, shape \(1,\)"):
        P.sigma_from_step([W], [u], [v], torch.ones(3))
    with pytest.raises(raw_error("sigma_from_step", TypeError), match="est must be Float"):
        P.sigma_from_step([W], [u], [v], torch.ones(1, dtype=torch.float64))
    # the typed front: the same checks as ValueError/TypeError naming the argument
    with pytest.raises(ValueError, match=r"est must hold one estimate per layer, shape \(1,\)"):
        ops.sigma_from_step([W], [u], [v], torch.ones(3))
    with pytest.raises(TypeError, match=r"est must be torch.float32 \(the power step's dtype\)"):
        ops.sigma_from_step([W], [u], [v], torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"vs\[0\] must have shape \(4,\)"):
        P.sigma_from_step([W], [u], [torch.randn(5)], torch.ones(1))
    torch.testing.assert_close(P.sigma_from_step([W], [u], [v], torch.full((1,), 2.5)), torch.full((1,), 2.5))


def test_conv_sigma_from_step_validates_its_arguments():
    Wc, x, y = torch.randn(4, 3, 3, 3), torch.randn(3, 6, 6), torch.randn(4, 6, 6)
    err = raw_error("conv_sigma_from_step", ValueError)
    with pytest.raises(err, match=r"est must hold one estimate per layer, shape \(1,\)"):
        P.conv_sigma_from_step([Wc], [x], [y], CONV3, ["zeros"], torch.ones(3))
    with pytest.raises(err, match=r"ys\[0\] must have the output shape"):
        P.conv_sigma_from_step([Wc], [x], [torch.randn(4, 5, 5)], CONV3, ["zeros"], torch.ones(1))
    with pytest.raises(err, match="params"):
        P.conv_sigma_from_step([Wc], [x], [y], CONV3[:-1], ["zeros"], torch.ones(1))
    # the typed front: the same checks as ValueError/TypeError naming the argument
    with pytest.raises(ValueError, match=r"est must hold one estimate per layer, shape \(1,\)"):
        ops.conv_sigma_from_step([Wc], [x], [y], CONV3, ["zeros"], torch.ones(3))
    with pytest.raises(ValueError, match=r"ys\[0\] must have the output shape"):
        ops.conv_sigma_from_step([Wc], [x], [torch.randn(4, 5, 5)], CONV3, ["zeros"], torch.ones(1))
    # the public path still differentiates through it
    Wg = Wc.clone().requires_grad_()
    s = P.conv_sigma_from_step([Wg], [x], [y], CONV3, ["zeros"], torch.ones(1))
    s.sum().backward()
    torch.testing.assert_close(Wg.grad, P.conv_weight_grad([Wc], [x], [y], CONV3, ["zeros"])[0])


# ----------------------------------------------------------------------------- item 10: circular restart
def test_circular_step_from_a_zero_state_restarts_like_the_reference():
    """All-zero state: every frequency restarts at e_0 (the reference's convention), so the C++
    estimates equal the reference's call after call (main: NaN forever)."""
    torch.manual_seed(0)
    W = torch.randn(4, 3, 3, 3)
    x_cpp, x_ref = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    for _ in range(3):
        est, x_top, y_top = ops.circular_power_step_([W], [x_cpp], CIRC3, 1)
        want = ops.circular_power_step_reference([W], [x_ref], [torch.empty(3, 8, 8)], [torch.empty(4, 8, 8)],
                                                 CIRC3, 1)
        torch.testing.assert_close(est, want, rtol=1e-5, atol=0)
        torch.testing.assert_close(x_cpp, x_ref, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(x_top[0]).all() and torch.isfinite(y_top[0]).all()
    # a zero weight from a zero state: estimate 0 and finite top pairs (no 0/0)
    est, x_top, y_top = ops.circular_power_step_([torch.zeros(4, 3, 3, 3)], [torch.zeros(3, 8, 8)], CIRC3, 2)
    assert est.item() == 0.0 and torch.isfinite(x_top[0]).all() and torch.isfinite(y_top[0]).all()


# ----------------------------------------------------------------------------- item 10: shared memory
def _dense_aliasing_cases():
    W = torch.randn(6, 6)
    u = torch.randn(6)
    buf = torch.randn(12)
    return {
        "u is v": ([W], [u], [u]),
        "one u for two layers": ([W, W], [u, u], [torch.randn(6), torch.randn(6)]),
        "overlapping views": ([W, W], [buf[:6], buf[3:9]], [torch.randn(6), torch.randn(6)]),
        "u inside the weight": ([W], [W[0]], [torch.randn(6)]),
    }


@pytest.mark.parametrize("case", list(_dense_aliasing_cases()))
def test_power_step_rejects_vectors_that_share_memory(case):
    weights, us, vs = _dense_aliasing_cases()[case]
    snap = [t.clone() for t in weights + us + vs]
    with pytest.raises(raw_error("power_step_", ValueError), match="share memory"):
        P.power_step_(weights, us, vs, 2, 0.0)
    with pytest.raises(ValueError, match="share memory"):  # the typed front
        ops.power_step_(weights, us, vs, 2, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(snap, weights + us + vs))


def test_shared_weights_and_disjoint_views_are_accepted():
    """Tied weights (one tensor read by two layers) and vectors that are disjoint slices of one
    buffer are legitimate."""
    W = torch.randn(6, 6)
    buf = torch.randn(24)
    us, vs = [buf[0:6], buf[6:12]], [buf[12:18], buf[18:24]]
    est = P.power_step_([W, W], us, vs, 3, 0.0)
    assert torch.isfinite(est).all() and torch.equal(P.sigma([W, W], us, vs), P.sigma([W, W], us, vs))


def test_other_ops_reject_written_tensors_that_share_memory():
    Wc, x, y = torch.randn(4, 3, 3, 3), torch.randn(3, 6, 6), torch.randn(4, 6, 6)
    with pytest.raises(raw_error("conv_power_step_", ValueError), match=r"xs\[0\] and xs\[1\] share memory"):
        P.conv_power_step_([Wc, Wc], [x, x], [y, y.clone()], CONV3 * 2, ["zeros"] * 2, 1, 0.0)
    with pytest.raises(raw_error("conv_weight_grad_add_", ValueError), match="share memory"):
        P.conv_weight_grad_add_([Wc], [Wc], [x], [y], CONV3, ["zeros"])
    with pytest.raises(raw_error("circular_power_step_", ValueError), match=r"share memory"):
        P.circular_power_step_([Wc], [x], [x], [y], CIRC3, 1)
    # the typed front raises them as ValueError (share memory: a check only the kernel makes)
    with pytest.raises(ValueError, match=r"share memory"):
        ops.conv_power_step_([Wc, Wc], [x, x], [y, y.clone()], CONV3 * 2, ["zeros"] * 2, 1, 0.0)
    with pytest.raises(ValueError, match="share memory"):
        ops.conv_weight_grad_add_([Wc], [Wc], [x], [y], CONV3, ["zeros"])
    blocks, u = torch.randn(3, 4, 4), torch.randn(3, 4)
    shared = "us\\[0\\] and vs\\[0\\] share memory|vs\\[0\\] and us\\[0\\] share memory"
    with pytest.raises(raw_error("batched_power_step_", ValueError), match=shared):
        P.batched_power_step_(blocks, u, u, 1)
    with pytest.raises(ValueError, match=shared):  # the typed front
        ops.batched_power_step_(blocks, u, u, 1)


def test_batched_step_rejects_conj_views_it_would_write_and_reads_conj_blocks():
    """PyTorch's conj fallback stops at an internal assert for a written conj view: a clear
    ValueError instead; a conj view of the (read-only) blocks is read as its conjugate."""
    B = torch.randn(4, 3, 5, dtype=torch.complex64)
    u, v = torch.randn(4, 3, dtype=torch.complex64), torch.randn(4, 5, dtype=torch.complex64)
    with pytest.raises(ValueError, match="lazy conj/neg views"):
        P.batched_power_step_(B, u.clone().conj(), v.clone(), 2)
    u1, v1, u2, v2 = u.clone(), v.clone(), u.clone(), v.clone()
    s1 = P.batched_power_step_(B.conj(), u1, v1, 3)
    s2 = P.batched_power_step_(B.conj().resolve_conj(), u2, v2, 3)
    assert torch.equal(s1, s2) and torch.equal(u1, u2) and torch.equal(v1, v2)


# ----------------------------------------------------------------------------- item 15: thread count
def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_power_step_bits_do_not_depend_on_the_thread_count():
    """The same steps under 1, 2 and 3 threads give bit-identical vectors and estimates: row-major,
    transposed (column-major) and bfloat16 weights above the per-chunk size, float32 and
    float64. (Identical bits across CPUs with different SIMD widths are not claimed.)"""
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(700, 900, generator=g), torch.randn(1100, 500, generator=g).t(),
               torch.randn(900, 600, generator=g).to(torch.bfloat16), torch.randn(640, 800, generator=g).double()]
    us0 = [torch.randn(w.shape[0], generator=g, dtype=ops.acc_dtype(w.dtype)) for w in weights]
    vs0 = [torch.randn(w.shape[1], generator=g, dtype=ops.acc_dtype(w.dtype)) for w in weights]

    def run():
        us, vs = [u.clone() for u in us0], [v.clone() for v in vs0]
        est = P.power_step_(weights, us, vs, 3, 0.0)
        return [est, P.sigma(weights, us, vs), *us, *vs]

    ref = _with_threads(1, run)
    for n in (2, 3):
        got = _with_threads(n, run)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), n


def test_batched_and_circular_bits_do_not_depend_on_the_thread_count(use_conv_kernel):
    g = torch.Generator().manual_seed(4)
    blocks = torch.randn(300, 16, 24, generator=g, dtype=torch.complex64)
    u0 = torch.randn(300, 16, generator=g, dtype=torch.complex64)
    v0 = torch.randn(300, 24, generator=g, dtype=torch.complex64)
    Wc = torch.randn(16, 8, 3, 3, generator=g)
    x0 = torch.randn(8, 16, 16, generator=g)

    def run():
        u, v, x = u0.clone(), v0.clone(), x0.clone()
        s = P.batched_power_step_(blocks, u, v, 4)
        est, xt, yt = ops.circular_power_step_([Wc], [x], CIRC3, 3)
        return [s, u, v, est, x, xt[0], yt[0]]

    use_conv_kernel("direct")
    ref = _with_threads(1, run)
    for n in (2, 3):
        got = _with_threads(n, run)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), n


# ----------------------------------------------------------------------------- item 16: read once
@needs_conv_ext
def test_conv_kernel_environment_is_read_once(monkeypatch):
    """SPECREG_FAST_CONV_KERNEL is read at the first conv call, not per call: changing it later
    changes nothing (set_conv_kernel does); a bad initial value is a clear error of every conv
    call, before anything is written (fresh process)."""
    Wc, x, y = torch.randn(4, 3, 3, 3), torch.randn(3, 6, 6), torch.randn(4, 6, 6)
    P.conv_sigma([Wc], [x], [y], CONV3, ["zeros"])  # the first conv call of the process, at the latest
    monkeypatch.setenv("SPECREG_FAST_CONV_KERNEL", "fastest")
    P.conv_power_step_([Wc], [x], [y], CONV3, ["zeros"], 1, 0.0)
    code = f"""
        import torch, specreg_fast as sf
        P = torch.ops.specreg_fast
        x, y = torch.randn(3, 6, 6), torch.randn(4, 6, 6)
        snap = (x.clone(), y.clone())
        msg = "specreg_fast::conv_power_step_: SPECREG_FAST_CONV_KERNEL must be auto, direct or aten, got 'fastest'"
        try:  # the kernel's own error (stable ABI: RuntimeError) ...
            P.conv_power_step_([torch.randn(4, 3, 3, 3)], [x], [y], {CONV3}, ["zeros"], 1, 0.0)
        except RuntimeError as e:
            assert msg in str(e), str(e)
        try:  # ... a ValueError from the typed front
            sf.ops.conv_power_step_([torch.randn(4, 3, 3, 3)], [x], [y], {CONV3}, ["zeros"], 1, 0.0)
        except ValueError as e:
            assert msg in str(e), str(e)
            assert torch.equal(x, snap[0]) and torch.equal(y, snap[1])
            print("rejected", sf.conv.set_conv_kernel("aten"))
            P.conv_power_step_([torch.randn(4, 3, 3, 3)], [x], [y], {CONV3}, ["zeros"], 1, 0.0)
            print("fixed")
    """
    out = _run(code, timeout=120, env={"SPECREG_FAST_CONV_KERNEL": "fastest"})
    assert out.stdout.split() == ["rejected", "invalid", "fixed"], out.stderr[-2000:]
