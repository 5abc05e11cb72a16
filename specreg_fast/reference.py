"""Plain-PyTorch ground truth.

Written for clarity, not speed. The tests check every fast kernel against these functions
(and these functions against exact SVDs); the benchmarks use them as the baseline.

Dense:  :func:`power_iteration`, :func:`dense_sigma_exact`.
Low-rank (LoRA) maps ``W + s B A``: :func:`lowrank_power_iteration`, :func:`lowrank_sigma_exact`.
Conv:   :func:`conv_apply` / :func:`conv_adjoint`, :func:`conv_operator_matrix`,
        :func:`conv_power_iteration`, :func:`conv_sigma_exact`.
Circular (Fourier): :func:`circular_transfer_blocks`, :func:`circular_conv_sigma_exact`.

The geometry they take, :class:`specreg_fast.geometry.ConvSpec`, lives outside this module
(re-exported here) so that the fast code never imports its own ground truth.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .contract import acc_dtype
from .geometry import ConvSpec  # re-exported: the conv geometry the references take

__all__ = [
    "power_iteration",
    "dense_sigma_exact",
    "lowrank_matrix",
    "lowrank_power_iteration",
    "lowrank_sigma_exact",
    "ConvSpec",
    "conv_apply",
    "conv_adjoint",
    "conv_operator_matrix",
    "conv_power_iteration",
    "conv_sigma_exact",
    "circular_transfer_blocks",
    "circular_conv_sigma_exact",
]


# ----------------------------------------------------------------------------- dense
def _normalize(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    n = torch.linalg.vector_norm(x)
    return x / n, n


@torch.no_grad()
def power_iteration(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int = 1):
    """``n_iter`` steps of power iteration on a 2-D ``W``; returns ``(sigma, u, v)``.

    One step is ``u <- W v / |W v|`` then ``v <- W^T u / |W^T u|`` and the estimate is
    ``sigma = u^T W v`` at the new vectors: the same sequence every backend of
    ``specreg_fast::power_step_`` follows. Computed in float32 (float64 for float64 W).
    Inputs are not modified. A conv kernel reshaped to ``(out, -1)`` gives the norm of that
    *matrix*, not of the conv operator (see :func:`conv_power_iteration`).
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    acc = acc_dtype(W.dtype)
    Wf = W.to(acc)
    u = u.to(acc).clone()
    v = v.to(acc).clone()
    for _ in range(n_iter):
        u, _ = _normalize(Wf @ v)
        v, _ = _normalize(Wf.t() @ u)
    return u @ Wf @ v, u, v


def dense_sigma_exact(W: torch.Tensor) -> torch.Tensor:
    """Largest singular value of a 2-D matrix, by SVD in float64."""
    return torch.linalg.matrix_norm(W.detach().to(torch.float64), ord=2)


def lowrank_matrix(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, dtype=None) -> torch.Tensor:
    """The low-rank map ``W + s B A`` built explicitly (``W`` (m, n), ``B`` (m, r), ``A`` (r, n)),
    in ``dtype`` (default: float64 if any factor is float64, else float32)."""
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (W.dtype, A.dtype, B.dtype) else torch.float32
    return W.detach().to(dtype) + s * (B.detach().to(dtype) @ A.detach().to(dtype))


@torch.no_grad()
def lowrank_power_iteration(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, u: torch.Tensor,
                            v: torch.Tensor, n_iter: int = 1):
    """:func:`power_iteration` on the explicit matrix ``M = W + s B A`` (the sequence every
    backend of ``specreg_fast::lowrank_power_step_`` follows without building ``M``); returns
    ``(sigma, u, v)``, ``sigma = u^T M v`` at the new vectors. Computed in float32 (float64
    when any factor is float64). Inputs are not modified."""
    M = lowrank_matrix(W, A, B, s)
    u = u.to(M.dtype).clone()
    v = v.to(M.dtype).clone()
    for _ in range(n_iter):
        u, _ = _normalize(M @ v)
        v, _ = _normalize(M.t() @ u)
    return u @ M @ v, u, v


