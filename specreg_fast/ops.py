"""Custom-op front: typed wrappers around ``torch.ops.specreg_fast.*``.

The schemas are declared once, in ``csrc/specreg_fast.cpp``. This module adds what the
C++ side cannot: fake (meta) implementations for ``torch.compile``, the autograd formula of
the functional ``sigma`` op, and the plain-PyTorch reference registered under
``CompositeExplicitAutograd`` so that a device with no kernel of its own (a CUDA tensor in a
CPU-only build, MPS, ...) still runs. If the compiled extension cannot be loaded, the same
schemas are defined here and only the reference runs (``HAS_CPP_EXT = False``).
"""
from __future__ import annotations

import math
import warnings
from typing import List, Sequence

import torch

__all__ = ["power_step_", "sigma", "sigma_from_step", "conv_power_step_", "conv_sigma", "conv_adjoint",
           "conv_weight_grad", "conv_weight_grad_add_", "conv_sigma_from_step", "circular_power_step_", "batched_power_step_", "shifted_cholesky_info", "pack_conv_params", "HAS_CPP_EXT", "SCHEMAS"]

# Kept identical to csrc/specreg_fast.cpp (a test compares them): used only when the
# compiled library is missing.
SCHEMAS = {
    "power_step_": "power_step_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol) -> Tensor",
    "sigma": "sigma(Tensor[] weights, Tensor[] us, Tensor[] vs) -> Tensor",
    "sigma_from_step": "sigma_from_step(Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor est) -> Tensor",
    "conv_power_step_": "conv_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] ys, int[] params, "
                        "str[] padding_modes, int n_iter, float tol) -> Tensor",
    "conv_sigma": "conv_sigma(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> Tensor",
    "conv_adjoint": "conv_adjoint(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) "
                    "-> Tensor[]",
    "conv_weight_grad": "conv_weight_grad(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, "
                        "str[] padding_modes) -> Tensor[]",
    "conv_weight_grad_add_": "conv_weight_grad_add_(Tensor(a!)[] grads, Tensor[] weights, Tensor[] xs, Tensor[] ys, "
                             "int[] params, str[] padding_modes) -> ()",
    "conv_sigma_from_step": "conv_sigma_from_step(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, "
                            "str[] padding_modes, Tensor est) -> Tensor",
    "circular_power_step_": "circular_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] x_tops, "
                            "Tensor(c!)[] y_tops, int[] params, int n_iter) -> Tensor",
    "batched_power_step_": "batched_power_step_(Tensor blocks, Tensor(a!) us, Tensor(b!) vs, int n_iter) -> Tensor",
    "shifted_cholesky_info": "shifted_cholesky_info(Tensor H, Tensor shift) -> Tensor",
}

# The most power-iteration steps one op call may run (n_iter of every op, max_iter of the
# public functions): the same number as kMaxIter in csrc/op_contracts.h (a test compares them).
# 10^6 steps are minutes on a 1024 x 1024 weight; a larger count is a bug, not a budget.
MAX_ITER = 1_000_000

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    HAS_CPP_EXT = True
except ImportError as _err:  # ABI mismatch, or built without the extension
    HAS_CPP_EXT = False
    warnings.warn(f"specreg_fast: compiled extension not loaded ({_err}); using the pure-PyTorch reference",
                  RuntimeWarning, stacklevel=2)
    _fallback_lib = torch.library.Library("specreg_fast", "DEF")
    for _schema in SCHEMAS.values():
        _fallback_lib.define(_schema)


