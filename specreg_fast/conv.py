"""Operator norms of convolutions (``method="operator"``): the true linear map x -> conv(x)
with the layer's own stride, padding, dilation, groups and padding mode, at the input size
the layer sees. ConvNd and ConvTransposeNd, 1-D to 3-D.

State per layer: the persistent input-shaped vector ``x`` and output-shaped ``y`` of the
power iteration. ``sigma = <y, A(W) x>`` is differentiable in W with gradient the conv
weight-gradient of (x, y); no autograd through the iterations.

The functions below are the package's public conv API, backed by the grouped custom ops
``specreg_fast::conv_power_step_`` / ``conv_sigma`` (csrc/cpu/conv_operator_cpu.cpp).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from . import ops
from .contract import WEIGHT_DTYPES, acc_dtype
from .geometry import ConvSpec, conv_apply, conv_output_shape, decode_conv_params, output_size, pack_conv_params

__all__ = ["ConvSpec", "ConvState", "init_conv_state", "conv_operator_norms", "conv_operator_norm", "set_conv_kernel",
           "validate_state", "step_sigmas"]


@dataclass
class ConvState:
    """Persistent power-iteration vectors of each conv layer: ``xs[l]`` input-shaped
    ``(C_in, *spatial)``, ``ys[l]`` output-shaped; float32 (float64 for float64 weights)."""

    xs: List[torch.Tensor] = field(default_factory=list)
    ys: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.xs)


def init_conv_state(specs: Sequence[ConvSpec], generator: Optional[torch.Generator] = None) -> ConvState:
    """Random unit input vectors and the matching normalized outputs."""
    xs, ys = [], []
    for spec in specs:
        acc = acc_dtype(spec.weight.dtype)
        x = torch.randn(tuple(spec.input_shape), dtype=acc, generator=generator).to(spec.weight.device)
        x = x / torch.linalg.vector_norm(x)
        params, modes = pack_conv_params([spec])
        g = decode_conv_params("init_conv_state", [spec.weight], params, modes)[0]
        # a geometry ATen's conv rejects is a ValueError naming it, not ATen's RuntimeError
        conv_output_shape("init_conv_state", len(xs), g, spec.weight, tuple(spec.input_shape))
        with torch.no_grad():
            y = conv_apply(g, spec.weight.detach().to(acc), x[None])[0]
        y = y / torch.linalg.vector_norm(y).clamp_min(torch.finfo(acc).tiny)
        xs.append(x)
        ys.append(y)
    return ConvState(xs, ys)


def validate_state(specs: Sequence[ConvSpec], state: ConvState, names=None) -> None:
    """The checks of :func:`conv_operator_norms` on its specs and state (errors name the
    layer, ``names[l]``, else ``specs[l]``): the geometry, and one contiguous ``x``/``y`` of
    the input/output shape, accumulation dtype and device per layer, not sharing memory."""
    if len(state.xs) != len(specs) or len(state.ys) != len(specs):
        raise ValueError(f"state: expected {len(specs)} (x, y) pairs, one per conv, got {len(state.xs)} x and "
                         f"{len(state.ys)} y")
    for l, spec in enumerate(specs):
        name = names[l] if names is not None else f"specs[{l}]"
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"{name}: expected a ConvSpec, got {type(spec).__name__}")
        if not isinstance(spec.weight, torch.Tensor) or spec.weight.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"{name}: weight must be a float32/float64/bfloat16/float16 tensor, got "
                            f"{getattr(spec.weight, 'dtype', type(spec.weight).__name__)}")
        if spec.padding_mode not in ("zeros", "circular", "reflect", "replicate"):
            raise ValueError(f"{name}: padding_mode must be zeros/circular/reflect/replicate, got "
                             f"{spec.padding_mode!r}")
        acc = acc_dtype(spec.weight.dtype)
        x, y = state.xs[l], state.ys[l]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{name}: state x/y must be tensors")
        if tuple(x.shape) != tuple(spec.input_shape):
            raise ValueError(f"{name}: state x must have the input shape {tuple(spec.input_shape)}, got "
                             f"{tuple(x.shape)}")
        if x.dtype != acc or y.dtype != acc:
            raise ValueError(f"{name}: state x/y must be {acc} for a {spec.weight.dtype} weight, got {x.dtype}/{y.dtype}")
        if x.device != spec.weight.device or y.device != spec.weight.device:
            raise ValueError(f"{name}: state x/y must be on {spec.weight.device}")
        if not (x.is_contiguous() and y.is_contiguous()):
            raise ValueError(f"{name}: state x/y must be contiguous")
        out_shape = _output_shape(spec, name)
        if tuple(y.shape) != out_shape:
            raise ValueError(f"{name}: state y must have the output shape {out_shape}, got {tuple(y.shape)}")
    ops.check_disjoint_state((f"{names[l] if names is not None else f'specs[{l}]'}: state {what}", vec)
                             for what, vecs in (("x", state.xs), ("y", state.ys)) for l, vec in enumerate(vecs))


def _output_shape(spec: ConvSpec, name: str):
    """The layer's output shape for one sample, from the conv arithmetic (plain ints, so it
    traces under torch.compile), checking the geometry on the way: channels vs groups, kernel
    vs padded input size, the padding-mode limits and output_padding."""
    w = spec.weight
    d = w.dim() - 2
    if not 1 <= d <= 3:
        raise ValueError(f"{name}: weight must be 3-D to 5-D (a 1-D to 3-D conv), got shape {tuple(w.shape)}")
    n = tuple(spec.input_shape)
    if len(n) != d + 1:
        raise ValueError(f"{name}: input_shape must be (C_in, *spatial) with {d} spatial dims, got {n}")
    g = int(spec.groups)
    cin = w.shape[0] if spec.transposed else w.shape[1] * g
    cout = w.shape[1] * g if spec.transposed else w.shape[0]
    if g < 1 or cin % g or cout % g:
        raise ValueError(f"{name}: channels ({cin}, {cout}) must be divisible by groups={g}")
    if n[0] != cin:
        raise ValueError(f"{name}: input_shape has {n[0]} channels, the weight takes {cin}")
    for name_, t in (("stride", spec.stride), ("dilation", spec.dilation)):
        if len(t) != d or any(v < 1 for v in t):
            raise ValueError(f"{name}: {name_} must be {d} positive ints, got {t}")
    try:
        params, _ = pack_conv_params([spec])
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    lo, hi = params[2 + 2 * d:2 + 3 * d], params[2 + 3 * d:2 + 4 * d]
    op = params[2 + 4 * d:2 + 5 * d]
    if spec.transposed and (spec.padding_mode != "zeros" or isinstance(spec.padding, str)):
        raise ValueError(f"{name}: a transposed conv takes numeric zero padding only")
    out = [cout]
    for i in range(d):
        k, s, dl = w.shape[2 + i], spec.stride[i], spec.dilation[i]
        if lo[i] < 0 or hi[i] < 0 or op[i] < 0:
            raise ValueError(f"{name}: padding/output_padding must be >= 0")
        if spec.padding_mode == "reflect" and max(lo[i], hi[i]) >= n[1 + i]:
            raise ValueError(f"{name}: reflect padding {max(lo[i], hi[i])} must be < the input size {n[1 + i]}")
        if spec.padding_mode == "circular" and max(lo[i], hi[i]) > n[1 + i]:
            raise ValueError(f"{name}: circular padding {max(lo[i], hi[i])} must be <= the input size {n[1 + i]}")
        if spec.transposed and op[i] >= max(s, dl):
            raise ValueError(f"{name}: output_padding {op[i]} must be < stride or dilation")
        o = output_size(n[1 + i], k, s, dl, lo[i], hi[i], op[i], spec.transposed)
        if o < 1:
            raise ValueError(f"{name}: input size {n[1 + i]} (dim {i}) too small for the kernel")
        out.append(o)
    return tuple(out)


def conv_operator_norms(specs: Sequence[ConvSpec], state: ConvState, n_iter: int = 1, tol: Optional[float] = None,
                        max_iter: Optional[int] = None, *, update: bool = True,
                        names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """sigma_max estimates of the conv operators ``specs`` (differentiable in each
    ``spec.weight``), after ``n_iter`` power steps (or until a relative change ``tol``,
    at most ``max_iter`` steps; both counts at most ``specreg_fast.ops.MAX_ITER``, and Ctrl-C
    stops the loop) that update ``state`` in place. Returns a 1-D float32
    tensor (float64 if any weight is float64).

    All layers go through one ``specreg_fast::conv_power_step_`` call (the loop runs in
    C++), then one ``specreg_fast::conv_sigma`` call whose backward is the conv
    weight-gradient of (x, y): no autograd graph through the iterations. Weights may be
    float32/float64/bfloat16/float16; the vectors are float32 (float64 for float64 weights)
    and low-precision weights are upcast to float32 inside the op.
    """
    specs = list(specs)
    n_iter = ops.iter_arg("conv_operator_norms", "n_iter", n_iter)
    if tol is not None:
        tol = ops.tol_arg("conv_operator_norms", tol, finite=True)
    if max_iter is not None:
        max_iter = ops.iter_arg("conv_operator_norms", "max_iter", max_iter, minimum=1)
    validate_state(specs, state, names)
    if not specs:
        return torch.zeros(0)
    steps = n_iter if tol is None else (max_iter or 100)
    params, modes = pack_conv_params(specs)
    return step_sigmas([s.weight for s in specs], state, params, modes, steps, update, 0.0 if tol is None else tol)


def step_sigmas(weights: List[torch.Tensor], state: ConvState, params: List[int], modes: List[str], n_iter: int,
                update: bool, tol: float = 0.0, from_step=ops.conv_sigma_from_step) -> torch.Tensor:
    """The body of :func:`conv_operator_norms` on arguments checked by :func:`validate_state`
    and packed by :func:`geometry.pack_conv_params`: ``n_iter`` power steps (``update``), then the
    sigmas; ``from_step(weights, xs, ys, params, modes, est)`` makes them from the step's
    estimates."""
    if update and n_iter > 0:
        est = ops.conv_power_step_([w.detach() for w in weights], state.xs, state.ys, params, modes, n_iter,
                                   float(tol))
        # the step's estimate is <y, A x> at the new vectors: no convolution for the value
        return from_step(weights, state.xs, state.ys, params, modes, est)
    return ops.conv_sigma(weights, state.xs, state.ys, params, modes)


def conv_operator_norm(module: nn.Module, input_shape: Sequence[int], tol: float = 1e-6, max_iter: int = 2000,
                       seed: int = 0, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stateless operator norm of one conv module at ``input_shape`` (``(C_in, *spatial)``),
    to a relative change ``tol`` in at most ``max_iter <= specreg_fast.ops.MAX_ITER`` steps;
    ``weight`` replaces the module's (as in ``ConvSpec.from_module``)."""
    spec = ConvSpec.from_module(module, input_shape, weight)
    st = init_conv_state([spec], generator=torch.Generator().manual_seed(seed))
    return conv_operator_norms([spec], st, tol=tol, max_iter=max_iter)[0]


