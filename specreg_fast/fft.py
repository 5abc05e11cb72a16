"""The paper's conv norm (``method="fft"``): the exact operator norm of a conv with circular
(wrap-around) padding, from its Fourier-domain blocks (one complex
``C_out x (C_in * prod(stride))`` block ``P(w)`` per frequency of the polyphase DFT of the
input; see :func:`specreg_fast.reference.circular_transfer_blocks`): sigma = max_w
sigma_max(P(w)).

The default is the batched per-frequency power iteration of the paper's released code, run
matrix-free: the persistent vectors of all frequencies live in ONE input-shaped tensor per
layer (its polyphase DFT), and each step costs two convolutions plus FFTs of input- and
output-sized tensors, never an FFT of the kernel (``specreg_fast::circular_power_step_``,
csrc/cpu/circular_conv_cpu.cpp). ``exact=True`` takes the SVD of every block instead (small
layers, tests).

Gradient without autograd through the iterations or the FFT: sigma depends on the kernel
through the top block only, ``sigma = Re(u^H P(w*) v)`` with ``P(w*)`` linear in K, so
``d sigma / dK = Re(u^H dP(w*) v)``, a sum over the kernel taps. The step returns the real,
unit, input- and output-shaped pair ``(x*, y*)`` carrying frequency ``w*`` (and, for a real
kernel, its mirror ``-w*``, whose block is the complex conjugate: that is why the gradient is
a real part, and why each half carries weight 1/2 in the real pair); then
``<y*, A_circ(K) x*> = Re(u^H P(w*) v)`` and its weight-gradient, the conv weight-gradient of
``(x*, y*)`` (the backward of ``specreg_fast::conv_sigma_from_step`` in circular mode, whose
value is the step's estimate, so the forward runs no convolution), is that closed form.

Public API: :func:`init_circular_state`, :func:`circular_conv_norms`,
:func:`to_circular_padding`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import ops
from .contract import WEIGHT_DTYPES, acc_dtype, out_dtype
from .geometry import ConvSpec, conv_padding, output_size, same_padding

__all__ = ["CircularState", "init_circular_state", "circular_conv_norms", "circular_params", "to_circular_padding",
           "circular_blocks", "CircularBlockState", "init_circular_block_state", "circular_block_norms"]


@dataclass
class CircularState:
    """Persistent per-frequency vectors, one input-shaped tensor ``(C_in, *spatial)`` per
    layer (float32; float64 for float64 weights): its polyphase DFT holds the vector of every
    frequency."""

    xs: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.xs)


def init_circular_state(specs: Sequence[ConvSpec], generator: Optional[torch.Generator] = None) -> CircularState:
    xs = []
    for spec in specs:
        xs.append(torch.randn(tuple(spec.input_shape), dtype=acc_dtype(spec.weight.dtype),
                              generator=generator).to(spec.weight.device))
    return CircularState(xs)


def _full_wrap(spec: ConvSpec) -> bool:
    """Whether the layer's own padding makes it the full wrap-around conv (output N/stride)."""
    k = spec.weight.shape[2:]
    lo, hi = conv_padding(spec.padding, k, spec.dilation)
    return all(output_size(n, k[i], s, spec.dilation[i], lo[i], hi[i]) == n // s
               for i, (n, s) in enumerate(zip(spec.input_shape[1:], spec.stride)))