def _acc_dtype(w_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if w_dtype == torch.float64 else torch.float32


def _out_dtype(weights: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


# ----------------------------------------------------------------------------- reference kernels
def _power_step_reference(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int,
                          tol: float) -> torch.Tensor:
    """Reference kernel of ``power_step_`` for any device: the per-layer loop of the PyTorch
    reference, with the op's conventions (zero W keeps the vectors, non-finite W rolls them
    back) expressed with ``torch.where`` so no host synchronization is needed."""
    out = torch.zeros(len(weights), dtype=_out_dtype(weights),
                      device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, u, v) in enumerate(zip(weights, us, vs)):
            Wf = W.to(u.dtype)
            u0, v0 = u.clone(), v.clone()
            est = torch.zeros((), dtype=u.dtype, device=u.device)
            prev = None
            for it in range(n_iter):
                t = Wf @ v
                tn = torch.linalg.vector_norm(t)
                a = Wf.t() @ t
                an = torch.linalg.vector_norm(a)
                ok = (tn > 0) & (an > 0)
                u.copy_(torch.where(ok, t / tn, u))
                v.copy_(torch.where(ok, a / an, v))
                est = torch.where(ok, an / tn, torch.zeros_like(an))
                if tol > 0 and prev is not None and bool(torch.abs(est - prev) <= tol * est):
                    break
                prev = est
            if n_iter == 0:
                est = u @ Wf @ v
            bad = ~torch.isfinite(Wf).all() if W.numel() else torch.zeros((), dtype=torch.bool, device=W.device)
            u.copy_(torch.where(bad, u0, u))
            v.copy_(torch.where(bad, v0, v))
            out[l] = torch.where(bad, torch.full_like(est, math.nan), est).to(out.dtype)
    return out


def _sigma_reference(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor]) -> torch.Tensor:
    dt = _out_dtype(weights)
    if not weights:
        return torch.zeros(0, dtype=dt)
    return torch.stack([(u @ W.to(u.dtype) @ v).to(dt) for W, u, v in zip(weights, us, vs)])


# ----------------------------------------------------------------------------- registration
@torch.library.register_fake("specreg_fast::power_step_")
def _power_step_fake(weights, us, vs, n_iter, tol):
    torch._check(len(us) == len(weights) and len(vs) == len(weights))
    dev = weights[0].device if weights else torch.device("cpu")
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights)) if weights else torch.empty(
        0, dtype=torch.float32, device=dev)


@torch.library.register_fake("specreg_fast::sigma")
def _sigma_fake(weights, us, vs):
    torch._check(len(us) == len(weights) and len(vs) == len(weights))
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


torch.library.impl("specreg_fast::power_step_", "CompositeExplicitAutograd")(_power_step_reference)
torch.library.impl("specreg_fast::sigma", "CompositeExplicitAutograd")(_sigma_reference)


def _sigma_setup_context(ctx, inputs, output):
    weights, us, vs = inputs
    ctx.save_for_backward(*us, *vs)
    ctx.n = len(weights)
    ctx.w_meta = [(w.dtype, w.shape) for w in weights]


def _sigma_backward(ctx, grad):
    # d(u^T W v)/dW = u v^T (exact for the bilinear form with u, v held fixed; at a
    # converged power iteration it is d sigma_max / dW).
    n = ctx.n
    saved = ctx.saved_tensors
    us, vs = saved[:n], saved[n:]
    grads = []
    for l in range(n):
        dt, _ = ctx.w_meta[l]
        # scale the short vector, not the outer product: one m x n write per layer
        g = grad[l].to(us[l].dtype)
        # (a rank-1 mm, not torch.outer: outer's broadcast multiply splits the fresh, page-
        # faulting output across threads and measured 7x slower on the loaded 2-core machine,
        # 3 x 1024x1024: 48 ms vs 6.9 ms with 2 threads; equal with 1 thread)
        grads.append(torch.mm((us[l] * g).unsqueeze(1), vs[l].unsqueeze(0)).to(dt))
    return grads, [None] * n, [None] * n


torch.library.register_autograd("specreg_fast::sigma", _sigma_backward, setup_context=_sigma_setup_context)


# sigma_from_step: the forward value is power_step_'s estimate (no second read of W), the
# backward that of sigma. One implementation for every device.
@torch.library.register_fake("specreg_fast::sigma_from_step")
def _sigma_from_step_fake(weights, us, vs, est):
    torch._check(len(us) == len(weights) and len(vs) == len(weights) and est.dim() == 1)
    return torch.empty_like(est)


@torch.library.impl("specreg_fast::sigma_from_step", "CompositeExplicitAutograd")
def _sigma_from_step_impl(weights, us, vs, est):
    return est.clone()


def _sigma_from_step_setup_context(ctx, inputs, output):
    weights, us, vs, _ = inputs
    _sigma_setup_context(ctx, (weights, us, vs), output)


def _sigma_from_step_backward(ctx, grad):
    gw, gu, gv = _sigma_backward(ctx, grad)
    return gw, gu, gv, None


torch.library.register_autograd("specreg_fast::sigma_from_step", _sigma_from_step_backward,
                                setup_context=_sigma_from_step_setup_context)


