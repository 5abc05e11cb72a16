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
``(x*, y*)`` (``specreg_fast::conv_sigma`` in circular mode), is that closed form.

Public API: :func:`init_circular_state`, :func:`circular_conv_norms`,
:func:`to_circular_padding`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from . import ops
from . import reference as ref
from .reference import ConvSpec

__all__ = ["CircularState", "init_circular_state", "circular_conv_norms", "circular_params", "to_circular_padding"]


@dataclass
class CircularState:
    """Persistent per-frequency vectors, one input-shaped tensor ``(C_in, *spatial)`` per
    layer (float32; float64 for float64 weights): its polyphase DFT holds the vector of every
    frequency."""

    xs: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.xs)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def init_circular_state(specs: Sequence[ConvSpec], generator: Optional[torch.Generator] = None) -> CircularState:
    xs = []
    for spec in specs:
        xs.append(torch.randn(tuple(spec.input_shape), dtype=_acc(spec.weight.dtype),
                              generator=generator).to(spec.weight.device))
    return CircularState(xs)


def _full_wrap(spec: ConvSpec) -> bool:
    """Whether the layer's own padding makes it the full wrap-around conv (output N/stride)."""
    k = spec.weight.shape[2:]
    for i, (n, s) in enumerate(zip(spec.input_shape[1:], spec.stride)):
        span = spec.dilation[i] * (k[i] - 1)
        if isinstance(spec.padding, str):
            total = span if spec.padding == "same" else 0
        else:
            total = 2 * spec.padding[i]
        if (n + total - span - 1) // s + 1 != n // s:
            return False
    return True


def _check_circular(spec: ConvSpec, name: str, assume_circular: bool) -> None:
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"{name}: expected a ConvSpec, got {type(spec).__name__}")
    if spec.transposed:
        raise ValueError(f"{name}: method='fft' supports ConvNd, not ConvTransposeNd")
    if not isinstance(spec.weight, torch.Tensor) or spec.weight.dtype not in (torch.float32, torch.float64,
                                                                              torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: weight must be a float32/float64/bfloat16/float16 tensor")
    d = spec.weight.dim() - 2
    if not 1 <= d <= 3 or len(spec.input_shape) != d + 1:
        raise ValueError(f"{name}: expected a 1-D to 3-D conv with input_shape (C_in, *spatial), got weight "
                         f"{tuple(spec.weight.shape)} and input_shape {tuple(spec.input_shape)}")
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
    """The conv-op packing (``ops.pack_conv_params``) of the full wrap-around conv of ``spec``:
    total padding ``dilation*(k-1)`` in circular mode. The layer's own padding only shifts the
    input circularly, which changes neither the singular values nor their gradient."""
    d = spec.weight.dim() - 2
    span = [spec.dilation[i] * (spec.weight.shape[2 + i] - 1) for i in range(d)]
    lo = [t // 2 for t in span]
    hi = [t - t // 2 for t in span]
    return [0, int(spec.groups), *map(int, spec.stride), *map(int, spec.dilation), *lo, *hi, *([0] * d)]


def _exact_norm(spec: ConvSpec) -> torch.Tensor:
    P = ref.circular_transfer_blocks(spec.weight, spec.input_shape[1:], spec.stride, spec.dilation, 0, spec.groups)
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
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    for l, spec in enumerate(specs):
        _check_circular(spec, names[l] if names is not None else f"specs[{l}]", assume_circular)
    if not specs:
        return torch.zeros(0)
    dt = torch.float64 if any(s.weight.dtype == torch.float64 for s in specs) else torch.float32
    if exact:
        return torch.stack([_exact_norm(ConvSpec(**{**s.__dict__, "weight": s.weight.to(_acc(s.weight.dtype))}))
                            .to(dt) for s in specs])
    if state is None or len(state) != len(specs):
        raise ValueError(f"state: expected a CircularState with {len(specs)} vectors, one per conv, got "
                         f"{'None' if state is None else len(state)}")
    for l, (spec, x) in enumerate(zip(specs, state.xs)):
        name = names[l] if names is not None else f"specs[{l}]"
        acc = _acc(spec.weight.dtype)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(spec.input_shape) or x.dtype != acc \
                or x.device != spec.weight.device or not x.is_contiguous():
            raise ValueError(f"{name}: state vector must be a contiguous {acc} tensor of the input shape "
                             f"{tuple(spec.input_shape)} on {spec.weight.device}, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    params: List[int] = []
    for spec in specs:
        params += circular_params(spec)
    weights = [s.weight for s in specs]
    _, x_tops, y_tops = ops.circular_power_step_([w.detach() for w in weights], state.xs, params,
                                                 n_iter if update else 0)
    return ops.conv_sigma(weights, x_tops, y_tops, params, ["circular"] * len(specs)).to(dt)


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