def lowrank_sigma_exact(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """Largest singular value of ``W + s B A``, by SVD in float64."""
    return torch.linalg.svdvals(lowrank_matrix(W, A, B, s, torch.float64))[0]


# ----------------------------------------------------------------------------- conv
def conv_apply(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    """The layer's map on a batch ``x`` of shape ``(B, *input_shape)``, weight ``spec.weight``."""
    m = spec._module()
    w = spec.weight.to(x.dtype)
    if spec.transposed:
        convt = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][spec.ndim - 1]
        return convt(x, w, None, spec.stride, spec.padding, spec.output_padding, spec.groups, spec.dilation)
    # _conv_forward applies the padding mode (circular/reflect/replicate) and 'same' exactly
    # as the nn module does.
    return m._conv_forward(x, w, None)


def conv_adjoint(spec: ConvSpec, y: torch.Tensor) -> torch.Tensor:
    """The adjoint map A^T on a batch of outputs ``y``.

    Closed forms where they exist (conv_transpose for a zero-padded conv with numeric
    padding, conv for a transposed conv); otherwise the vector-Jacobian product of the
    (linear) forward map, which is exact for any padding mode.
    """
    d = spec.ndim
    w = spec.weight.to(y.dtype)
    in_sp = spec.input_shape[1:]
    if spec.transposed:
        conv = [F.conv1d, F.conv2d, F.conv3d][d - 1]
        g = conv(y, w, None, spec.stride, spec.padding, spec.dilation, spec.groups)
        # output_padding >= stride (allowed when dilation > stride) gives the conv extra
        # positions that no input feeds: the adjoint crops them.
        return g[(slice(None), slice(None)) + tuple(slice(0, n) for n in in_sp)]
    if spec.padding_mode == "zeros" and not isinstance(spec.padding, str):
        out_sp = y.shape[2:]
        k = spec.weight.shape[2:]
        op = tuple(
            in_sp[i] - ((out_sp[i] - 1) * spec.stride[i] - 2 * spec.padding[i] + spec.dilation[i] * (k[i] - 1) + 1)
            for i in range(d))
        convt = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][d - 1]
        return convt(y, w, None, spec.stride, spec.padding, op, spec.groups, spec.dilation)
    x0 = torch.zeros((y.shape[0],) + tuple(spec.input_shape), dtype=y.dtype, device=y.device)
    _, vjp = torch.autograd.functional.vjp(lambda x: conv_apply(spec, x), x0, y)
    return vjp


def conv_operator_matrix(spec: ConvSpec, dtype=torch.float64) -> torch.Tensor:
    """The explicit matrix of the map (rows: flattened output, columns: flattened input),
    built by applying the layer to every basis vector. Only for small layers."""
    n = math.prod(spec.input_shape)
    eye = torch.eye(n, dtype=dtype, device=spec.weight.device).reshape((n,) + tuple(spec.input_shape))
    spec64 = ConvSpec(**{**spec.__dict__, "weight": spec.weight.detach().to(dtype)})
    with torch.no_grad():
        out = conv_apply(spec64, eye)
    return out.reshape(n, -1).t()


def conv_sigma_exact(spec: ConvSpec) -> torch.Tensor:
    """Exact operator norm: the largest singular value of :func:`conv_operator_matrix`."""
    return torch.linalg.svdvals(conv_operator_matrix(spec))[0]


@torch.no_grad()
def conv_power_iteration(spec: ConvSpec, x: torch.Tensor, n_iter: int = 1):
    """Power iteration on the true conv operator (the layer's own padding, stride, dilation,
    groups); ``x`` is the persistent input-shaped vector. Returns ``(sigma, y, x)`` with
    ``y = A x_old / |A x_old|``, ``x = A^T y / |A^T y|`` and ``sigma = <y, A x>``: the same
    step as the dense :func:`power_iteration` with u = y, v = x."""
    acc = acc_dtype(spec.weight.dtype)
    spec = ConvSpec(**{**spec.__dict__, "weight": spec.weight.detach().to(acc)})
    x = x.detach().to(acc).reshape((1,) + tuple(spec.input_shape)).clone()
    x = x / torch.linalg.vector_norm(x)
    y = conv_apply(spec, x)
    for _ in range(n_iter):
        y = conv_apply(spec, x)
        y = y / torch.linalg.vector_norm(y)
        x = conv_adjoint(spec, y)
        x = x / torch.linalg.vector_norm(x)
    sigma = (y * conv_apply(spec, x)).sum()
    return sigma, y[0], x[0]