# ----------------------------------------------------------------------------- eager autograd
# In eager mode the typed wrappers below route the two ``*_from_step`` ops through these
# autograd.Functions: the same value (a copy of the step's estimate) and the same backward
# helpers as the registered autograd, without torch.library's per-call wrapping of a
# Python-registered autograd (pytree flattening of the tensor lists, default filling,
# redispatch): on one 512x512 layer here the op's forward took 63-109 us against 12-16 us for
# the Function, and forward + backward 0.39-0.59 ms against 0.23-0.33 ms, where the power
# step itself takes ~35 us. Under torch.compile, and for torch.ops callers,
# the registered op and its autograd are used as before (tests check both routes agree).
# (forward(ctx, ...) style: a separate setup_context makes every apply bind the signature
# through inspect, ~40 us here.)
class _SigmaFromStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, est, us, vs, *weights):
        _sigma_setup_context(ctx, (weights, us, vs), None)
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        gw, _, _ = _sigma_backward(ctx, grad)
        return (None, None, None, *gw)


class _ConvSigmaFromStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, est, xs, ys, params, padding_modes, *weights):
        _conv_sigma_setup_context(ctx, (weights, xs, ys, params, padding_modes), None)
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        gw = _conv_sigma_backward(ctx, grad)[0]
        return (None, None, None, None, None, *gw)


def _eager_autograd(weights) -> bool:
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(w, torch.Tensor) and w.requires_grad for w in weights))


# ----------------------------------------------------------------------------- typed wrappers
def power_step_(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int = 1,
                tol: float = 0.0) -> torch.Tensor:
    """Run ``n_iter`` grouped power-iteration steps in place on ``us``/``vs``; returns the
    detached estimates ``u^T W v`` at the new vectors. See ``csrc/specreg_fast.cpp``."""
    return torch.ops.specreg_fast.power_step_(list(weights), list(us), list(vs), int(n_iter), float(tol))


def sigma(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor]) -> torch.Tensor:
    """``u_l^T W_l v_l`` for each layer, differentiable in the weights (gradient ``u v^T``)."""
    return torch.ops.specreg_fast.sigma(list(weights), list(us), list(vs))


def sigma_from_step(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                    est: torch.Tensor) -> torch.Tensor:
    """``sigma`` whose value is ``est``, the return of the ``power_step_`` (n_iter >= 1) that
    left ``us``/``vs`` as they are: equal to ``u^T W v`` to float rounding without reading W."""
    if _eager_autograd(weights):
        _check_from_step(weights, us, vs, est)
        return _SigmaFromStep.apply(est, list(us), list(vs), *weights)
    return torch.ops.specreg_fast.sigma_from_step(list(weights), list(us), list(vs), est)


def _check_from_step(weights, xs, ys, est):
    # what the op's schema and fake check, for the eager route (which bypasses them)
    if not (len(xs) == len(weights) == len(ys)):
        raise ValueError(f"weights and the two vector lists must have the same length, got {len(weights)}, "
                         f"{len(xs)}, {len(ys)}")
    if not isinstance(est, torch.Tensor) or est.shape != (len(weights),):
        raise ValueError(f"est must be a 1-D tensor with one entry per weight ({len(weights)}), got "
                         f"{getattr(est, 'shape', type(est).__name__)}")


