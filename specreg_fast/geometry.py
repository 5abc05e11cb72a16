"""Conv layer geometry: a conv layer seen as a linear map at one input size.

Everything the package knows about a conv's geometry, in one place: :class:`ConvSpec` (the
layer at one input size), the packing of the conv ops' ``int[] params`` and its decoding
(:func:`pack_conv_params`, :func:`decode_conv_params`, :func:`pack_geometry`), output sizes
(:func:`output_size`, :func:`conv_output_shape`), padding splits (:func:`conv_padding`,
:func:`same_padding`), and the map and its adjoint in plain PyTorch on decoded geometry
(:func:`conv_apply`, :func:`conv_adjoint`: the reference kernels of the conv ops, the initial
conv state and the sharded penalty compute with them).

A neutral module: the fast paths (``conv.py``, ``fft.py``, ``bounds.py``), the ops, the
penalty and the plain references in ``reference.py`` all take its geometry; keeping it here
keeps ``reference.py`` a leaf that only checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .contract import require

__all__ = ["ConvSpec", "same_padding", "conv_padding", "output_size", "pack_conv_params", "decode_conv_params",
           "pack_geometry", "conv_output_shape", "conv_apply", "conv_adjoint"]


@dataclass
class ConvSpec:
    """A conv layer seen as the linear map x -> conv(x) (no bias) at one input size.

    ``input_shape`` is ``(C_in, *spatial)`` for one sample. ``transposed`` selects
    ConvTranspose semantics (weight shape ``(C_in, C_out/groups, *k)``).
    """

    weight: torch.Tensor
    input_shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Union[str, Tuple[int, ...]]
    dilation: Tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: Tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2

    @classmethod
    def from_module(cls, m: nn.Module, input_shape: Sequence[int], weight: Optional[torch.Tensor] = None):
        if not isinstance(m, nn.modules.conv._ConvNd):
            raise TypeError(f"expected a torch.nn ConvNd/ConvTransposeNd module, got {type(m).__name__}")
        w = m.weight if weight is None else weight
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != w.dim() - 1:
            raise ValueError(
                f"input_shape must be (C_in, *spatial) with {w.dim() - 2} spatial dims, got {input_shape}")
        return cls(weight=w, input_shape=input_shape, stride=tuple(m.stride), padding=m.padding
                   if isinstance(m.padding, str) else tuple(m.padding), dilation=tuple(m.dilation),
                   groups=m.groups, padding_mode=m.padding_mode, transposed=m.transposed,
                   output_padding=tuple(m.output_padding))

    def _module(self) -> nn.Module:
        d = self.ndim
        k = tuple(self.weight.shape[2:])
        if self.transposed:
            cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][d - 1]
            cin, cout = self.weight.shape[0], self.weight.shape[1] * self.groups
            return cls(cin, cout, k, stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                       groups=self.groups, bias=False, dilation=self.dilation, padding_mode=self.padding_mode,
                       device="meta")
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][d - 1]
        cout, cin = self.weight.shape[0], self.weight.shape[1] * self.groups
        return cls(cin, cout, k, stride=self.stride, padding=self.padding, dilation=self.dilation,
                   groups=self.groups, bias=False, padding_mode=self.padding_mode, device="meta")


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(lo, hi)`` of ``padding="same"``: the total ``dilation * (kernel - 1)`` per spatial dim,
    the odd unit on the high side (as PyTorch pads)."""
    total = [dl * (k - 1) for k, dl in zip(kernel, dilation)]
    return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)