def _check_circular(spec: ConvSpec, name: str, assume_circular: bool) -> None:
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"{name}: expected a ConvSpec, got {type(spec).__name__}")
    if spec.transposed:
        raise ValueError(f"{name}: method='fft' supports ConvNd, not ConvTransposeNd")
    if not isinstance(spec.weight, torch.Tensor) or spec.weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name}: weight must be a float32/float64/bfloat16/float16 tensor")
    d = spec.weight.dim() - 2
    if not 1 <= d <= 3 or len(spec.input_shape) != d + 1:
        raise ValueError(f"{name}: expected a 1-D to 3-D conv with input_shape (C_in, *spatial), got weight "
                         f"{tuple(spec.weight.shape)} and input_shape {tuple(spec.input_shape)}")
    if 0 in tuple(spec.weight.shape) or 0 in tuple(spec.input_shape):
        # (no Fourier blocks to take the norm of; the FFT libraries reject empty transforms)
        raise ValueError(f"{name}: the circular norm needs a non-empty conv, got weight {tuple(spec.weight.shape)} "
                         f"and input_shape {tuple(spec.input_shape)}")
    if spec.input_shape[0] != spec.weight.shape[1] * spec.groups or spec.weight.shape[0] % spec.groups:
        raise ValueError(f"{name}: input_shape has {spec.input_shape[0]} channels; the weight "
                         f"{tuple(spec.weight.shape)} with groups={spec.groups} takes "
                         f"{spec.weight.shape[1] * spec.groups}")
    for i, (n, s) in enumerate(zip(spec.input_shape[1:], spec.stride)):
        if n % s != 0:
            raise ValueError(f"{name}: stride {s} must divide the input size {n} (spatial dim {i})")
        if spec.dilation[i] * (spec.weight.shape[2 + i] - 1) > 2 * n:
            raise ValueError(f"{name}: the kernel's extent {spec.dilation[i] * (spec.weight.shape[2 + i] - 1) + 1} "
                             f"wraps more than twice around the input size {n} (spatial dim {i})")
    if assume_circular:
        return
    if spec.padding_mode != "circular":
        raise ValueError(f"{name}: method='fft' computes the norm with circular padding but the layer uses "
                         f"padding_mode={spec.padding_mode!r}; convert the model with to_circular_padding() or "
                         f"pass assume_circular=True")
    if not _full_wrap(spec):
        raise ValueError(f"{name}: padding={spec.padding!r} does not give the full wrap-around output size "
                         f"(input size / stride), so the layer is not a circular conv; use padding "
                         f"dilation*(kernel-1)//2 or pass assume_circular=True for the norm of the full "
                         f"wrap-around conv")


def circular_params(spec: ConvSpec) -> List[int]:
    """The conv-op packing (``geometry.pack_conv_params``) of the full wrap-around conv of ``spec``:
    total padding ``dilation*(k-1)`` in circular mode. The layer's own padding only shifts the
    input circularly, which changes neither the singular values nor their gradient."""
    d = spec.weight.dim() - 2
    lo, hi = same_padding(spec.weight.shape[2:], spec.dilation)
    return [0, int(spec.groups), *map(int, spec.stride), *map(int, spec.dilation), *lo, *hi, *([0] * d)]


def _exact_norm(spec: ConvSpec) -> torch.Tensor:
    # the half-spectrum blocks: a real kernel's P(-w) is the conjugate of P(w), same norm
    P = circular_blocks(spec.weight, spec.input_shape[1:], spec.stride, spec.dilation, spec.groups)
    return torch.linalg.matrix_norm(P, ord=2).max()


