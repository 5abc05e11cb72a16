"""The conv-operator ops (csrc/cpu/conv_operator_cpu.cpp): ``conv_power_step_``, ``conv_sigma``,
``conv_sigma_from_step``, ``conv_adjoint``, ``conv_weight_grad`` and ``conv_weight_grad_add_``.
The packed geometry they take is :func:`specreg_fast.geometry.pack_conv_params`."""
from __future__ import annotations

import math
from typing import List

import torch

from ..contract import WEIGHT_DTYPES, acc_dtype, out_dtype
from ..geometry import conv_adjoint as _conv_adjoint, conv_apply as _conv_apply
from ..geometry import conv_output_shape, decode_conv_params, padded_input
from ..power_loop import power_iterate
from ._checks import (check_est, check_from_step, check_n_iter, check_one_device, check_writable, check_written_apart,
                      eager_autograd, iter_arg, modes_arg, params_arg, require, tol_arg, typed_call)


def _check_conv_args(op: str, weights, xs, ys, params, modes, need_contiguous: bool) -> List[dict]:
    """Checks of the conv-operator ops (``decode`` and ``validate`` of csrc/conv_geometry.h);
    returns the decoded geometry."""
    require(len(xs) == len(weights) and len(ys) == len(weights),
            lambda: f"{op}: weights, xs and ys must have the same length, got {len(weights)}, {len(xs)}, "
                    f"{len(ys)}")
    check_one_device(op, (("weights", weights), ("xs", xs), ("ys", ys)))
    geo = decode_conv_params(op, weights, params, modes)
    for l, (W, x, y, g) in enumerate(zip(weights, xs, ys, geo)):
        require(W.dtype in WEIGHT_DTYPES,
                lambda: f"{op}: weights[{l}] must be float32/float64/bfloat16/float16, got {W.dtype}", TypeError)
        require(x.dim() == g["d"] + 1, lambda: f"{op}: xs[{l}] must be (C_in, *spatial) with {g['d']} "
                                               f"spatial dims, got {tuple(x.shape)}")
        cin = W.shape[0] if g["transposed"] else W.shape[1] * g["groups"]
        cout = W.shape[1] * g["groups"] if g["transposed"] else W.shape[0]
        require(x.shape[0] == cin, lambda: f"{op}: xs[{l}] has {x.shape[0]} channels, the layer takes {cin}")
        require(cout % g["groups"] == 0 and cin % g["groups"] == 0,
                lambda: f"{op}: layer {l}: channels ({cin}, {cout}) not divisible by groups={g['groups']}")
        for i in range(g["d"]):
            n, lo, hi = x.shape[1 + i], g["lo"][i], g["hi"][i]
            if g["mode"] == "reflect":
                require(lo < n and hi < n, lambda: f"{op}: layer {l}: reflect padding must be < the input "
                                                   f"size")
            if g["mode"] == "circular":
                require(lo <= n and hi <= n, lambda: f"{op}: layer {l}: circular padding must be <= the "
                                                     f"input size")
            if g["transposed"]:
                require(g["output_padding"][i] < max(g["stride"][i], g["dilation"][i]),
                        lambda: f"{op}: layer {l}: output_padding must be smaller than stride or dilation")
        oshape = conv_output_shape(op, l, g, W, x.shape)
        require(tuple(y.shape) == tuple(oshape),
                lambda: f"{op}: ys[{l}] must have the output shape {tuple(oshape)}, got {tuple(y.shape)}")
        acc = acc_dtype(W.dtype)
        require(x.dtype == acc and y.dtype == acc,
                lambda: f"{op}: xs[{l}]/ys[{l}] must be {acc} for a {W.dtype} weight, got {x.dtype}/{y.dtype}",
                TypeError)
        if need_contiguous:
            require(x.is_contiguous() and y.is_contiguous(),
                    lambda: f"{op}: xs[{l}]/ys[{l}] must be contiguous")
    return geo


def _check_conv_power_step_args(op: str, weights, xs, ys, params, modes, n_iter, tol) -> List[dict]:
    check_n_iter(op, n_iter)
    require(tol >= 0 and math.isfinite(tol), lambda: f"{op}: tol must be finite and >= 0, got {tol}")
    return _check_conv_args(op, weights, xs, ys, params, modes, need_contiguous=True)


