"""The depthwise conv-operator ops (csrc/cpu/depthwise_cpu.cpp): ``depthwise_power_step_``,
``depthwise_weight_grad_add_`` and ``depthwise_passes``. They take the conv ops' packing
(:func:`specreg_fast.geometry.pack_conv_params`) and are ``conv_power_step_`` /
``conv_weight_grad_add_`` restricted to depthwise layers (:func:`depthwise_supported`); the
reference kernels here are the conv ops' references after the depthwise checks."""
from __future__ import annotations

import math
from typing import List

import torch

from ..geometry import conv_adjoint as _conv_adjoint, conv_apply as _conv_apply, decode_conv_params
from ._checks import check_n_iter, check_one_device, check_writable, iter_arg, modes_arg, params_arg, require
from ._checks import tol_arg, typed_call
from .conv_operator import conv_power_step_reference, conv_weight_grad_reference

PARAMS_PER_LAYER = 12  # 2 + 5 d with d = 2


def depthwise_supported(weight: torch.Tensor, geometry: dict) -> bool:
    """Whether the depthwise kernels take a layer: a 2-D, non-transposed conv with groups ==
    C_in == C_out (weight ``(C, 1, kh, kw)``), zeros padding, a float32/float64 weight.
    ``geometry``: one entry of :func:`geometry.decode_conv_params`."""
    return (weight.dim() == 4 and weight.shape[1] == 1 and weight.dtype in (torch.float32, torch.float64)
            and geometry["d"] == 2 and not geometry["transposed"] and geometry["groups"] == weight.shape[0]
            and geometry["mode"] == "zeros")


_CHOICE = ["auto"]


def set_depthwise_kernel(choice: str) -> str:
    """How the penalty's conv group runs depthwise layers on the CPU from the next call on:
    ``"auto"`` (the direct kernels where :func:`depthwise_preferred` says they win, the default),
    ``"direct"`` (every layer :func:`depthwise_supported` takes) or ``"aten"`` (never: the conv
    ops, ATen's depthwise kernels). Returns the previous choice."""
    if choice not in ("auto", "direct", "aten"):
        raise ValueError(f"the depthwise kernel must be 'auto', 'direct' or 'aten', got {choice!r}")
    prev, _CHOICE[0] = _CHOICE[0], choice
    return prev


def depthwise_kernel() -> str:
    """The current :func:`set_depthwise_kernel` choice."""
    return _CHOICE[0]


def depthwise_preferred(weight: torch.Tensor, geometry: dict, input_shape) -> bool:
    """Whether the direct kernels beat ATen on this depthwise layer (one power step plus the
    weight-gradient), by the measurements of bench/bench_depthwise.py on the zoo's 25 depthwise
    shapes at 64x64 input (results/bench_depthwise_cpu.json: one thread, medians of 15
    interleaved rounds of thread CPU time on the shared 2-core machine, ratio to the conv op
    with a bootstrap interval): 0.24-0.92x on 22 shapes, 0.99x [0.97-1.01] on EfficientNet-B0's
    (672, 4x4, 5x5), and 1.03x on the two shapes excluded here, 3x3 kernels over >= 16x16
    outputs with >= 64 channels (EfficientNet-B0's (96, 32x32, stride 2): [0.97-1.14];
    (144, 16x16, stride 1): [1.01-1.05]). There a pass is 0.4-0.7 MFLOP, enough to amortize
    ATen's fixed per-call cost (what the direct kernels save on the small layers: the conv op
    takes ~0.3 ms on a 0.07 MFLOP layer there, the direct kernels ~0.1 ms), and oneDNN's 3x3
    depthwise kernels run the arithmetic faster than the direct weight-gradient (a dot per
    output row and tap: two loads per multiply-add) and the strided stride-2 loops; those
    layers stay on ATen."""
    kh, kw = weight.shape[2], weight.shape[3]
    C, H, W = input_shape
    ho = (H + geometry["lo"][0] + geometry["hi"][0] - geometry["dilation"][0] * (kh - 1) - 1) // geometry["stride"][0] + 1
    wo = (W + geometry["lo"][1] + geometry["hi"][1] - geometry["dilation"][1] * (kw - 1) - 1) // geometry["stride"][1] + 1
    return not (kh * kw <= 9 and ho * wo >= 256 and C >= 64)


