"""Bad input to the ops and the public API (issue 15, items 9, 10, 16): every case gets a
ValueError/TypeError naming the argument, raised before any persistent vector moves.

* The fakes (meta / fake tensors) check what the compiled kernels check, and that every tensor
  argument is on one device: a meta tensor mixed with CPU ones used to win dispatch and return
  uninitialized memory.
* The typed wrappers and public functions check their ints (range of int64), their conj/neg
  views written in place, and (public API) persistent vectors that share memory.
* Zero weights under ``spectral_constraint``, zero-size circular convs.
* The Triton backend's hand-offs to the reference warn once per (op, reason).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import specreg_fast as sf
from specreg_fast import fft, ops

P = torch.ops.specreg_fast


# ----------------------------------------------------------------------------- valid raw-op calls
def _dense():
    W = torch.randn(4, 3)
    u = torch.randn(4)
    v = torch.randn(3)
    return W, u, v


def _conv():
    spec = sf.ConvSpec.from_module(nn.Conv1d(2, 3, 3, padding=1), (2, 5))
    params, modes = ops.pack_conv_params([spec])
    return spec.weight.detach(), torch.randn(2, 5), torch.randn(3, 5), params, modes


def _circular():
    spec = sf.ConvSpec.from_module(nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 6))
    return spec.weight.detach(), torch.randn(2, 6), torch.empty(2, 6), torch.empty(3, 6), fft.circular_params(spec)


def _calls():
    """op name -> (op, args, indices of the tensor / tensor-list arguments)."""
    W, u, v = _dense()
    cw, cx, cy, params, modes = _conv()
    qw, qx, qxt, qyt, qparams = _circular()
    blocks = torch.randn(2, 3, 4)
    H = torch.randn(2, 3, 3, dtype=torch.complex64)
    return {
        "power_step_": (P.power_step_, [[W], [u], [v], 1, 0.0], (0, 1, 2)),
        "sigma": (P.sigma, [[W], [u], [v]], (0, 1, 2)),
        "sigma_from_step": (P.sigma_from_step, [[W], [u], [v], torch.ones(1)], (0, 1, 2, 3)),
        "conv_power_step_": (P.conv_power_step_, [[cw], [cx], [cy], params, modes, 1, 0.0], (0, 1, 2)),
        "conv_sigma": (P.conv_sigma, [[cw], [cx], [cy], params, modes], (0, 1, 2)),
        "conv_adjoint": (P.conv_adjoint, [[cw], [cx], [cy], params, modes], (0, 1, 2)),
        "conv_weight_grad": (P.conv_weight_grad, [[cw], [cx], [cy], params, modes], (0, 1, 2)),
        "conv_weight_grad_add_": (P.conv_weight_grad_add_, [[torch.zeros_like(cw)], [cw], [cx], [cy], params, modes],
                                  (0, 1, 2, 3)),
        "conv_sigma_from_step": (P.conv_sigma_from_step, [[cw], [cx], [cy], params, modes, torch.ones(1)],
                                 (0, 1, 2, 5)),
        "circular_power_step_": (P.circular_power_step_, [[qw], [qx], [qxt], [qyt], qparams, 1], (0, 1, 2, 3)),
        "batched_power_step_": (P.batched_power_step_, [blocks, torch.randn(2, 3), torch.randn(2, 4), 1], (0, 1, 2)),
        "shifted_cholesky_info": (P.shifted_cholesky_info, [H, torch.full((2,), 50.0)], (0, 1)),
    }


def _to_meta(a):
    """Meta copies with the same strides (``.to`` would make them contiguous)."""
    if isinstance(a, list):
        return [_to_meta(t) for t in a]
    return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")


_CASES = [(name, i) for name, (_, _, idx) in _calls().items() for i in idx]


@pytest.mark.parametrize("name,arg", _CASES, ids=[f"{n}-arg{i}" for n, i in _CASES])
def test_one_meta_argument_among_cpu_ones_is_rejected(name, arg):
    # Used to return uninitialized memory (sigma 2.8e-30, batched -4.2e16): the fake won dispatch.
    op, args, _ = _calls()[name]
    args[arg] = _to_meta(args[arg])
    with pytest.raises(ValueError, match="one device"):
        op(*args)


def _bad_cases():
    """(name, op, args): calls the compiled kernels reject; the fakes must reject them too."""
    W, u, v = _dense()
    cw, cx, cy, params, modes = _conv()
    qw, qx, qxt, qyt, qparams = _circular()
    blocks = torch.randn(2, 3, 4)
    bad_groups = list(params)
    bad_groups[1] = 0
    return [
        ("power_step_ n_iter=-3", P.power_step_, [[W], [u], [v], -3, 0.0]),
        ("power_step_ tol=-1", P.power_step_, [[W], [u], [v], 1, -1.0]),
        ("power_step_ u shape", P.power_step_, [[W], [torch.randn(5)], [v], 1, 0.0]),
        ("power_step_ u dtype", P.power_step_, [[W], [u.double()], [v], 1, 0.0]),
        ("power_step_ 3-D weight", P.power_step_, [[W[None]], [u], [v], 1, 0.0]),
        ("power_step_ int weight", P.power_step_, [[W.int()], [u], [v], 1, 0.0]),
        ("power_step_ list lengths", P.power_step_, [[W, W], [u], [v], 1, 0.0]),
        ("sigma non-contiguous v", P.sigma, [[W], [u], [torch.randn(3, 2)[:, 0]]]),
        ("conv_power_step_ n_iter=-3", P.conv_power_step_, [[cw], [cx], [cy], params, modes, -3, 0.0]),
        ("conv_power_step_ tol=inf", P.conv_power_step_, [[cw], [cx], [cy], params, modes, 1, float("inf")]),
        ("conv_sigma groups=0", P.conv_sigma, [[cw], [cx], [cy], bad_groups, modes]),
        ("conv_sigma params too short", P.conv_sigma, [[cw], [cx], [cy], params[:-1], modes]),
        ("conv_sigma params too long", P.conv_sigma, [[cw], [cx], [cy], params + [0], modes]),
        ("conv_sigma bad mode", P.conv_sigma, [[cw], [cx], [cy], params, ["mirror"]]),
        ("conv_sigma y shape", P.conv_sigma, [[cw], [cx], [torch.randn(3, 4)], params, modes]),
        ("conv_sigma x channels", P.conv_sigma, [[cw], [torch.randn(3, 5)], [cy], params, modes]),
        # (3 + 0 - 4 - 1) / 3 + 1 is 1 with truncating division: the kernel is larger than the input
        ("conv_sigma kernel larger than input", P.conv_sigma,
         [[torch.randn(3, 2, 5)], [torch.randn(2, 3)], [torch.randn(3, 1)], [0, 1, 3, 1, 0, 0, 0], ["zeros"]]),
        # ATen's convolutions took it as int32 (-2^31) and raised where the direct kernel answered
        ("conv_sigma stride 2^31", P.conv_sigma,
         [[torch.randn(1, 1, 3)], [torch.randn(1, 1)], [torch.randn(1, 1)], [0, 1, 2**31, 1, 2, 2, 0], ["replicate"]]),
        ("conv_weight_grad_add_ grad shape", P.conv_weight_grad_add_,
         [[torch.zeros(3, 2, 2)], [cw], [cx], [cy], params, modes]),
        ("circular_power_step_ n_iter=-3", P.circular_power_step_, [[qw], [qx], [qxt], [qyt], qparams, -3]),
        ("circular_power_step_ y_top shape", P.circular_power_step_,
         [[qw], [qx], [qxt], [torch.empty(3, 5)], qparams, 1]),
        ("batched_power_step_ n_iter=-3", P.batched_power_step_, [blocks, torch.randn(2, 3), torch.randn(2, 4), -3]),
        ("batched_power_step_ us shape", P.batched_power_step_, [blocks, torch.randn(2, 4), torch.randn(2, 4), 1]),
        ("batched_power_step_ us dtype", P.batched_power_step_,
         [blocks, torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4), 1]),
        ("shifted_cholesky_info real H", P.shifted_cholesky_info, [torch.randn(2, 3, 3), torch.full((2,), 5.0)]),
        ("shifted_cholesky_info shift shape", P.shifted_cholesky_info,
         [torch.randn(2, 3, 3, dtype=torch.complex64), torch.full((3,), 5.0)]),
    ]


_BAD = _bad_cases()


@pytest.mark.parametrize("case", range(len(_BAD)), ids=[c[0] for c in _BAD])
def test_all_meta_call_is_checked_like_the_kernel(case):
    # Used to accept any params, shapes and n_iter=-3 as long as every tensor was meta.
    _, op, args = _BAD[case]
    with pytest.raises(Exception):  # the compiled kernel (its own error types); nothing is written
        op(*args)
    meta = [_to_meta(a) if isinstance(a, torch.Tensor) or (isinstance(a, list) and a and isinstance(a[0], torch.Tensor))
            else a for a in args]
    with pytest.raises((ValueError, TypeError), match="specreg_fast::"):
        op(*meta)


def test_fake_tensor_mode_runs_the_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    W, u, v = _dense()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        Wf, uf, vf = (mode.from_tensor(t) for t in (W, u, v))
        assert P.power_step_([Wf], [uf], [vf], 2, 0.0).shape == (1,)
        with pytest.raises(ValueError, match="us\\[0\\] must have shape"):
            P.sigma([Wf], [vf], [vf])


# ----------------------------------------------------------------------------- ints, conj views
_BIG = 2 ** 63


def _public_calls(n_iter):
    W, u, v = _dense()
    cspec = sf.ConvSpec.from_module(nn.Conv1d(2, 3, 3, padding=1), (2, 5))
    qspec = sf.ConvSpec.from_module(nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 6))
    return {
        "ops.power_step_": lambda: ops.power_step_([W], [u], [v], n_iter),
        "ops.conv_power_step_": lambda: ops.conv_power_step_([cspec.weight.detach()], [torch.randn(2, 5)],
                                                             [torch.randn(3, 5)], *ops.pack_conv_params([cspec]),
                                                             n_iter=n_iter),
        "ops.circular_power_step_": lambda: ops.circular_power_step_([qspec.weight.detach()], [torch.randn(2, 6)],
                                                                     fft.circular_params(qspec), n_iter),
        "ops.batched_power_step_": lambda: ops.batched_power_step_(torch.randn(2, 3, 4), torch.randn(2, 3),
                                                                   torch.randn(2, 4), n_iter),
        "spectral_norms": lambda: sf.spectral_norms([W], sf.init_power_state([W]), n_iter=n_iter),
        "spectral_norms max_iter": lambda: sf.spectral_norms([W], sf.init_power_state([W]), tol=0.0,
                                                             max_iter=n_iter),
        "conv_operator_norms": lambda: sf.conv_operator_norms([cspec], sf.init_conv_state([cspec]), n_iter=n_iter),
        "circular_conv_norms": lambda: sf.circular_conv_norms([qspec], sf.init_circular_state([qspec]),
                                                              n_iter=n_iter),
        "circular_block_norms": lambda: fft.circular_block_norms([qspec], fft.init_circular_block_state([qspec]),
                                                                 n_iter=n_iter),
    }


@pytest.mark.parametrize("where", list(_public_calls(1)))
def test_ints_out_of_int64_range_are_value_errors_naming_the_argument(where):
    # n_iter = 2**63 was a binding cast error (RuntimeError "Expected a value of type 'int'").
    with pytest.raises(ValueError, match="(n_iter|max_iter) must be an int in"):
        _public_calls(_BIG)[where]()
    with pytest.raises(TypeError, match="(n_iter|max_iter) must be an int"):  # was silently truncated to 1
        _public_calls(1.5)[where]()


def test_params_and_tol_checked_by_the_wrappers():
    cw, cx, cy, params, modes = _conv()
    big = list(params)
    big[3] = _BIG  # dilation
    with pytest.raises(ValueError, match=r"params\[3\] must be an int in"):
        ops.conv_sigma([cw], [cx], [cy], big, modes)
    with pytest.raises(TypeError, match=r"padding_modes\[0\] must be a str"):
        ops.conv_adjoint([cw], [cx], [cy], params, [0])
    W, u, v = _dense()
    with pytest.raises(ValueError, match="tol must be >= 0"):
        ops.power_step_([W], [u], [v], 1, float("nan"))
    with pytest.raises(TypeError, match="tol must be a real number"):
        sf.spectral_norms([W], sf.init_power_state([W]), tol="1e-3")
    with pytest.raises(ValueError, match="tol must be finite"):
        ops.conv_power_step_([cw], [cx], [cy], params, modes, 1, float("inf"))


def test_conj_and_neg_views_written_in_place_are_rejected():
    # A conj view as us hit a PyTorch INTERNAL ASSERT; a neg view (z.conj().imag) a fallback error.
    blocks = torch.randn(2, 3, 4, dtype=torch.complex64)
    us = torch.randn(2, 3, dtype=torch.complex64)
    vs = torch.randn(2, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="us is a conjugate or negative view"):
        ops.batched_power_step_(blocks, us.conj(), vs, 1)
    W, _, v = _dense()
    u_neg = torch.randn(4, dtype=torch.complex64).conj().imag
    assert u_neg.is_neg()
    with pytest.raises(ValueError, match=r"us\[0\] is a conjugate or negative view"):
        ops.power_step_([W], [u_neg], [v], 1)
    # read-only conj views are fine: the dispatcher materializes them
    u1, v1, u2, v2 = us.clone(), vs.clone(), us.clone(), vs.clone()
    s1 = ops.batched_power_step_(blocks.conj(), u1, v1, 3)
    s2 = ops.batched_power_step_(blocks.conj().resolve_conj(), u2, v2, 3)
    torch.testing.assert_close(s1, s2)
    H = torch.randn(2, 3, 3, dtype=torch.complex64)
    assert torch.equal(ops.shifted_cholesky_info(H.conj(), torch.full((2,), 50.0)),
                       ops.shifted_cholesky_info(H.conj().resolve_conj(), torch.full((2,), 50.0)))


# ----------------------------------------------------------------------------- shared persistent vectors
def _clones(tensors):
    return [t.clone() for t in tensors]


def _assert_unchanged(before, after):
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_spectral_norms_rejects_shared_vectors_before_moving_any():
    Ws = [torch.randn(3, 3), torch.randn(3, 3)]
    st = sf.init_power_state(Ws)
    same = sf.PowerState([st.us[0], st.us[1]], [st.vs[0], st.us[1]])  # layer 1: u is v
    before = _clones(same.us + same.vs)
    with pytest.raises(ValueError, match=r"weights\[1\]: state v shares memory with weights\[1\]: state u"):
        sf.spectral_norms(Ws, same)
    _assert_unchanged(before, same.us + same.vs)
    shared = sf.PowerState([st.us[0], st.us[1]], [st.vs[0], st.vs[0]])  # v shared between layers
    with pytest.raises(ValueError, match=r"fc2: state v shares memory with fc1: state v"):
        sf.spectral_norms(Ws, shared, names=["fc1", "fc2"])
    flat = torch.randn(5)  # overlapping views of one buffer
    overlap = sf.PowerState([flat[:3], flat[2:5]], [st.vs[0], st.vs[1]])
    before = _clones(overlap.us + overlap.vs)
    with pytest.raises(ValueError, match="shares memory"):
        sf.spectral_norms(Ws, overlap)
    _assert_unchanged(before, overlap.us + overlap.vs)
    flat = torch.randn(6)  # disjoint views of one buffer are fine
    sf.spectral_norms(Ws, sf.PowerState([flat[:3], flat[3:]], [st.vs[0], st.vs[1]]))


def test_conv_and_circular_norms_reject_shared_vectors():
    conv = nn.Conv1d(2, 2, 3, padding=1)
    spec = sf.ConvSpec.from_module(conv, (2, 5))
    st = sf.init_conv_state([spec, spec])
    shared = sf.ConvState([st.xs[0], st.xs[0]], st.ys)
    before = _clones(shared.xs + shared.ys)
    with pytest.raises(ValueError, match=r"specs\[1\]: state x shares memory with specs\[0\]: state x"):
        sf.conv_operator_norms([spec, spec], shared)
    _assert_unchanged(before, shared.xs + shared.ys)
    same = sf.ConvState([st.xs[0]], [st.xs[0]])  # x and y of one layer (same shape here)
    with pytest.raises(ValueError, match="state y shares memory with specs\\[0\\]: state x"):
        sf.conv_operator_norms([spec], same)

    qspec = sf.ConvSpec.from_module(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), (2, 6))
    x = torch.randn(2, 6)
    before = x.clone()
    with pytest.raises(ValueError, match=r"specs\[1\]: state vector shares memory with specs\[0\]"):
        sf.circular_conv_norms([qspec, qspec], sf.CircularState([x, x]))
    assert torch.equal(x, before)
    bst = fft.init_circular_block_state([qspec])
    with pytest.raises(ValueError, match=r"specs\[1\]: state u shares memory with specs\[0\]: state u"):
        fft.circular_block_norms([qspec, qspec], fft.CircularBlockState(bst.us * 2, bst.vs * 2))


def test_circular_block_norms_checks_every_layer_before_stepping():
    # layer 0 used to be stepped before layer 1's bad state was seen
    qspec = sf.ConvSpec.from_module(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), (2, 6))
    st = fft.init_circular_block_state([qspec, qspec])
    st.vs[1] = st.vs[1][:, :1].contiguous()
    before = _clones(st.us + st.vs)
    with pytest.raises(ValueError, match=r"specs\[1\]: state u/v must be"):
        fft.circular_block_norms([qspec, qspec], st)
    _assert_unchanged(before, st.us + st.vs)


# ----------------------------------------------------------------------------- degenerate layers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spectral_constraint_on_a_zero_weight_is_zero_and_finite(kind, dtype):
    # sigma = 0 made the output 0/0 = NaN
    if kind == "linear":
        layer = sf.spectral_constraint(nn.Linear(3, 2).to(dtype))
        x = torch.randn(5, 3, dtype=dtype)
    else:
        layer = sf.spectral_constraint(nn.Conv1d(2, 3, 3, padding=1).to(dtype), input_shape=(2, 6))
        x = torch.randn(5, 2, 6, dtype=dtype)
    with torch.no_grad():
        layer.parametrizations.weight.original.zero_()
        layer.bias.zero_()
    out = layer(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.square().add(out).sum().backward()
    g = layer.parametrizations.weight.original.grad
    assert g is not None and torch.isfinite(g).all()
    # a non-zero weight is still normalized to unit norm (the floor does not bite)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn_like(layer.weight) * 1e-6)
    for _ in range(30):  # converge the vectors
        layer(x)
    if kind == "linear":
        assert abs(torch.linalg.matrix_norm(layer.weight.double(), 2).item() - 1) < 2e-2


@pytest.mark.parametrize("shape", [((2, 0, 3), (0, 6)), ((0, 2, 3), (2, 6)), ((2, 2, 3), (2, 0)),
                                   ((2, 2, 1), (2, 0))], ids=["no-in-channels", "no-out-channels", "empty-input",
                                                              "empty-input-k1"])
def test_zero_size_circular_convs_are_rejected_clearly(shape):
    # zero channels reached the FFT: MKL "DFTI ERROR: Inconsistent configuration parameters"
    wshape, in_shape = shape
    spec = sf.ConvSpec(torch.randn(wshape), in_shape, stride=(1,), padding=(wshape[2] // 2,), dilation=(1,),
                       groups=1, padding_mode="circular")
    for call in (lambda: sf.circular_conv_norms([spec], sf.init_circular_state([spec])),
                 lambda: sf.circular_conv_norms([spec], exact=True),
                 lambda: fft.circular_block_norms([spec], fft.CircularBlockState([torch.zeros(0, 0)],
                                                                                 [torch.zeros(0, 0)]))):
        with pytest.raises(ValueError, match=r"specs\[0\]: the circular norm needs a non-empty conv"):
            call()
    with pytest.raises(ValueError, match="non-empty conv"):
        fft.circular_blocks(spec.weight, in_shape[1:])


# ----------------------------------------------------------------------------- backend fallbacks
def test_triton_fallback_to_the_reference_warns_once_per_op_and_reason(monkeypatch):
    """The Triton CUDA kernels hand float64 / complex128 work to the reference: one warning per
    (op, reason) per process. Run on CPU tensors (the hand-off needs no GPU), results checked
    against the reference itself."""
    pytest.importorskip("triton")
    from specreg_fast import fallback
    from specreg_fast import triton as sf_triton

    monkeypatch.setattr(fallback, "_FALLBACKS_WARNED", set())
    blocks = torch.randn(3, 4, 5, dtype=torch.float64)
    u, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    u2, v2 = u.clone(), v.clone()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = sf_triton._batched_power_step_cuda(blocks, u, v, 2)
        sf_triton._batched_power_step_cuda(blocks, u, v, 2)  # same op and reason: silent
        sf_triton._batched_power_step_cuda(blocks.to(torch.complex128), u.to(torch.complex128),
                                           v.to(torch.complex128), 1)  # another reason
        W = [torch.randn(4, 3, dtype=torch.float64)]
        st = sf.init_power_state(W)
        sf_triton._power_step_cuda(W, st.us, st.vs, 1, 0.0)
        sf_triton._power_step_cuda(W, st.us, st.vs, 1, 0.0)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 3, msgs
    assert "batched_power_step_" in msgs[0] and "torch.float64 blocks" in msgs[0] and "reference" in msgs[0]
    assert "batched_power_step_" in msgs[1] and "torch.complex128 blocks" in msgs[1]
    assert "power_step_: float64 weights" in msgs[2]
    torch.testing.assert_close(s, ops.batched_power_step_reference(blocks, u2, v2, 2))