def conv_power_step_reference(weights, xs, ys, params, padding_modes, n_iter, tol):
    """Reference kernel of ``conv_power_step_`` (any device): the same step and conventions
    as the C++ loop, with ``torch.where`` instead of host branches."""
    geo = _check_conv_power_step_args("specreg_fast::conv_power_step_", weights, xs, ys, params, padding_modes,
                                      n_iter, tol)
    check_written_apart("specreg_fast::conv_power_step_", (("weights", weights, False), ("xs", xs, True),
                                                           ("ys", ys, True)))
    out = torch.zeros(len(weights), dtype=out_dtype(weights), device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, x1, y1, g) in enumerate(zip(weights, xs, ys, geo)):
            Wf = W.to(x1.dtype)
            if not bool(torch.isfinite(Wf).all()):
                out[l] = math.nan
                continue
            x, y = x1[None], y1[None]
            if n_iter == 0:
                est = (y * _conv_apply(g, Wf, x)).sum()
            else:  # y = u (output side), x = v (input side); a step with a non-finite norm is skipped
                est = power_iterate(lambda v: _conv_apply(g, Wf, v), lambda t: _conv_adjoint(g, Wf, t, x), y, x,
                                    n_iter, tol, finite=True)
            out[l] = est.to(out.dtype)
    return out


def conv_sigma_reference(weights, xs, ys, params, padding_modes):
    geo = _check_conv_args("specreg_fast::conv_sigma", weights, xs, ys, params, padding_modes, need_contiguous=False)
    dt = out_dtype(weights)
    if not weights:
        return torch.zeros(0, dtype=dt)
    return torch.stack([(y[None] * _conv_apply(g, W.to(x.dtype), x[None])).sum().to(dt)
                        for W, x, y, g in zip(weights, xs, ys, geo)])


def conv_adjoint_reference(weights, xs, ys, params, padding_modes):
    geo = _check_conv_args("specreg_fast::conv_adjoint", weights, xs, ys, params, padding_modes,
                           need_contiguous=False)
    return [_conv_adjoint(g, W.to(y.dtype), y[None], x[None])[0].contiguous()
            for W, x, y, g in zip(weights, xs, ys, geo)]


@torch.library.register_fake("specreg_fast::conv_power_step_")
def _conv_power_step_fake(weights, xs, ys, params, padding_modes, n_iter, tol):
    _check_conv_power_step_args("specreg_fast::conv_power_step_", weights, xs, ys, params, padding_modes, n_iter, tol)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=out_dtype(weights))


@torch.library.register_fake("specreg_fast::conv_sigma")
def _conv_sigma_fake(weights, xs, ys, params, padding_modes):
    _check_conv_args("specreg_fast::conv_sigma", weights, xs, ys, params, padding_modes, need_contiguous=False)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=out_dtype(weights))


@torch.library.register_fake("specreg_fast::conv_adjoint")
def _conv_adjoint_fake(weights, xs, ys, params, padding_modes):
    _check_conv_args("specreg_fast::conv_adjoint", weights, xs, ys, params, padding_modes, need_contiguous=False)
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


torch.library.impl("specreg_fast::conv_power_step_", "CompositeExplicitAutograd")(conv_power_step_reference)
torch.library.impl("specreg_fast::conv_sigma", "CompositeExplicitAutograd")(conv_sigma_reference)
torch.library.impl("specreg_fast::conv_adjoint", "CompositeExplicitAutograd")(conv_adjoint_reference)


def _conv_sigma_setup_context(ctx, inputs, output):
    weights, xs, ys, params, padding_modes = inputs
    # copies of the persistent (x, y), for the reason given in _sigma_setup_context
    ctx.save_for_backward(*weights, *[x.clone() for x in xs], *[y.clone() for y in ys])
    ctx.n = len(weights)
    ctx.params, ctx.modes = list(params), list(padding_modes)