def circular_conv_norms(specs: Sequence[ConvSpec], state: Optional[CircularState] = None, n_iter: int = 1, *,
                        update: bool = True, assume_circular: bool = False, exact: bool = False,
                        names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """sigma_max of each conv with wrap-around padding, differentiable in ``spec.weight``.

    Default: ``n_iter`` matrix-free batched per-frequency power steps on ``state`` (in place;
    ``update=False`` reads the estimate at the current vectors without moving them), one
    ``circular_power_step_`` call for all layers, then one ``conv_sigma`` call whose backward
    is the closed-form top-block gradient. The estimate ``max_w |P(w) v(w)|`` is a lower bound
    that reaches the exact norm as the vectors converge (persistent across training steps).
    ``exact=True``: the SVD of every Fourier block (autograd through it; no state needed).

    Raises ``ValueError`` for a layer that is not circular (unless ``assume_circular=True``,
    which computes the norm of the full wrap-around conv with the same kernel), a transposed
    conv, or a stride that does not divide the input size. Returns a 1-D float32 tensor
    (float64 if any weight is float64).
    """
    specs = list(specs)
    n_iter = ops.iter_arg("circular_conv_norms", "n_iter", n_iter)
    if not specs:
        return torch.zeros(0)
    dt = out_dtype([s.weight for s in specs])
    if exact:
        for l, spec in enumerate(specs):
            _check_circular(spec, names[l] if names is not None else f"specs[{l}]", assume_circular)
        return torch.stack([_exact_norm(ConvSpec(**{**s.__dict__, "weight": s.weight.to(acc_dtype(s.weight.dtype))}))
                            .to(dt) for s in specs])
    weights = [s.weight for s in specs]
    est, x_tops, y_tops, params = circular_power_pairs(specs, state, n_iter, update=update, names=names,
                                                       assume_circular=assume_circular)
    # est = <y*, A x*> exactly (see csrc/cpu/circular_conv_cpu.cpp): the value needs no conv
    return ops.conv_sigma_from_step(weights, x_tops, y_tops, params, ["circular"] * len(specs), est).to(dt)


def circular_power_pairs(specs: Sequence[ConvSpec], state: CircularState, n_iter: int = 1, *, update: bool = True,
                         names: Optional[Sequence[str]] = None, assume_circular: bool = False):
    """The step behind :func:`circular_conv_norms` without its differentiable half:
    ``(est, x_tops, y_tops, params)``, the detached estimates, the real unit pair of each
    layer's top frequency (``<y_top, A x_top> = est``; ``dest/dW`` is the circular conv
    weight-gradient of that pair, ``ops.conv_weight_grad`` with mode ``"circular"``) and the
    packed geometry. Same errors as :func:`circular_conv_norms`."""
    specs = list(specs)
    for l, spec in enumerate(specs):
        _check_circular(spec, names[l] if names is not None else f"specs[{l}]", assume_circular)
    if state is None or len(state) != len(specs):
        raise ValueError(f"state: expected a CircularState with {len(specs)} vectors, one per conv, got "
                         f"{'None' if state is None else len(state)}")
    for l, (spec, x) in enumerate(zip(specs, state.xs)):
        name = names[l] if names is not None else f"specs[{l}]"
        acc = acc_dtype(spec.weight.dtype)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(spec.input_shape) or x.dtype != acc \
                or x.device != spec.weight.device or not x.is_contiguous():
            raise ValueError(f"{name}: state vector must be a contiguous {acc} tensor of the input shape "
                             f"{tuple(spec.input_shape)} on {spec.weight.device}, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    ops.check_disjoint_state((f"{names[l] if names is not None else f'specs[{l}]'}: state vector", x)
                             for l, x in enumerate(state.xs))
    params: List[int] = []
    for spec in specs:
        params += circular_params(spec)
    est, x_tops, y_tops = ops.circular_power_step_([s.weight.detach() for s in specs], state.xs, params,
                                                   n_iter if update else 0)
    return est, x_tops, y_tops, params


# ----------------------------------------------------------------------------- explicit blocks
def _tup(v, d):
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * d


def circular_blocks(weight: torch.Tensor, input_size: Sequence[int], stride: Union[int, Sequence[int]] = 1,
                    dilation: Union[int, Sequence[int]] = 1, groups: int = 1, padding: Union[int, Sequence[int]] = 0,
                    freqs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Fourier blocks ``P(w)`` of the circular conv, for the half-spectrum of frequencies
    (last dim ``0 .. m_d // 2``, ``m = N / stride``: a real kernel's ``P(-w)`` is the
    conjugate of ``P(w)``, same singular values), as a ``(F * groups, C_out/groups,
    (C_in/groups) * prod(stride))`` complex stack, frequency-major then group.

    Built as a direct DFT over the k^d taps, not an FFT of the kernel zero-padded to the input
    size: ``P = E @ M`` with ``E[w, t] = exp(2 pi i <w, a_t> / m)`` (``dilation*t - padding =
    stride*a_t + r_t``) and ``M`` the taps placed in their phase ``r_t``: one (F x k^d) x
    (k^d x C_out C_in prod(s)) GEMM, differentiable in ``weight`` (measured faster than the
    FFT of the padded kernel on the ResNet-18 shapes: ``bench/bench_fft.py``). ``freqs``
    (flat indices into the half-spectrum grid) builds only those frequencies' blocks.
    Same blocks as :func:`specreg_fast.reference.circular_transfer_blocks` (a test checks).
    """
    d = weight.dim() - 2
    ks = tuple(weight.shape[2:])
    s, dil, pad = _tup(stride, d), _tup(dilation, d), _tup(padding, d)
    N = tuple(int(n) for n in input_size)
    if len(N) != d or any(N[i] % s[i] for i in range(d)):
        raise ValueError(f"input_size {N} must have {d} entries, each divisible by the stride {s}")
    if 0 in N or 0 in tuple(weight.shape):
        raise ValueError(f"the circular blocks need a non-empty conv, got weight {tuple(weight.shape)} and "
                         f"input_size {N}")
    m = [N[i] // s[i] for i in range(d)]
    half = m[:-1] + [m[-1] // 2 + 1]
    cout, cin_g = weight.shape[0], weight.shape[1]
    if cout % groups:
        raise ValueError(f"C_out={cout} is not divisible by groups={groups}")
    S = math.prod(s)
    real = acc_dtype(weight.dtype)
    dev = weight.device
    taps = list(itertools.product(*[range(k) for k in ks]))
    a = torch.empty(len(taps), d, dtype=torch.float64)
    R = torch.zeros(len(taps), S, dtype=real, device=dev)
    for j, t in enumerate(taps):
        r_flat = 0
        for i in range(d):
            off = dil[i] * t[i] - pad[i]
            a[j, i] = off // s[i]
            r_flat = r_flat * s[i] + (off - s[i] * (off // s[i]))
        R[j, r_flat] = 1
    grid = torch.stack(torch.meshgrid(*[torch.arange(h, dtype=torch.float64) for h in half], indexing="ij"),
                       -1).reshape(-1, d)
    if freqs is not None:
        grid = grid[freqs.cpu()]
    phase = (grid / torch.tensor(m, dtype=torch.float64)) @ a.t()  # (F, T), in turns
    phase = torch.remainder(phase, 1.0) * (2 * math.pi)  # reduced in float64 before the cast
    E = torch.polar(torch.ones_like(phase), phase).to(dev)
    K = weight.to(real).reshape(cout * cin_g, len(taps))
    M = (K.t()[:, :, None] * R[:, None, :]).reshape(len(taps), cout * cin_g * S)  # taps in their phase
    P = torch.complex(E.real.to(real) @ M, E.imag.to(real) @ M)
    return P.reshape(-1, groups, cout // groups, cin_g * S).reshape(-1, cout // groups, cin_g * S)


@dataclass
class CircularBlockState:
    """Persistent per-block vectors of the explicit-block iteration: ``us[l]`` (B, m) and
    ``vs[l]`` (B, n) complex, one row per (frequency, group) block of
    :func:`circular_blocks`."""

    us: List[torch.Tensor] = field(default_factory=list)
    vs: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.vs)


def _block_geometry(spec: ConvSpec):
    d = spec.weight.dim() - 2
    m = [spec.input_shape[1 + i] // spec.stride[i] for i in range(d)]
    F = math.prod(m[:-1]) * (m[-1] // 2 + 1)
    B = F * spec.groups
    rows = spec.weight.shape[0] // spec.groups
    cols = spec.weight.shape[1] * math.prod(spec.stride)
    return B, rows, cols


def init_circular_block_state(specs: Sequence[ConvSpec], generator: Optional[torch.Generator] = None
                              ) -> CircularBlockState:
    us, vs = [], []
    for spec in specs:
        B, rows, cols = _block_geometry(spec)
        cplx = torch.complex128 if spec.weight.dtype == torch.float64 else torch.complex64
        v = torch.randn(B, cols, dtype=cplx, generator=generator)
        vs.append((v / torch.linalg.vector_norm(v, dim=1, keepdim=True)).to(spec.weight.device))
        us.append(torch.zeros(B, rows, dtype=cplx, device=spec.weight.device))
    return CircularBlockState(us, vs)


def circular_block_norms(specs: Sequence[ConvSpec], state: CircularBlockState, n_iter: int = 1, *,
                         update: bool = True, assume_circular: bool = False,
                         names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The paper's released-code form of ``method="fft"``: explicit Fourier blocks
    (:func:`circular_blocks`) and ``n_iter`` batched power steps over all of them with
    persistent per-block vectors (``specreg_fast::batched_power_step_``: OpenMP C++ on CPU,
    the Triton kernel on CUDA). Same value as :func:`circular_conv_norms` from the same start;
    the matrix-free form is faster on CPU, this one keeps one vector per block and suits GPUs
    and small layers. Differentiable: sigma = |P(w*) v| with ``P(w*)`` rebuilt for the top
    block only (its gradient is the closed form ``Re(u^H dP(w*) v)``)."""
    specs = list(specs)
    n_iter = ops.iter_arg("circular_block_norms", "n_iter", n_iter)
    if len(state) != len(specs) or len(state.us) != len(specs):
        raise ValueError(f"state: expected {len(specs)} (u, v) pairs, one per conv, got {len(state)}")
    # every layer is checked before the first one's vectors move
    for l, spec in enumerate(specs):
        name = names[l] if names is not None else f"specs[{l}]"
        _check_circular(spec, name, assume_circular)
        B, rows, cols = _block_geometry(spec)
        u, v = state.us[l], state.vs[l]
        cplx = torch.complex128 if spec.weight.dtype == torch.float64 else torch.complex64
        if not (isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor)) or tuple(v.shape) != (B, cols) \
                or tuple(u.shape) != (B, rows) or v.dtype != cplx or u.dtype != cplx:
            raise ValueError(f"{name}: state u/v must be {cplx} tensors of shapes ({B}, {rows}) / ({B}, {cols}), got "
                             f"{getattr(u, 'dtype', type(u).__name__)} {tuple(getattr(u, 'shape', ()))} / "
                             f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
        if not (u.device == v.device == spec.weight.device and u.is_contiguous() and v.is_contiguous()):
            raise ValueError(f"{name}: state u/v must be contiguous and on {spec.weight.device}")
    ops.check_disjoint_state((f"{names[l] if names is not None else f'specs[{l}]'}: state {what}", vec)
                             for what, vecs in (("u", state.us), ("v", state.vs)) for l, vec in enumerate(vecs))
    out = []
    for l, spec in enumerate(specs):
        u, v = state.us[l], state.vs[l]
        w = spec.weight
        with torch.no_grad():
            P = circular_blocks(w.detach(), spec.input_shape[1:], spec.stride, spec.dilation, spec.groups)
            if update and n_iter > 0:
                sig = ops.batched_power_step_(P, u, v, n_iter)
            else:
                sig = torch.linalg.vector_norm(torch.einsum("bmn,bn->bm", P, v), dim=1)
            top = int(sig.argmax())
        f, g = divmod(top, spec.groups)
        Pf = circular_blocks(w, spec.input_shape[1:], spec.stride, spec.dilation, spec.groups,
                             freqs=torch.tensor([f]))[g]
        # a copy of v*: autograd saves it for the backward, and the next step rewrites v in place
        out.append(torch.linalg.vector_norm(Pf @ v[top].clone()))
    if not out:
        return torch.zeros(0)
    dt = out_dtype([s.weight for s in specs])
    return torch.stack([o.to(dt) for o in out])


def to_circular_padding(model: nn.Module) -> nn.Module:
    """Switch every ConvNd of ``model`` to ``padding_mode='circular'`` in place (as the
    paper's experiments do). This changes the model's function at the borders."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            m.padding_mode = "circular"
            if isinstance(m.padding, str):
                raise ValueError(f"{type(m).__name__} with padding={m.padding!r} cannot be switched to circular "
                                 f"padding; give a numeric padding")
            m._reversed_padding_repeated_twice = nn.modules.utils._reverse_repeat_tuple(m.padding, 2)
    return model
