"""The circular / FFT op ``circular_power_step_`` (csrc/cpu/circular_conv_cpu.cpp): the
matrix-free batched per-frequency power step of circular convs."""
from __future__ import annotations

import math
from typing import List

import torch

from ..contract import WEIGHT_DTYPES, acc_dtype, out_dtype
from ..geometry import conv_adjoint as _conv_adjoint, conv_apply as _conv_apply
from ..geometry import conv_output_shape, decode_conv_params
from ._checks import (check_n_iter, check_one_device, check_writable, check_written_apart, iter_arg, params_arg,
                      require, typed_call)


def _check_circular_args(op: str, weights, xs, x_tops, y_tops, params, n_iter) -> List[dict]:
    """Checks of ``circular_power_step_`` (csrc/cpu/circular_conv_cpu.cpp); returns the geometry."""
    require(len(xs) == len(weights) and len(x_tops) == len(weights) and len(y_tops) == len(weights),
            lambda: f"{op}: weights, xs, x_tops and y_tops must have the same length, got {len(weights)}, "
                    f"{len(xs)}, {len(x_tops)}, {len(y_tops)}")
    check_n_iter(op, n_iter)
    check_one_device(op, (("weights", weights), ("xs", xs), ("x_tops", x_tops), ("y_tops", y_tops)))
    geo = decode_conv_params(op, weights, params, ["circular"] * len(weights))
    for l, (W, x, g) in enumerate(zip(weights, xs, geo)):
        require(W.dtype in WEIGHT_DTYPES,
                lambda: f"{op}: weights[{l}] must be float32/float64/bfloat16/float16, got {W.dtype}", TypeError)
        require(not g["transposed"],
                lambda: f"{op}: layer {l}: a circular conv norm needs a ConvNd, not a transposed conv")
        require(x.dim() == g["d"] + 1, lambda: f"{op}: xs[{l}] must be (C_in, *spatial) with {g['d']} "
                                               f"spatial dims, got {tuple(x.shape)}")
        require(x.shape[0] == W.shape[1] * g["groups"],
                lambda: f"{op}: xs[{l}] has {x.shape[0]} channels, the layer takes "
                        f"{W.shape[1] * g['groups']}")
        require(W.shape[0] % g["groups"] == 0,
                lambda: f"{op}: layer {l}: C_out={W.shape[0]} not divisible by groups={g['groups']}")
        acc = acc_dtype(W.dtype)
        require(x.dtype == acc, lambda: f"{op}: xs[{l}] must be {acc} for a {W.dtype} weight, got {x.dtype}",
                TypeError)
        require(x.is_contiguous(), lambda: f"{op}: xs[{l}] must be contiguous")
        for i in range(g["d"]):
            n = x.shape[1 + i]
            require(n % g["stride"][i] == 0, lambda: f"{op}: layer {l}: stride {g['stride'][i]} must "
                                                     f"divide the input size {n} (spatial dim {i})")
            require(g["lo"][i] <= n and g["hi"][i] <= n,
                    lambda: f"{op}: layer {l}: circular padding must be <= the input size")
        oshape = conv_output_shape(op, l, g, W, x.shape)
        require(all(oshape[1 + i] == x.shape[1 + i] // g["stride"][i] for i in range(g["d"])),
                lambda: f"{op}: layer {l}: padding must give the full wrap-around output size (total "
                        f"padding dilation*(kernel-1)), got output {tuple(oshape)}")
        require(tuple(x_tops[l].shape) == tuple(x.shape) and x_tops[l].dtype == x.dtype,
                lambda: f"{op}: x_tops[{l}] must be like xs[{l}]")
        require(tuple(y_tops[l].shape) == tuple(oshape) and y_tops[l].dtype == x.dtype,
                lambda: f"{op}: y_tops[{l}] must have the output shape {tuple(oshape)} and xs[{l}]'s dtype")
    return geo


# The matrix-free batched per-frequency power step of circular convs; the algorithm and its
# conventions are documented in csrc/cpu/circular_conv_cpu.cpp, which this mirrors.
def polyphase_split(x, s):
    d = len(s)
    shape = [x.shape[0]]
    for i in range(d):
        shape += [x.shape[1 + i] // s[i], s[i]]
    perm = [0] + [2 + 2 * i for i in range(d)] + [1 + 2 * i for i in range(d)]
    return x.reshape(shape).permute(perm).reshape(x.shape[0] * math.prod(s), *[x.shape[1 + i] // s[i]
                                                                                for i in range(d)])


def polyphase_merge(z, s, like):
    d = len(s)
    shape = [like[0], *s, *[like[1 + i] // s[i] for i in range(d)]]
    perm = [0]
    for i in range(d):
        perm += [1 + d + i, 1 + i]
    return z.reshape(shape).permute(perm).reshape(like)


def circular_power_step_reference(weights, xs, x_tops_out, y_tops_out, params, n_iter):
    geo = _check_circular_args("specreg_fast::circular_power_step_", weights, xs, x_tops_out, y_tops_out, params,
                               n_iter)
    check_written_apart("specreg_fast::circular_power_step_", (("weights", weights, False), ("xs", xs, True),
                                                               ("x_tops", x_tops_out, True), ("y_tops", y_tops_out, True)))
    out = torch.zeros(len(weights), dtype=out_dtype(weights), device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, x_state, g) in enumerate(zip(weights, xs, geo)):
            Wf = W.to(x_state.dtype)
            s, d = list(g["stride"]), g["d"]
            dims = list(range(1, d + 1))
            m = [x_state.shape[1 + i] // s[i] for i in range(d)]
            like = tuple(x_state.shape)

            def fwd_in(z):
                return torch.fft.rfftn(polyphase_split(z, s), dim=dims, norm="ortho")

            def inv_in(Z):
                return polyphase_merge(torch.fft.irfftn(Z, s=m, dim=dims, norm="ortho"), s, like)

            tiny = torch.finfo(x_state.dtype).tiny
            X = fwd_in(x_state)
            nx = torch.linalg.vector_norm(X, dim=0)
            Xn = X / nx.clamp_min(tiny)
            Xn[0] += (nx == 0).to(nx.dtype)
            xh = inv_in(Xn)
            steps = max(n_iter, 1)
            for it in range(steps):
                t = _conv_apply(g, Wf, xh[None])[0]
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
                a = _conv_adjoint(g, Wf, t[None], xh[None])[0]
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
    _check_circular_args("specreg_fast::circular_power_step_", weights, xs, x_tops, y_tops, params, n_iter)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=out_dtype(weights))


torch.library.impl("specreg_fast::circular_power_step_", "CompositeExplicitAutograd")(circular_power_step_reference)


def circular_output_shapes(weights: List[torch.Tensor], xs: List[torch.Tensor], params: List[int]):
    """The output shape ``(C_out, *(N / stride))`` of each full wrap-around conv."""
    op = "specreg_fast::circular_power_step_"
    require(len(xs) == len(weights), lambda: f"{op}: weights and xs must have the same length, got "
                                             f"{len(weights)}, {len(xs)}")
    geo = decode_conv_params(op, weights, params, ["circular"] * len(weights))
    for l, (x, g) in enumerate(zip(xs, geo)):
        require(x.dim() == g["d"] + 1, lambda: f"{op}: xs[{l}] must be (C_in, *spatial) with {g['d']} "
                                               f"spatial dims, got {tuple(x.shape)}")
    return [(W.shape[0], *[x.shape[1 + i] // g["stride"][i] for i in range(g["d"])])
            for W, x, g in zip(weights, xs, geo)]


def circular_power_step_(weights: List[torch.Tensor], xs: List[torch.Tensor], params: List[int], n_iter: int = 1):
    """``n_iter`` matrix-free batched per-frequency power steps of circular convs, in place on
    ``xs``; returns ``(estimates, x_tops, y_tops)``, the top-frequency pairs in fresh buffers
    (see ``csrc/specreg_fast.cpp``)."""
    op = "specreg_fast::circular_power_step_"
    weights, xs, params = list(weights), list(xs), params_arg(op, params)
    n_iter = iter_arg(op, "n_iter", n_iter)
    check_writable(op, "xs", xs)
    x_tops = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]
    y_tops = [x.new_empty(shape) for x, shape in zip(xs, circular_output_shapes(weights, xs, params))]
    est = typed_call(torch.ops.specreg_fast.circular_power_step_, (weights, xs, x_tops, y_tops, params, n_iter),
                     lambda *a: _check_circular_args(op, *a))
    return est, x_tops, y_tops