def _check_depthwise_args(op: str, weights, xs, ys, params, modes) -> List[dict]:
    """The checks of ``decode_depthwise`` (csrc/cpu/depthwise_cpu.cpp), same messages; returns
    the decoded geometry."""
    L = len(weights)
    require(len(xs) == L and len(ys) == L,
            lambda: f"{op}: weights, xs and ys must have the same length, got {L}, {len(xs)}, {len(ys)}")
    require(len(modes) == L,
            lambda: f"{op}: padding_modes must have one entry per layer ({L}), got {len(modes)}")
    require(len(params) == L * PARAMS_PER_LAYER,
            lambda: f"{op}: params must hold {PARAMS_PER_LAYER} entries per layer ({L * PARAMS_PER_LAYER}), got "
                    f"{len(params)}")
    for l, W in enumerate(weights):
        require(W.dtype in (torch.float32, torch.float64),
                lambda: f"{op}: weights[{l}] must be float32 or float64, got {W.dtype}", TypeError)
        require(W.dim() == 4 and W.shape[1] == 1,
                lambda: f"{op}: weights[{l}] must be a depthwise 2-D kernel (C, 1, kh, kw), got shape "
                        f"{list(W.shape)}")
    check_one_device(op, (("weights", weights), ("xs", xs), ("ys", ys)))
    geo = decode_conv_params(op, weights, params, modes)
    for l, (W, x, y, g) in enumerate(zip(weights, xs, ys, geo)):
        C = W.shape[0]
        require(not g["transposed"], lambda: f"{op}: layer {l}: a transposed conv is not depthwise here")
        require(g["groups"] == C, lambda: f"{op}: layer {l}: groups must equal the channels ({C}), got {g['groups']}")
        require(g["mode"] == "zeros", lambda: f"{op}: layer {l}: padding mode must be zeros, got '{g['mode']}'")
        require(all(v == 0 for v in g["output_padding"]), lambda: f"{op}: layer {l}: output_padding must be 0")
        require(x.dim() == 3 and x.shape[0] == C,
                lambda: f"{op}: xs[{l}] must be ({C}, H, W), got {list(x.shape)}")
        sizes = []
        for i in range(2):
            e = x.shape[1 + i] + g["lo"][i] + g["hi"][i] - g["dilation"][i] * (W.shape[2 + i] - 1)
            require(e >= 1, lambda: f"{op}: layer {l}: input size ({x.shape[1]}, {x.shape[2]}) too small for the "
                                    f"kernel")
            sizes.append((e - 1) // g["stride"][i] + 1)
        oshape = [C, *sizes]
        require(list(y.shape) == oshape, lambda: f"{op}: ys[{l}] must have the output shape {oshape}, got "
                                                 f"{list(y.shape)}")
        require(x.dtype == W.dtype and y.dtype == W.dtype,
                lambda: f"{op}: xs[{l}]/ys[{l}] must be {W.dtype} for a {W.dtype} weight, got {x.dtype}/{y.dtype}",
                TypeError)
        require(x.is_contiguous() and y.is_contiguous(), lambda: f"{op}: xs[{l}]/ys[{l}] must be contiguous")
    return geo


def _check_power_args(weights, xs, ys, params, modes, n_iter, tol):
    op = "specreg_fast::depthwise_power_step_"
    check_n_iter(op, n_iter)
    require(tol >= 0 and math.isfinite(tol), lambda: f"{op}: tol must be finite and >= 0, got {tol}")
    return _check_depthwise_args(op, weights, xs, ys, params, modes)


def _check_grad_add_args(grads, weights, xs, ys, params, modes):
    op = "specreg_fast::depthwise_weight_grad_add_"
    require(len(grads) == len(weights),
            lambda: f"{op}: grads, weights, xs and ys must have the same length, got {len(grads)}, {len(weights)}, "
                    f"{len(xs)}, {len(ys)}")
    _check_depthwise_args(op, weights, xs, ys, params, modes)
    check_one_device(op, (("weights", weights), ("grads", grads)))
    for l, (G, W) in enumerate(zip(grads, weights)):
        require(tuple(G.shape) == tuple(W.shape),
                lambda: f"{op}: grads[{l}] must have the weight's shape {list(W.shape)}, got {list(G.shape)}")
        require(G.dtype == W.dtype, lambda: f"{op}: grads[{l}] must be {W.dtype}, got {G.dtype}", TypeError)
        require(G.is_contiguous(), lambda: f"{op}: grads[{l}] must be contiguous")


# ------------------------------------------------------------------ reference kernels, fakes
def depthwise_power_step_reference(weights, xs, ys, params, padding_modes, n_iter, tol):
    _check_power_args(weights, xs, ys, params, padding_modes, n_iter, tol)
    return conv_power_step_reference(weights, xs, ys, params, padding_modes, n_iter, tol)


def depthwise_weight_grad_add_reference(grads, weights, xs, ys, params, padding_modes):
    _check_grad_add_args(grads, weights, xs, ys, params, padding_modes)
    with torch.no_grad():
        for G, gw in zip(grads, conv_weight_grad_reference(weights, xs, ys, params, padding_modes)):
            G.add_(gw)


def depthwise_passes_reference(weights, xs, ys, params, padding_modes):
    geo = _check_depthwise_args("specreg_fast::depthwise_passes", weights, xs, ys, params, padding_modes)
    out = []
    gws = conv_weight_grad_reference(weights, xs, ys, params, padding_modes)
    with torch.no_grad():
        for W, x, y, g, gw in zip(weights, xs, ys, geo, gws):
            out += [_conv_apply(g, W, x[None])[0].contiguous(), _conv_adjoint(g, W, y[None], x[None])[0].contiguous(),
                    gw]
    return out


@torch.library.register_fake("specreg_fast::depthwise_power_step_")
def _depthwise_power_step_fake(weights, xs, ys, params, padding_modes, n_iter, tol):
    _check_power_args(weights, xs, ys, params, padding_modes, n_iter, tol)
    dt = torch.float64 if any(W.dtype == torch.float64 for W in weights) else torch.float32
    if not weights:
        return torch.empty(0, dtype=dt)
    return weights[0].new_empty(len(weights), dtype=dt)


@torch.library.register_fake("specreg_fast::depthwise_weight_grad_add_")
def _depthwise_weight_grad_add_fake(grads, weights, xs, ys, params, padding_modes):
    _check_grad_add_args(grads, weights, xs, ys, params, padding_modes)
    return None


@torch.library.register_fake("specreg_fast::depthwise_passes")
def _depthwise_passes_fake(weights, xs, ys, params, padding_modes):
    _check_depthwise_args("specreg_fast::depthwise_passes", weights, xs, ys, params, padding_modes)
    out = []
    for W, x, y in zip(weights, xs, ys):
        out += [torch.empty_like(y), torch.empty_like(x), torch.empty_like(W, memory_format=torch.contiguous_format)]
    return out


torch.library.impl("specreg_fast::depthwise_power_step_", "CompositeExplicitAutograd")(depthwise_power_step_reference)
torch.library.impl("specreg_fast::depthwise_weight_grad_add_", "CompositeExplicitAutograd")(
    depthwise_weight_grad_add_reference)
torch.library.impl("specreg_fast::depthwise_passes", "CompositeExplicitAutograd")(depthwise_passes_reference)


# ------------------------------------------------------------------ typed wrappers
def depthwise_power_step_(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor],
                          params: List[int], padding_modes: List[str], n_iter: int = 1,
                          tol: float = 0.0) -> torch.Tensor:
    """``conv_power_step_`` on depthwise layers (:func:`depthwise_supported`), in place on
    ``xs``/``ys``; returns the detached estimates ``<y, A x>``."""
    op = "specreg_fast::depthwise_power_step_"
    xs, ys = list(xs), list(ys)
    check_writable(op, "xs", xs)
    check_writable(op, "ys", ys)
    args = (list(weights), xs, ys, params_arg(op, params), modes_arg(op, padding_modes),
            iter_arg(op, "n_iter", n_iter), tol_arg(op, tol, finite=True))
    return typed_call(torch.ops.specreg_fast.depthwise_power_step_, args, _check_power_args)