# ----------------------------------------------------------------------------- conv operator ops (conv.py)
# Per-layer geometry of the conv ops, packed layer after layer into one int[] (2 + 5 d ints
# for d spatial dims) plus one padding-mode string per layer:
#     [transposed, groups, stride[d], dilation[d], pad_lo[d], pad_hi[d], output_padding[d]]
# (the single description of the packing is csrc/specreg_fast.cpp; this is its encoder/decoder).
def pack_conv_params(specs) -> "tuple[List[int], List[str]]":
    """``(params, padding_modes)`` of the conv ops for a list of :class:`ConvSpec`."""
    params: List[int] = []
    modes: List[str] = []
    for spec in specs:
        d = spec.weight.dim() - 2
        k = tuple(spec.weight.shape[2:])
        if isinstance(spec.padding, str):
            if spec.padding == "valid":
                lo = hi = (0,) * d
            elif spec.padding == "same":
                total = [spec.dilation[i] * (k[i] - 1) for i in range(d)]
                lo = tuple(t // 2 for t in total)
                hi = tuple(t - t // 2 for t in total)
            else:
                raise ValueError(f"padding must be 'same', 'valid' or a tuple, got {spec.padding!r}")
        else:
            lo = hi = tuple(int(p) for p in spec.padding)
        op = tuple(spec.output_padding) if spec.transposed and spec.output_padding else (0,) * d
        params += [int(bool(spec.transposed)), int(spec.groups), *map(int, spec.stride), *map(int, spec.dilation), *lo,
                   *hi, *map(int, op)]
        modes.append(str(spec.padding_mode))
    return params, modes


def _unpack_conv_params(weights, params, modes):
    out, off = [], 0
    for W, mode in zip(weights, modes):
        d = W.dim() - 2
        p = list(params[off:off + 2 + 5 * d])
        off += 2 + 5 * d
        out.append(dict(transposed=bool(p[0]), groups=p[1], stride=p[2:2 + d], dilation=p[2 + d:2 + 2 * d],
                        lo=p[2 + 2 * d:2 + 3 * d], hi=p[2 + 3 * d:2 + 4 * d], output_padding=p[2 + 4 * d:2 + 5 * d],
                        mode=mode, d=d))
    return out


def _conv_pad_vec(g):
    v = []
    for i in reversed(range(g["d"])):
        v += [g["lo"][i], g["hi"][i]]
    return v


def _conv_explicit(g):
    return not g["transposed"] and (g["mode"] != "zeros" or g["lo"] != g["hi"])


def _conv_padded_input(g, x):
    """(input handed to aten.convolution, its padding) for a batched x."""
    if _conv_explicit(g):
        mode = "constant" if g["mode"] == "zeros" else g["mode"]
        return torch.nn.functional.pad(x, _conv_pad_vec(g), mode=mode), [0] * g["d"]
    return x, list(g["lo"])


def _conv_apply_ref(g, W, x):
    xp, pad = _conv_padded_input(g, x)
    return torch.ops.aten.convolution(xp, W, None, g["stride"], pad, g["dilation"], g["transposed"],
                                      g["output_padding"], g["groups"])


def _conv_adjoint_ref(g, W, y, x_like):
    # The vector-Jacobian product of the (linear) forward map: exact for every padding mode.
    with torch.enable_grad():
        x0 = torch.zeros_like(x_like).requires_grad_(True)
        (gx,) = torch.autograd.grad(_conv_apply_ref(g, W.detach(), x0), x0, y)
    return gx


def _conv_power_step_reference(weights, xs, ys, params, padding_modes, n_iter, tol):
    """Reference kernel of ``conv_power_step_`` (any device): the same step and conventions
    as the C++ loop, with ``torch.where`` instead of host branches."""
    geo = _unpack_conv_params(weights, params, padding_modes)
    out = torch.zeros(len(weights), dtype=_out_dtype(weights), device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, x1, y1, g) in enumerate(zip(weights, xs, ys, geo)):
            Wf = W.to(x1.dtype)
            if not bool(torch.isfinite(Wf).all()):
                out[l] = math.nan
                continue
            x, y = x1[None], y1[None]
            est = torch.zeros((), dtype=x.dtype, device=x.device)
            if n_iter == 0:
                est = (y * _conv_apply_ref(g, Wf, x)).sum()
            prev = None
            for _ in range(n_iter):
                t = _conv_apply_ref(g, Wf, x)
                tn = torch.linalg.vector_norm(t)
                a = _conv_adjoint_ref(g, Wf, t, x)
                an = torch.linalg.vector_norm(a)
                ok = (tn > 0) & (an > 0) & torch.isfinite(tn) & torch.isfinite(an)
                y.copy_(torch.where(ok, t / tn, y))
                x.copy_(torch.where(ok, a / an, x))
                est = torch.where(ok, an / tn, torch.zeros_like(an))
                if tol > 0 and prev is not None and bool(torch.abs(est - prev) <= tol * torch.abs(est)):
                    break
                prev = est
            out[l] = est.to(out.dtype)
    return out


def _conv_sigma_reference(weights, xs, ys, params, padding_modes):
    geo = _unpack_conv_params(weights, params, padding_modes)
    dt = _out_dtype(weights)
    if not weights:
        return torch.zeros(0, dtype=dt)
    return torch.stack([(y[None] * _conv_apply_ref(g, W.to(x.dtype), x[None])).sum().to(dt)
                        for W, x, y, g in zip(weights, xs, ys, geo)])


def _conv_adjoint_reference(weights, xs, ys, params, padding_modes):
    geo = _unpack_conv_params(weights, params, padding_modes)
    return [_conv_adjoint_ref(g, W.to(y.dtype), y[None], x[None])[0].contiguous()
            for W, x, y, g in zip(weights, xs, ys, geo)]


@torch.library.register_fake("specreg_fast::conv_power_step_")
def _conv_power_step_fake(weights, xs, ys, params, padding_modes, n_iter, tol):
    torch._check(len(xs) == len(weights) and len(ys) == len(weights))
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


@torch.library.register_fake("specreg_fast::conv_sigma")
def _conv_sigma_fake(weights, xs, ys, params, padding_modes):
    torch._check(len(xs) == len(weights) and len(ys) == len(weights))
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


@torch.library.register_fake("specreg_fast::conv_adjoint")
def _conv_adjoint_fake(weights, xs, ys, params, padding_modes):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


torch.library.impl("specreg_fast::conv_power_step_", "CompositeExplicitAutograd")(_conv_power_step_reference)
torch.library.impl("specreg_fast::conv_sigma", "CompositeExplicitAutograd")(_conv_sigma_reference)
torch.library.impl("specreg_fast::conv_adjoint", "CompositeExplicitAutograd")(_conv_adjoint_reference)


def _conv_sigma_setup_context(ctx, inputs, output):
    weights, xs, ys, params, padding_modes = inputs
    ctx.save_for_backward(*weights, *xs, *ys)
    ctx.n = len(weights)
    ctx.params, ctx.modes = list(params), list(padding_modes)


def _conv_weight_grad_reference(weights, xs, ys, params, padding_modes):
    # d<y, A(W) x>/dW with x, y held fixed is the conv weight-gradient with input pad(x) and
    # output-gradient y: one aten.convolution_backward per layer, no autograd graph.
    geo = _unpack_conv_params(weights, params, padding_modes)
    grads = []
    for l, g in enumerate(geo):
        W, x, y = weights[l], xs[l], ys[l]
        Wf = W.to(_acc_dtype(W.dtype))
        xp, pad = _conv_padded_input(g, x[None].to(Wf.dtype))
        gw = torch.ops.aten.convolution_backward(y[None].to(Wf.dtype), xp, Wf, None, g["stride"], pad, g["dilation"],
                                                 g["transposed"], g["output_padding"], g["groups"],
                                                 [False, True, False])[1]
        grads.append(gw.contiguous())
    return grads


@torch.library.register_fake("specreg_fast::conv_weight_grad")
def _conv_weight_grad_fake(weights, xs, ys, params, padding_modes):
    torch._check(len(xs) == len(weights) and len(ys) == len(weights))
    return [torch.empty(W.shape, dtype=_acc_dtype(W.dtype), device=W.device) for W in weights]


torch.library.impl("specreg_fast::conv_weight_grad", "CompositeExplicitAutograd")(_conv_weight_grad_reference)


@torch.library.register_fake("specreg_fast::conv_weight_grad_add_")
def _conv_weight_grad_add_fake(grads, weights, xs, ys, params, padding_modes):
    torch._check(len(grads) == len(weights) and len(xs) == len(weights) and len(ys) == len(weights))
    return None


def _conv_weight_grad_add_reference(grads, weights, xs, ys, params, padding_modes):
    if not (len(grads) == len(weights) == len(xs) == len(ys)):
        raise ValueError(f"specreg_fast::conv_weight_grad_add_: grads, weights, xs and ys must have the same length, "
                         f"got {len(grads)}, {len(weights)}, {len(xs)}, {len(ys)}")
    for G, W in zip(grads, weights):
        if G.shape != W.shape:
            raise ValueError(f"specreg_fast::conv_weight_grad_add_: grads must have the weights' shapes, got "
                             f"{tuple(G.shape)} for a weight of shape {tuple(W.shape)}")
    gws = _conv_weight_grad_reference(weights, xs, ys, params, padding_modes)
    with torch.no_grad():
        for G, gw in zip(grads, gws):
            G.add_(gw)


torch.library.impl("specreg_fast::conv_weight_grad_add_", "CompositeExplicitAutograd")(_conv_weight_grad_add_reference)


def _conv_sigma_backward(ctx, grad):
    n = ctx.n
    saved = ctx.saved_tensors
    weights, xs, ys = saved[:n], saved[n:2 * n], saved[2 * n:]
    # the weight-gradient is linear in y: scale the (output-sized) y by the incoming gradient,
    # not the (weight-sized) result, which saves a full pass over every weight-sized tensor
    ys = [y * grad[l].to(y.dtype) for l, y in enumerate(ys)]
    gws = torch.ops.specreg_fast.conv_weight_grad(list(weights), list(xs), ys, ctx.params, ctx.modes)
    grads = [gw.to(weights[l].dtype) for l, gw in enumerate(gws)]
    return grads, [None] * n, [None] * n, None, None


torch.library.register_autograd("specreg_fast::conv_sigma", _conv_sigma_backward,
                                setup_context=_conv_sigma_setup_context)


# conv_sigma_from_step: the forward value is the power step's estimate (no convolution), the
# backward that of conv_sigma. One implementation for every device.
@torch.library.register_fake("specreg_fast::conv_sigma_from_step")
def _conv_sigma_from_step_fake(weights, xs, ys, params, padding_modes, est):
    torch._check(len(xs) == len(weights) and len(ys) == len(weights) and est.dim() == 1)
    return torch.empty_like(est)


@torch.library.impl("specreg_fast::conv_sigma_from_step", "CompositeExplicitAutograd")
def _conv_sigma_from_step_impl(weights, xs, ys, params, padding_modes, est):
    return est.clone()


def _conv_sigma_from_step_setup_context(ctx, inputs, output):
    weights, xs, ys, params, padding_modes, _ = inputs
    _conv_sigma_setup_context(ctx, (weights, xs, ys, params, padding_modes), output)


def _conv_sigma_from_step_backward(ctx, grad):
    return (*_conv_sigma_backward(ctx, grad), None)


torch.library.register_autograd("specreg_fast::conv_sigma_from_step", _conv_sigma_from_step_backward,
                                setup_context=_conv_sigma_from_step_setup_context)


def conv_sigma_from_step(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor],
                         params: List[int], padding_modes: List[str], est: torch.Tensor) -> torch.Tensor:
    """``conv_sigma`` whose value is ``est``, the return of the conv power step (n_iter >= 1)
    that left ``xs``/``ys`` as they are: ``<y, A x>`` to float rounding, without a convolution."""
    if _eager_autograd(weights):
        _check_from_step(weights, xs, ys, est)
        return _ConvSigmaFromStep.apply(est, list(xs), list(ys), list(params), list(padding_modes), *weights)
    return torch.ops.specreg_fast.conv_sigma_from_step(list(weights), list(xs), list(ys), list(params),
                                                       list(padding_modes), est)


def conv_power_step_(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                     padding_modes: List[str], n_iter: int = 1, tol: float = 0.0) -> torch.Tensor:
    """``n_iter`` grouped power steps on conv operators, in place on ``xs``/``ys``; returns
    the detached estimates ``<y, A x>``. ``params``/``padding_modes``: :func:`pack_conv_params`."""
    return torch.ops.specreg_fast.conv_power_step_(list(weights), list(xs), list(ys), list(params),
                                                   list(padding_modes), int(n_iter), float(tol))


def conv_sigma(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
               padding_modes: List[str]) -> torch.Tensor:
    """``<y_l, A(W_l) x_l>`` per layer, differentiable in the weights."""
    return torch.ops.specreg_fast.conv_sigma(list(weights), list(xs), list(ys), list(params), list(padding_modes))


def conv_weight_grad(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                     padding_modes: List[str]) -> List[torch.Tensor]:
    """``d<y_l, A(W_l) x_l>/dW_l`` per layer (the conv weight-gradient of input ``x_l`` and
    output-gradient ``y_l``), float32 (float64 for a float64 weight), without autograd."""
    return torch.ops.specreg_fast.conv_weight_grad(list(weights), list(xs), list(ys), list(params),
                                                   list(padding_modes))


def conv_weight_grad_add_(grads: List[torch.Tensor], weights: List[torch.Tensor], xs: List[torch.Tensor],
                          ys: List[torch.Tensor], params: List[int], padding_modes: List[str]) -> None:
    """``grads[l] += conv_weight_grad(...)[l]`` in place (any float dtype of ``grads[l]``;
    scale ``ys`` to scale the addition). Checks every argument before writing."""
    torch.ops.specreg_fast.conv_weight_grad_add_(list(grads), list(weights), list(xs), list(ys), list(params),
                                                 list(padding_modes))


def conv_adjoint(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                 padding_modes: List[str]) -> List[torch.Tensor]:
    """``A(W_l)^T y_l`` per layer (``xs`` give the input shapes)."""
    return torch.ops.specreg_fast.conv_adjoint(list(weights), list(xs), list(ys), list(params), list(padding_modes))



# ----------------------------------------------------------------------------- circular / FFT ops (fft.py)
# The matrix-free batched per-frequency power step of circular convs; the algorithm and its
# conventions are documented in csrc/cpu/circular_conv_cpu.cpp, which this mirrors.
def _polyphase_split(x, s):
    d = len(s)
    shape = [x.shape[0]]
    for i in range(d):
        shape += [x.shape[1 + i] // s[i], s[i]]
    perm = [0] + [2 + 2 * i for i in range(d)] + [1 + 2 * i for i in range(d)]
    return x.reshape(shape).permute(perm).reshape(x.shape[0] * math.prod(s), *[x.shape[1 + i] // s[i]
                                                                                for i in range(d)])


def _polyphase_merge(z, s, like):
    d = len(s)
    shape = [like[0], *s, *[like[1 + i] // s[i] for i in range(d)]]
    perm = [0]
    for i in range(d):
        perm += [1 + d + i, 1 + i]
    return z.reshape(shape).permute(perm).reshape(like)


def _circular_power_step_reference(weights, xs, x_tops_out, y_tops_out, params, n_iter):
    geo = _unpack_conv_params(weights, params, ["circular"] * len(weights))
    out = torch.zeros(len(weights), dtype=_out_dtype(weights), device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, x_state, g) in enumerate(zip(weights, xs, geo)):
            Wf = W.to(x_state.dtype)
            s, d = list(g["stride"]), g["d"]
            dims = list(range(1, d + 1))
            m = [x_state.shape[1 + i] // s[i] for i in range(d)]
            like = tuple(x_state.shape)

            def fwd_in(z):
                return torch.fft.rfftn(_polyphase_split(z, s), dim=dims, norm="ortho")

            def inv_in(Z):
                return _polyphase_merge(torch.fft.irfftn(Z, s=m, dim=dims, norm="ortho"), s, like)

            tiny = torch.finfo(x_state.dtype).tiny
            X = fwd_in(x_state)
            nx = torch.linalg.vector_norm(X, dim=0)
            Xn = X / nx.clamp_min(tiny)
            Xn[0] += (nx == 0).to(nx.dtype)
            xh = inv_in(Xn)
            steps = max(n_iter, 1)
            for it in range(steps):
                t = _conv_apply_ref(g, Wf, xh[None])[0]
                T = torch.fft.rfftn(t, dim=dims, norm="ortho")
                sig = torch.linalg.vector_norm(T, dim=0)
                if it == steps - 1:
                    flat = sig.reshape(-1)
                    onehot = (torch.arange(flat.numel(), device=flat.device) == flat.argmax()).to(
                        x_state.dtype).reshape(sig.shape)
                    xt = inv_in(Xn * onehot)
                    yt = torch.fft.irfftn(T * onehot, s=m, dim=dims, norm="ortho")
                    x_tops_out[l].copy_(xt / torch.linalg.vector_norm(xt).clamp_min(tiny))
                    y_tops_out[l].copy_(yt / torch.linalg.vector_norm(yt).clamp_min(tiny))
                    out[l] = flat.max().to(out.dtype)
                if n_iter == 0:
                    break
                a = _conv_adjoint_ref(g, Wf, t[None], xh[None])[0]
                A = fwd_in(a)
                na = torch.linalg.vector_norm(A, dim=0)
                Xn = torch.where(na > 0, A / na.clamp_min(tiny), Xn)
                xh = inv_in(Xn)
            finite = torch.isfinite(out[l])
            if n_iter > 0:
                x_state.copy_(torch.where(finite, xh, x_state))
            out[l] = torch.where(finite, out[l], torch.full_like(out[l], math.nan))
    return out


@torch.library.register_fake("specreg_fast::circular_power_step_")
def _circular_power_step_fake(weights, xs, x_tops, y_tops, params, n_iter):
    torch._check(len(xs) == len(weights) and len(x_tops) == len(weights) and len(y_tops) == len(weights))
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=_out_dtype(weights))


torch.library.impl("specreg_fast::circular_power_step_", "CompositeExplicitAutograd")(_circular_power_step_reference)


def circular_output_shapes(weights: List[torch.Tensor], xs: List[torch.Tensor], params: List[int]):
    """The output shape ``(C_out, *(N / stride))`` of each full wrap-around conv."""
    geo = _unpack_conv_params(weights, params, ["circular"] * len(weights))
    return [(W.shape[0], *[x.shape[1 + i] // g["stride"][i] for i in range(g["d"])])
            for W, x, g in zip(weights, xs, geo)]


def circular_power_step_(weights: List[torch.Tensor], xs: List[torch.Tensor], params: List[int], n_iter: int = 1):
    """``n_iter`` matrix-free batched per-frequency power steps of circular convs, in place on
    ``xs``; returns ``(estimates, x_tops, y_tops)``, the top-frequency pairs in fresh buffers
    (see ``csrc/specreg_fast.cpp``)."""
    weights, xs = list(weights), list(xs)
    x_tops = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]
    y_tops = [x.new_empty(shape) for x, shape in zip(xs, circular_output_shapes(weights, xs, params))]
    est = torch.ops.specreg_fast.circular_power_step_(weights, xs, x_tops, y_tops, list(params), int(n_iter))
    return est, x_tops, y_tops


# ----------------------------------------------------------------------------- explicit-block power iteration
def _batched_power_step_reference(blocks, us, vs, n_iter):
    """Reference kernel of ``batched_power_step_`` (any device), in place on us/vs."""
    with torch.no_grad():
        for _ in range(n_iter):
            t = torch.einsum("bmn,bn->bm", blocks, vs)
            a = torch.einsum("bmn,bm->bn", blocks.conj(), t)
            tn = torch.linalg.vector_norm(t, dim=1, keepdim=True)
            an = torch.linalg.vector_norm(a, dim=1, keepdim=True)
            ok = (tn > 0) & (an > 0) & torch.isfinite(tn) & torch.isfinite(an)
            us.copy_(torch.where(ok, t / torch.where(ok, tn, 1), us))
            vs.copy_(torch.where(ok, a / torch.where(ok, an, 1), vs))
        return torch.linalg.vector_norm(torch.einsum("bmn,bn->bm", blocks, vs), dim=1)


@torch.library.register_fake("specreg_fast::batched_power_step_")
def _batched_power_step_fake(blocks, us, vs, n_iter):
    torch._check(blocks.dim() == 3)
    return blocks.new_empty(blocks.shape[0], dtype=blocks.real.dtype if blocks.is_complex() else blocks.dtype)


torch.library.impl("specreg_fast::batched_power_step_", "CompositeExplicitAutograd")(_batched_power_step_reference)


def batched_power_step_(blocks: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, n_iter: int = 1) -> torch.Tensor:
    """``n_iter`` power steps on every block of ``blocks`` (B, m, n), in place on ``us``
    (B, m) / ``vs`` (B, n); returns ``|P_b v_b|`` per block (see ``csrc/specreg_fast.cpp``)."""
    return torch.ops.specreg_fast.batched_power_step_(blocks, us, vs, int(n_iter))


# ----------------------------------------------------------------------------- Cholesky test (certified bounds)
def _shifted_cholesky_info_reference(H, shift):
    """Reference kernel of ``shifted_cholesky_info`` (any device): LAPACK/cuSOLVER's info."""
    with torch.no_grad():
        A = torch.neg(H)
        A.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
        return torch.linalg.cholesky_ex(A, upper=True).info.to(torch.int32)


@torch.library.register_fake("specreg_fast::shifted_cholesky_info")
def _shifted_cholesky_info_fake(H, shift):
    torch._check(H.dim() == 3)
    return H.new_empty(H.shape[0], dtype=torch.int32)


torch.library.impl("specreg_fast::shifted_cholesky_info", "CompositeExplicitAutograd")(_shifted_cholesky_info_reference)


def shifted_cholesky_info(H: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``info`` of the Cholesky factorization of ``shift_b I - H_b`` for each block of the
    complex stack ``H`` (B, c, c), read from its upper triangle: 0 where the matrix was found
    positive definite, else the 1-based index of the first non-positive pivot (int32; see
    ``csrc/specreg_fast.cpp``). The test behind :func:`specreg_fast.bounds.circular_cholesky_bound`."""
    if not isinstance(H, torch.Tensor) or not H.is_complex() or H.dim() != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H must be a complex (B, c, c) tensor, got "
                         f"{tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}")
    if not isinstance(shift, torch.Tensor) or shift.shape != (H.shape[0],) or shift.dtype != H.real.dtype:
        raise ValueError(f"shift must be a {H.real.dtype} tensor of shape ({H.shape[0]},)")
    return torch.ops.specreg_fast.shifted_cholesky_info(H, shift)