def conv_weight_grad_reference(weights, xs, ys, params, padding_modes):
    # d<y, A(W) x>/dW with x, y held fixed is the conv weight-gradient with input pad(x) and
    # output-gradient y: one aten.convolution_backward per layer, no autograd graph.
    geo = _check_conv_args("specreg_fast::conv_weight_grad", weights, xs, ys, params, padding_modes,
                           need_contiguous=False)
    grads = []
    for l, g in enumerate(geo):
        W, x, y = weights[l], xs[l], ys[l]
        Wf = W.to(acc_dtype(W.dtype))
        xp, pad = padded_input(g, x[None].to(Wf.dtype))
        gw = torch.ops.aten.convolution_backward(y[None].to(Wf.dtype), xp, Wf, None, g["stride"], pad, g["dilation"],
                                                 g["transposed"], g["output_padding"], g["groups"],
                                                 [False, True, False])[1]
        grads.append(gw.contiguous())
    return grads


@torch.library.register_fake("specreg_fast::conv_weight_grad")
def _conv_weight_grad_fake(weights, xs, ys, params, padding_modes):
    _check_conv_args("specreg_fast::conv_weight_grad", weights, xs, ys, params, padding_modes, need_contiguous=False)
    return [torch.empty(W.shape, dtype=acc_dtype(W.dtype), device=W.device) for W in weights]


torch.library.impl("specreg_fast::conv_weight_grad", "CompositeExplicitAutograd")(conv_weight_grad_reference)


def _check_conv_weight_grad_add_args(grads, weights, xs, ys, params, padding_modes) -> None:
    op = "specreg_fast::conv_weight_grad_add_"
    require(len(grads) == len(weights), lambda: f"{op}: grads, weights, xs and ys must have the same "
                                                f"length, got {len(grads)}, {len(weights)}, {len(xs)}, "
                                                f"{len(ys)}")
    _check_conv_args(op, weights, xs, ys, params, padding_modes, need_contiguous=False)
    check_one_device(op, (("weights", weights), ("grads", grads)))
    for l, (G, W) in enumerate(zip(grads, weights)):
        require(tuple(G.shape) == tuple(W.shape), lambda: f"{op}: grads[{l}] must have the weight's shape "
                                                          f"{tuple(W.shape)}, got {tuple(G.shape)}")
        require(G.dtype.is_floating_point,
                lambda: f"{op}: grads[{l}] must be a floating-point tensor, got {G.dtype}", TypeError)


@torch.library.register_fake("specreg_fast::conv_weight_grad_add_")
def _conv_weight_grad_add_fake(grads, weights, xs, ys, params, padding_modes):
    _check_conv_weight_grad_add_args(grads, weights, xs, ys, params, padding_modes)
    return None


def conv_weight_grad_add_reference(grads, weights, xs, ys, params, padding_modes):
    _check_conv_weight_grad_add_args(grads, weights, xs, ys, params, padding_modes)
    check_written_apart("specreg_fast::conv_weight_grad_add_", (("weights", weights, False), ("xs", xs, False),
                                                                ("ys", ys, False), ("grads", grads, True)))
    gws = conv_weight_grad_reference(weights, xs, ys, params, padding_modes)
    with torch.no_grad():
        for G, gw in zip(grads, gws):
            G.add_(gw)


torch.library.impl("specreg_fast::conv_weight_grad_add_", "CompositeExplicitAutograd")(conv_weight_grad_add_reference)


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
    _check_conv_args("specreg_fast::conv_sigma_from_step", weights, xs, ys, params, padding_modes,
                     need_contiguous=False)
    check_est("specreg_fast::conv_sigma_from_step", est, weights)
    return torch.empty_like(est)


@torch.library.impl("specreg_fast::conv_sigma_from_step", "CompositeExplicitAutograd")
def _conv_sigma_from_step_impl(weights, xs, ys, params, padding_modes, est):
    # the checks of the compiled kernels (and of the fake): the reference runs where they are
    # not loaded (another torch, a device without a kernel)
    _conv_sigma_from_step_fake(weights, xs, ys, params, padding_modes, est)
    return est.clone()


def _conv_sigma_from_step_setup_context(ctx, inputs, output):
    weights, xs, ys, params, padding_modes, _ = inputs
    _conv_sigma_setup_context(ctx, (weights, xs, ys, params, padding_modes), output)


def _conv_sigma_from_step_backward(ctx, grad):
    return (*_conv_sigma_backward(ctx, grad), None)


torch.library.register_autograd("specreg_fast::conv_sigma_from_step", _conv_sigma_from_step_backward,
                                setup_context=_conv_sigma_from_step_setup_context)