def conv_padding(padding, kernel: Sequence[int], dilation: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(lo, hi)`` per spatial dim of a conv layer's ``padding``: ``"valid"``, ``"same"``
    (:func:`same_padding`) or one int per dim (both sides)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * len(kernel), (0,) * len(kernel)
        if padding == "same":
            return same_padding(kernel, dilation)
        raise ValueError(f"padding must be 'same', 'valid' or a tuple, got {padding!r}")
    lo = tuple(int(p) for p in padding)
    return lo, lo


def output_size(n: int, k: int, stride: int, dilation: int, lo: int, hi: int, output_padding: int = 0,
                transposed: bool = False) -> int:
    """The output size along one spatial dim, for input size ``n`` and kernel size ``k``: floor
    division for a conv (< 1 when the kernel does not fit the padded input)."""
    if transposed:
        return (n - 1) * stride - lo - hi + dilation * (k - 1) + output_padding + 1
    return (n + lo + hi - dilation * (k - 1) - 1) // stride + 1


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
        lo, hi = conv_padding(spec.padding, tuple(spec.weight.shape[2:]), spec.dilation)
        op = tuple(spec.output_padding) if spec.transposed and spec.output_padding else (0,) * d
        params += [int(bool(spec.transposed)), int(spec.groups), *map(int, spec.stride), *map(int, spec.dilation), *lo,
                   *hi, *map(int, op)]
        modes.append(str(spec.padding_mode))
    return params, modes


_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _checked(op: str, l: int, what: str, a: int, b: int, sign: str) -> int:
    """a * b or a + b of packed params and sizes, a ValueError where the int64 result of the
    kernels would wrap (checked_mul/checked_add of csrc/conv_geometry.h, same message)."""
    r = a * b if sign == "*" else a + b
    if not (type(a) is int and type(b) is int):  # symbolic sizes (fakes under dynamic shapes): no guard
        return r
    require(_INT64_MIN <= r <= _INT64_MAX, lambda: f"{op}: layer {l}: {what} ({a} {sign} {b}) overflows int64")
    return r


def decode_conv_params(op: str, weights, params, modes) -> List[dict]:
    """Decode ``params``/``modes`` per layer, with the checks of ``decode`` in
    csrc/conv_geometry.h (the conv and circular families' shared first step)."""
    require(len(modes) == len(weights),
            lambda: f"{op}: padding_modes must have one entry per layer ({len(weights)}), got {len(modes)}")
    out, off = [], 0
    for l, (W, mode) in enumerate(zip(weights, modes)):
        d = W.dim() - 2
        require(1 <= d <= 3, lambda: f"{op}: weights[{l}] must be 3-D to 5-D (a 1-D to 3-D conv), got "
                                     f"shape {tuple(W.shape)}")
        need = 2 + 5 * d
        require(off + need <= len(params), lambda: f"{op}: params too short for layer {l} (need {need} "
                                                   f"entries from offset {off}, have {len(params)})")
        p = list(params[off:off + need])
        off += need
        g = dict(transposed=p[0] != 0, groups=p[1], stride=p[2:2 + d], dilation=p[2 + d:2 + 2 * d],
                 lo=p[2 + 2 * d:2 + 3 * d], hi=p[2 + 3 * d:2 + 4 * d], output_padding=p[2 + 4 * d:2 + 5 * d],
                 mode=mode, d=d)
        require(g["groups"] >= 1, lambda: f"{op}: layer {l}: groups must be >= 1, got {g['groups']}")
        require(all(v >= 1 for v in g["stride"] + g["dilation"]),
                lambda: f"{op}: layer {l}: stride and dilation must be >= 1")
        require(all(v >= 0 for v in g["lo"] + g["hi"] + g["output_padding"]),
                lambda: f"{op}: layer {l}: padding and output_padding must be >= 0")
        _checked(op, l, "groups * weight.size(1)", g["groups"], W.shape[1], "*")
        for i in range(d):
            k = W.shape[2 + i]
            require(k >= 1, lambda: f"{op}: weights[{l}] has kernel size 0 in spatial dim {i}: {list(W.shape)}")
            _checked(op, l, "dilation * (kernel_size - 1)", g["dilation"][i], k - 1, "*")
            _checked(op, l, "padding_lo + padding_hi", g["lo"][i], g["hi"][i], "+")
        require(mode in ("zeros", "circular", "reflect", "replicate"),
                lambda: f"{op}: layer {l}: padding mode must be zeros/circular/reflect/replicate, got "
                        f"{mode!r}")
        if g["transposed"]:
            require(mode == "zeros" and g["lo"] == g["hi"],
                    lambda: f"{op}: layer {l}: a transposed conv takes symmetric zero padding only")
        else:
            require(all(v == 0 for v in g["output_padding"]),
                    lambda: f"{op}: layer {l}: output_padding must be 0 for a conv")
        out.append(g)
    require(off == len(params), lambda: f"{op}: params has {len(params)} entries, the layers use {off}")
    return out


def pack_geometry(g: dict) -> "tuple[List[int], List[str]]":
    """One layer's decoded geometry (an entry of :func:`decode_conv_params`) packed back into
    ``(params, padding_modes)`` for the conv ops."""
    return ([int(g["transposed"]), int(g["groups"]), *g["stride"], *g["dilation"], *g["lo"], *g["hi"],
             *g["output_padding"]], [g["mode"]])


def conv_output_shape(op: str, l: int, g: dict, W, in_shape) -> list:
    """The layer's output shape ``(C_out, *spatial)`` for an input ``(C_in, *spatial)``, with
    floor division (a kernel larger than the padded input is an error, not an output of 1)."""
    out = [W.shape[1] * g["groups"] if g["transposed"] else W.shape[0]]
    for i in range(g["d"]):
        s, dl = g["stride"][i], g["dilation"][i]
        n, lo, hi = in_shape[1 + i], g["lo"][i], g["hi"][i]
        e = dl * (W.shape[2 + i] - 1) + 1
        shape = list(in_shape)
        # the sums of output_shape in csrc/conv_geometry.h, overflow-checked alike, same messages
        if g["transposed"]:
            what = "the transposed conv's output size"
            o = _checked(op, l, "(input size - 1) * stride", n - 1, s, "*")
            o = _checked(op, l, what, o, e, "+")
            o = _checked(op, l, what, o, g["output_padding"][i], "+")
            o = _checked(op, l, what, o, -(lo + hi), "+")
            require(o >= 1, lambda: f"{op}: layer {l}: input {shape} too small for the kernel: the transposed conv's "
                                    f"output size in spatial dim {i} would be {o}")
        else:
            padded = _checked(op, l, "input size + padding", n, lo + hi, "+")
            require(padded >= e, lambda: f"{op}: layer {l}: input {shape} too small for the kernel: spatial dim {i} "
                                         f"is {padded} with padding, the dilated kernel spans dilation * "
                                         f"(kernel_size - 1) + 1 = {e}")
            o = (padded - e) // s + 1
        entries = (s, dl, g["lo"][i], g["hi"][i], g["output_padding"][i])
        require(max(entries) < 2 ** 31, lambda: f"{op}: layer {l}: stride, dilation, padding and output_padding "
                                                f"must be at most 2^31 - 1 (ATen's convolutions take int32), got "
                                                f"{entries} in spatial dim {i}")
        out.append(o)
    return out


# ----------------------------------------------------------------------------- the map in plain PyTorch
def _pad_vec(g):
    v = []
    for i in reversed(range(g["d"])):
        v += [g["lo"][i], g["hi"][i]]
    return v


def _explicit(g):
    return not g["transposed"] and (g["mode"] != "zeros" or g["lo"] != g["hi"])


def padded_input(g, x):
    """(input handed to aten.convolution, its padding) for a batched x."""
    if _explicit(g):
        mode = "constant" if g["mode"] == "zeros" else g["mode"]
        return torch.nn.functional.pad(x, _pad_vec(g), mode=mode), [0] * g["d"]
    return x, list(g["lo"])


def conv_apply(g, W, x):
    """The layer's map on a batch ``x`` ``(B, C_in, *spatial)``, for decoded geometry ``g`` (an
    entry of :func:`decode_conv_params`) and weight ``W`` in ``x``'s dtype: one
    ``aten.convolution``, after an explicit pad where aten cannot pad (padding modes other
    than zeros, asymmetric padding)."""
    xp, pad = padded_input(g, x)
    return torch.ops.aten.convolution(xp, W, None, g["stride"], pad, g["dilation"], g["transposed"],
                                      g["output_padding"], g["groups"])


def _pad_source(n, lo, hi, mode, device):
    """For each of the ``lo + n + hi`` positions of one padded dim, the input index it copies
    (``F.pad``'s circular, reflect or replicate rule)."""
    p = torch.arange(-lo, n + hi, device=device)
    if mode == "circular":
        return p.remainder(n)
    if mode == "replicate":
        return p.clamp(0, n - 1)
    period = max(2 * (n - 1), 1)  # reflect: the edge is not repeated
    q = p.remainder(period)
    return torch.where(q < n, q, period - q)


def _pad_adjoint(g, gp):
    """The adjoint of :func:`padded_input`'s explicit pad on a batch ``gp`` of padded inputs: per
    dim, a crop (zeros) or the sum of every padded position into the input entry it copies."""
    out = gp
    for i in range(g["d"]):
        dim, lo, hi = 2 + i, g["lo"][i], g["hi"][i]
        n = out.shape[dim] - lo - hi
        if g["mode"] == "zeros":
            out = out.narrow(dim, lo, n) if lo >= 0 and hi >= 0 else torch.nn.functional.pad(
                out.narrow(dim, max(lo, 0), out.shape[dim] - max(lo, 0) - max(hi, 0)),
                [0, 0] * (out.dim() - 1 - dim) + [max(-lo, 0), max(-hi, 0)])
            continue
        shape = list(out.shape)
        shape[dim] = n
        out = out.new_zeros(shape).index_add_(dim, _pad_source(n, lo, hi, g["mode"], out.device), out)
    return out


def conv_adjoint(g, W, y, x_like):
    """The adjoint map on a batch of outputs ``y``, for inputs shaped like ``x_like``: aten's
    input-gradient of the convolution (``convolution_backward``), then the adjoint of the
    explicit pad, exact for every padding mode. No autograd graph: the reference kernels run
    below the Autograd key (under a dispatch mode such as opcheck's SchemaCheckMode no graph is
    recorded there, so an autograd.grad of conv_apply would fail)."""
    xp, pad = padded_input(g, x_like)
    gp = torch.ops.aten.convolution_backward(y.to(W.dtype), xp.to(W.dtype), W.detach(), None, g["stride"], pad,
                                             g["dilation"], g["transposed"], g["output_padding"], g["groups"],
                                             [True, False, False])[0]
    return _pad_adjoint(g, gp) if _explicit(g) else gp