# ----------------------------------------------------------------------------- circular / FFT
def circular_transfer_blocks(weight: torch.Tensor, input_size: Sequence[int], stride: Union[int, Sequence[int]] = 1,
                             dilation: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
                             groups: int = 1) -> torch.Tensor:
    """Fourier-domain blocks of a circular (wrap-around) conv.

    For a conv with kernel ``weight`` (``(C_out, C_in/groups, *k)``), stride ``s`` dividing
    each input size ``N``, the map on circularly padded inputs is block-diagonal in the
    polyphase-DFT basis (Sedghi, Gupta & Long 2019; strides by polyphase splitting): the
    input is split into its ``prod(s)`` phases of size ``N/s``, and for each of the
    ``prod(N/s)`` frequencies ``w`` the block is

        P(w)[o, (c, r)] = sum over taps t with phase r of K[o, c, t] * exp(2 pi i <w, a_t> / (N/s))

    where the tap's input offset ``dilation*t - padding = s*a_t + r``. The padding only
    shifts the phase, so it never changes singular values. The result has shape
    ``(*(N/s), groups, C_out/groups, (C_in/groups) * prod(s))`` (complex128 for float64
    weights, complex64 otherwise). Valid when the output size is ``N/s`` (full wrap-around),
    which is what circular padding with ``2p = d(k-1) + 1 - s`` gives.
    """
    d = weight.dim() - 2
    ks = tuple(weight.shape[2:])

    def tup(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (int(x),) * d

    s, dil, pad = tup(stride), tup(dilation), tup(padding)
    N = tuple(int(n) for n in input_size)
    if len(N) != d:
        raise ValueError(f"input_size must have {d} entries, got {N}")
    for i in range(d):
        if N[i] % s[i] != 0:
            raise ValueError(f"stride {s[i]} must divide the input size {N[i]} (dim {i})")
    n = tuple(N[i] // s[i] for i in range(d))
    cout, cin_g = weight.shape[0], weight.shape[1]
    if cout % groups != 0:
        raise ValueError(f"C_out={cout} is not divisible by groups={groups}")
    cout_g = cout // groups
    nphase = math.prod(s)
    cplx = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
    real = acc_dtype(weight.dtype)
    K = weight.to(real).reshape(groups, cout_g, cin_g, *ks)  # differentiable in weight
    # frequency grid, shape (*n, d)
    grids = torch.meshgrid(*[torch.arange(m, dtype=real, device=weight.device) for m in n], indexing="ij")
    P = torch.zeros(*n, groups, cout_g, cin_g, nphase, dtype=cplx, device=weight.device)
    for t in itertools.product(*[range(k) for k in ks]):
        offs = [dil[i] * t[i] - pad[i] for i in range(d)]
        a = [math.floor(offs[i] / s[i]) for i in range(d)]
        r = [offs[i] - s[i] * a[i] for i in range(d)]
        r_flat = 0
        for i in range(d):
            r_flat = r_flat * s[i] + r[i]
        phase = sum(grids[i] * (a[i] / n[i]) for i in range(d))
        e = torch.polar(torch.ones_like(phase), 2 * math.pi * phase)  # (*n)
        tap = K[(slice(None), slice(None), slice(None)) + tuple(t)]  # (groups, cout_g, cin_g)
        P[..., r_flat] += e.reshape(*n, 1, 1, 1) * tap.to(cplx)
    return P.reshape(*n, groups, cout_g, cin_g * nphase)


def circular_conv_sigma_exact(weight: torch.Tensor, input_size: Sequence[int], stride=1, dilation=1, padding=0,
                              groups: int = 1) -> torch.Tensor:
    """Exact operator norm of a circular conv: max over frequencies (and groups; a grouped
    conv is block-diagonal, so its norm is the max over groups, not the product) of the
    largest singular value of the transfer block."""
    P = circular_transfer_blocks(weight, input_size, stride, dilation, padding, groups)
    return torch.linalg.matrix_norm(P, ord=2).max()