def depthwise_weight_grad_add_(grads: List[torch.Tensor], weights: List[torch.Tensor], xs: List[torch.Tensor],
                               ys: List[torch.Tensor], params: List[int], padding_modes: List[str]) -> None:
    """``grads[l] += d<y_l, A(W_l) x_l>/dW_l`` for depthwise layers (``grads`` contiguous, of the
    weight's dtype; scale ``ys`` to scale the addition)."""
    op = "specreg_fast::depthwise_weight_grad_add_"
    grads = list(grads)
    check_writable(op, "grads", grads)
    args = (grads, list(weights), list(xs), list(ys), params_arg(op, params), modes_arg(op, padding_modes))
    typed_call(torch.ops.specreg_fast.depthwise_weight_grad_add_, args, _check_grad_add_args)


def depthwise_passes(weights: List[torch.Tensor], xs: List[torch.Tensor], ys: List[torch.Tensor], params: List[int],
                     padding_modes: List[str]) -> List[torch.Tensor]:
    """``[A x, A^T y, d<y, A x>/dW]`` per depthwise layer (3 tensors per layer)."""
    op = "specreg_fast::depthwise_passes"
    args = (list(weights), list(xs), list(ys), params_arg(op, params), modes_arg(op, padding_modes))
    return typed_call(torch.ops.specreg_fast.depthwise_passes, args,
                      lambda *a: _check_depthwise_args(op, *a))