class _ConvSigmaFromStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, est, xs, ys, params, padding_modes, *weights):
        _conv_sigma_setup_context(ctx, (weights, xs, ys, params, padding_modes), None)
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        gw = _conv_sigma_backward(ctx, grad)[0]
        return (None, None, None, None, None, *gw)


def conv_sigma_from_step(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor],
                         params: List[int], padding_modes: List[str], est: torch.Tensor) -> torch.Tensor:
    """``conv_sigma`` whose value is ``est``, the return of the conv power step (n_iter >= 1)
    that left ``xs``/``ys`` as they are: ``<y, A x>`` to float rounding, without a convolution."""
    if eager_autograd(weights):
        check_from_step(weights, xs, ys, est)
        return _ConvSigmaFromStep.apply(est, list(xs), list(ys), list(params), list(padding_modes), *weights)
    return typed_call(torch.ops.specreg_fast.conv_sigma_from_step,
                      (list(weights), list(xs), list(ys), list(params), list(padding_modes), est),
                      _conv_sigma_from_step_fake)


def conv_power_step_(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                     padding_modes: List[str], n_iter: int = 1, tol: float = 0.0) -> torch.Tensor:
    """``n_iter`` grouped power steps on conv operators, in place on ``xs``/``ys``; returns
    the detached estimates ``<y, A x>``. ``params``/``padding_modes``: :func:`pack_conv_params`."""
    op = "specreg_fast::conv_power_step_"
    xs, ys = list(xs), list(ys)
    check_writable(op, "xs", xs)
    check_writable(op, "ys", ys)
    return typed_call(torch.ops.specreg_fast.conv_power_step_,
                      (list(weights), xs, ys, params_arg(op, params), modes_arg(op, padding_modes),
                       iter_arg(op, "n_iter", n_iter), tol_arg(op, tol, finite=True)),
                      lambda *a: _check_conv_power_step_args(op, *a))


def conv_sigma(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
               padding_modes: List[str]) -> torch.Tensor:
    """``<y_l, A(W_l) x_l>`` per layer, differentiable in the weights."""
    op = "specreg_fast::conv_sigma"
    return typed_call(torch.ops.specreg_fast.conv_sigma,
                      (list(weights), list(xs), list(ys), params_arg(op, params), modes_arg(op, padding_modes)),
                      lambda *a: _check_conv_args(op, *a, need_contiguous=False))


def conv_weight_grad(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                     padding_modes: List[str]) -> List[torch.Tensor]:
    """``d<y_l, A(W_l) x_l>/dW_l`` per layer (the conv weight-gradient of input ``x_l`` and
    output-gradient ``y_l``), float32 (float64 for a float64 weight), without autograd."""
    op = "specreg_fast::conv_weight_grad"
    return typed_call(torch.ops.specreg_fast.conv_weight_grad,
                      (list(weights), list(xs), list(ys), params_arg(op, params), modes_arg(op, padding_modes)),
                      lambda *a: _check_conv_args(op, *a, need_contiguous=False))


def conv_weight_grad_add_(grads: List[torch.Tensor], weights: List[torch.Tensor], xs: List[torch.Tensor],
                          ys: List[torch.Tensor], params: List[int], padding_modes: List[str]) -> None:
    """``grads[l] += conv_weight_grad(...)[l]`` in place (any float dtype of ``grads[l]``;
    scale ``ys`` to scale the addition). Checks every argument before writing."""
    op = "specreg_fast::conv_weight_grad_add_"
    grads = list(grads)
    check_writable(op, "grads", grads)
    typed_call(torch.ops.specreg_fast.conv_weight_grad_add_,
               (grads, list(weights), list(xs), list(ys), params_arg(op, params), modes_arg(op, padding_modes)),
               _check_conv_weight_grad_add_args)


def conv_adjoint(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                 padding_modes: List[str]) -> List[torch.Tensor]:
    """``A(W_l)^T y_l`` per layer (``xs`` give the input shapes)."""
    op = "specreg_fast::conv_adjoint"
    return typed_call(torch.ops.specreg_fast.conv_adjoint,
                      (list(weights), list(xs), list(ys), params_arg(op, params), modes_arg(op, padding_modes)),
                      lambda *a: _check_conv_args(op, *a, need_contiguous=False))