def set_conv_kernel(choice: str) -> str:
    """Pick the CPU conv kernel of the conv ops for every later call: ``"direct"`` (the im2col
    kernels of csrc/cpu/conv_gemm_cpu.cpp), ``"aten"`` (oneDNN) or ``"auto"`` (by size, the
    default). The environment variable ``SPECREG_FAST_CONV_KERNEL`` sets the initial choice
    and is read once, at the first conv call; this replaces it. Returns the previous choice
    (``"invalid"`` for a bad environment value). Transposed convs take the ATen path always;
    without the compiled extension there is one path and this only checks ``choice``. The
    direct kernels' register tiles are picked for the CPU (AVX-512, AVX2 + FMA or portable);
    ``SPECREG_FAST_CONV_ISA`` (``avx2`` or ``generic``, read once) caps them."""
    if not isinstance(choice, str):
        raise TypeError(f"the conv kernel must be a str ('auto', 'direct' or 'aten'), got {type(choice).__name__}")
    if choice not in ("auto", "direct", "aten"):  # the op's own check, typed (it raises RuntimeError)
        raise ValueError(f"the conv kernel must be 'auto', 'direct' or 'aten', got {choice!r}")
    if ops.HAS_CONV_EXT:
        return torch.ops.specreg_fast.set_conv_kernel(choice)  # specreg_fast._C (csrc/cpu/conv_gemm_cpu.cpp)
    return "auto"
