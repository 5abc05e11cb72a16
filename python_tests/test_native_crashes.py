"""Regression tests for the native crashes of issue 15 (items 4-7), one per reproducer.

Each reproducer killed the interpreter (SIGABRT, SIGSEGV, SIGFPE) or returned a wrong
number, so each runs in a subprocess that must exit cleanly after printing what the call did:
a clear Python exception or the right value.
"""
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import torch, torch.nn as nn
import specreg_fast as sf
# The typed front (specreg_fast.ops): it calls the compiled kernel first, whose checks are under
# test (on the LibTorch stable ABI their errors are RuntimeError), and raises a failed argument
# check as the ValueError/TypeError the reproducers expect (ops._checks.typed_call).
P = sf.ops
torch.manual_seed(0)
def expect_error(fn, exc, *words):
    try:
        fn()
    except exc as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        assert not missing, f"message {msg!r} lacks {missing}"
        print("RAISED", type(e).__name__, msg.splitlines()[0])
        return
    raise AssertionError("no exception")
"""


def _run(code, kernel="auto", timeout=900):
    env = dict(os.environ, SPECREG_FAST_CONV_KERNEL=kernel, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, f"exit code {proc.returncode} (negative: killed by signal)\n{proc.stderr[-3000:]}"
    return proc.stdout


KERNELS = pytest.mark.parametrize("kernel", ["direct", "aten"])


@KERNELS
def test_dilation_overflow_is_a_value_error(kernel):
    # item 4: dilation * (k - 1) = 2^62 * 4 wraps to 0 in int64; the direct kernel then wrote
    # outside im2col/col2im's buffers (heap corruption, SIGABRT).
    out = _run("""
        expect_error(lambda: P.conv_power_step_([torch.randn(1, 1, 5)], [torch.randn(1, 6)], [torch.randn(1, 6)],
                                                [0, 1, 1, 2**62, 0, 0, 0], ['reflect'], 1, 0.0),
                     ValueError, "dilation * (kernel_size - 1)", "overflows")
        # a padding sum and a transposed conv's output size that wrap
        expect_error(lambda: P.conv_power_step_([torch.randn(1, 1, 1)], [torch.randn(1, 2)], [torch.randn(1, 2)],
                                                [0, 1, 1, 1, 2**62, 2**62, 0], ['zeros'], 1, 0.0),
                     ValueError, "padding", "overflows")
        expect_error(lambda: P.conv_power_step_([torch.randn(1, 1, 1)], [torch.randn(1, 3)], [torch.randn(1, 3)],
                                                [1, 1, 2**62, 1, 0, 0, 0], ['zeros'], 1, 0.0),
                     ValueError, "stride", "overflows")
    """, kernel)
    assert out.count("RAISED ValueError") == 3


@KERNELS
def test_zero_size_operator_has_norm_zero(kernel):
    # item 5: a zero-length input with replicate padding (the output is not empty) segfaulted
    # the direct kernels; the zero map now has norm 0 on both paths, through the public API
    # and every raw op, 1-D and 2-D, float32 and float64.
    out = _run("""
        conv = nn.Conv1d(2, 2, 1, padding=1, padding_mode='replicate')
        spec = sf.ConvSpec.from_module(conv, (2, 0))
        y = torch.randn(2, 2)
        est = sf.conv_operator_norms([spec], sf.ConvState([torch.zeros(2, 0)], [y.clone()]))
        assert est.tolist() == [0.0], est
        for d, dt in ((1, torch.float32), (2, torch.float32), (1, torch.float64), (2, torch.float64)):
            W = torch.randn((2, 2) + (1,) * d, dtype=dt)
            x = torch.zeros((2, 0) + (3,) * (d - 1), dtype=dt)
            y = torch.randn((2, 2) + (5,) * (d - 1), dtype=dt)
            params = [0, 1] + [1] * d + [1] * d + [1] * d + [1] * d + [0] * d
            args = ([W], [x], [y], params, ['replicate'])
            y0 = y.clone()
            assert P.conv_power_step_(*args, 2, 0.0).tolist() == [0.0]
            assert torch.equal(y, y0)
            assert P.conv_sigma(*args).tolist() == [0.0]
            assert torch.equal(P.conv_weight_grad(*args)[0], torch.zeros_like(W))
            assert P.conv_adjoint(*args)[0].shape == x.shape
            g = torch.ones_like(W)
            P.conv_weight_grad_add_([g], *args)
            assert torch.equal(g, torch.ones_like(W))
        print("ZERO OK")
    """, kernel)
    assert "ZERO OK" in out


@KERNELS
def test_kernel_larger_than_padded_input_is_rejected(kernel):
    # item 6: truncating division made (-1) // 2 + 1 = 1, so an empty padded input passed and
    # the circular wrap divided by 0 (SIGFPE); a length-4 kernel on a length-3 input with
    # stride 2 returned a value on the direct path while ATen raised.
    out = _run("""
        expect_error(lambda: P.conv_power_step_([torch.randn(2, 2, 1)], [torch.randn(2, 0)], [torch.randn(2, 1)],
                                                [0, 1, 2, 1, 0, 0, 0], ['circular'], 1, 0.0),
                     ValueError, "too small for the kernel")
        expect_error(lambda: P.conv_power_step_([torch.randn(1, 1, 4)], [torch.randn(1, 3)], [torch.randn(1, 1)],
                                                [0, 1, 2, 1, 0, 0, 0], ['zeros'], 1, 0.0),
                     ValueError, "too small for the kernel", "= 4")
    """, kernel)
    assert out.count("RAISED ValueError") == 2


@pytest.mark.parametrize("case", ["expand_column", "expand_slice", "huge_expand", "two_rows_every_dtype"])
def test_stride0_weight_power_step(case):
    # item 7: an N x 1 weight with stride 0 was walked with ld = 1 (reads past the single
    # stored entry: NaN, a wrong value, or SIGSEGV for 2^26 rows). two_rows_every_dtype is the
    # fuzz suite's finding reduced (its batch also held zero-size and mixed-dtype layers, which
    # play no part): u^T W v of a 2 x 1 expand, in every weight dtype, through both ops.
    out = _run(f"""
        case = {case!r}
        if case == "two_rows_every_dtype":
            for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                W = torch.tensor([[0.75]], dtype=dt).expand(2, 1)
                acc = torch.float64 if dt == torch.float64 else torch.float32
                u, v = torch.tensor([0.6, -0.8], dtype=acc), torch.ones(1, dtype=acc)
                for est in (P.sigma([W], [u], [v]), P.power_step_([W], [u.clone()], [v.clone()], 0, 0.0)):
                    assert abs(float(est) + 0.15) < 1e-6, (dt, est)  # 0.75 (0.6 - 0.8)
        elif case == "expand_column":
            W = torch.ones(1, 1).expand(4096, 1)
            got = float(sf.spectral_norm(W))
            assert abs(got - 64.0) < 1e-4, got
        elif case == "expand_slice":
            W = torch.randn(1, 3).expand(5, 3)[:, 1:2]
            got, exact = float(sf.spectral_norm(W)), float(torch.linalg.matrix_norm(W, ord=2))
            assert abs(got - exact) < 1e-5 * exact, (got, exact)
        else:
            n = 2**22
            W = torch.ones(1, 1).expand(n, 1)
            est = P.power_step_([W], [torch.randn(n)], [torch.ones(1)], 1, 0.0)
            assert abs(float(est) - 2**11) < 1e-2, est
        print("VALUE OK")
    """)
    assert "VALUE OK" in out


@KERNELS
def test_dilated_kernel_longer_than_the_padded_input_is_rejected_by_every_op(kernel):
    # fuzz finding: 1-D, kernel 3, input 1, stride 3, dilation 2, circular padding 1: the padded
    # input (3) is shorter than the dilated kernel (5), so there is no output. The direct
    # conv_weight_grad returned a gradient (a truncating division made the output size
    # (3 - 5) / 3 + 1 = 1) where ATen raised: every op must give the same ValueError on both
    # kernels, and leave its in-place arguments as they were.
    out = _run("""
        W, x, y = torch.randn(2, 2, 3), torch.randn(2, 1), torch.randn(2, 1)
        params, modes = [0, 1, 3, 2, 1, 1, 0], ['circular']
        xs, ys, grads = [x.clone()], [y.clone()], [torch.zeros_like(W)]
        spec = sf.ConvSpec(weight=W, input_shape=(2, 1), stride=(3,), padding=(1,), dilation=(2,),
                           padding_mode='circular')
        calls = [lambda: P.conv_power_step_([W], xs, ys, params, modes, 1, 0.0),
                 lambda: P.conv_sigma([W], [x], [y], params, modes),
                 lambda: P.conv_adjoint([W], [x], [y], params, modes),
                 lambda: P.conv_weight_grad([W], [x], [y], params, modes),
                 lambda: P.conv_weight_grad_add_(grads, [W], [x], [y], params, modes),
                 lambda: sf.conv_operator_norms([spec], sf.ConvState(xs, ys))]
        for call in calls:
            expect_error(call, ValueError, "too small for the kernel")
        assert torch.equal(xs[0], x) and torch.equal(ys[0], y) and not grads[0].any()
    """, kernel)
    assert out.count("RAISED ValueError") == 6


@KERNELS
@pytest.mark.parametrize("entry", ["stride", "dilation", "padding"])
def test_geometry_entries_beyond_int32_are_rejected_on_both_kernels(kernel, entry):
    # fuzz finding (test_fuzz_long): stride 2^63 - 1 on a replicate-padded length-1 input (one
    # output) answered on the direct kernel and raised a RuntimeError from oneDNN on ATen's
    # (the stride wrapped to -1 in int32). Entries above 2^31 - 1 are a ValueError on both.
    out = _run(f"""
        entry = {entry!r}
        big = 2**31
        stride, dilation, pad = (big, 1, 2) if entry == 'stride' else (1, big, big) if entry == 'dilation' else (2**30, 1, big)
        W, x = torch.randn(1, 1, 3), torch.randn(1, 1)
        n_out = (1 + 2 * pad - dilation * 2 - 1) // stride + 1
        xs, ys = [x.clone()], [torch.randn(1, n_out)]
        y0 = ys[0].clone()
        expect_error(lambda: P.conv_power_step_([W], xs, ys, [0, 1, stride, dilation, pad, pad, 0], ['replicate'],
                                                1, 0.0), ValueError, "at most 2^31 - 1", "int32")
        assert torch.equal(xs[0], x) and torch.equal(ys[0], y0)
    """, kernel)
    assert out.count("RAISED ValueError") == 1
