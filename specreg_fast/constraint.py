"""Constraint mode: a weight divided by its spectral norm (a parametrization), the
alternative to adding the penalty to the loss."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from . import dense as _dense
from .conv import ConvSpec, ConvState, conv_operator_norms, init_conv_state
from .layers import CONV_TYPES

__all__ = ["SpectralNormalize", "spectral_constraint"]


class SpectralNormalize(nn.Module):
    """Parametrization ``W -> W / sigma(W)`` with the fast ops: a drop-in for
    ``torch.nn.utils.parametrizations.spectral_norm`` that, for convs, divides by the true
    operator norm at ``input_shape`` instead of the reshaped-kernel matrix norm.

    sigma is clamped at ``sqrt(finfo.tiny)`` of its dtype (1.1e-19 in float32): a zero weight
    (sigma 0) maps to zero instead of 0/0 = NaN, with a finite gradient ``1/floor`` times the
    incoming one (float32/float64/bfloat16 weights; a float16 gradient cannot hold it); a
    low-precision weight is divided in sigma's dtype, where that floor exists."""

    def __init__(self, module: nn.Module, input_shape: Optional[Sequence[int]] = None, n_iter: int = 1,
                 n_iter_init: int = 15, seed: int = 0):
        super().__init__()
        self.n_iter = n_iter
        w = module.weight.detach()
        g = torch.Generator().manual_seed(seed)
        self.is_conv = isinstance(module, CONV_TYPES)
        if self.is_conv:
            if input_shape is None:
                raise ValueError(f"input_shape (C_in, *spatial) is required for a {type(module).__name__}")
            self._spec_args = ConvSpec.from_module(module, input_shape)
            st = init_conv_state([self._spec_args], generator=g)
            self.register_buffer("x", st.xs[0])
            self.register_buffer("y", st.ys[0])
            conv_operator_norms([self._spec_args], st, n_iter=n_iter_init)
        else:
            st = _dense.init_power_state([_dense.as_matrix(w)], generator=g)
            self.register_buffer("u", st.us[0])
            self.register_buffer("v", st.vs[0])
            _dense.spectral_norms([_dense.as_matrix(w)], st, n_iter=n_iter_init)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        upd = self.training
        if self.is_conv:
            spec = ConvSpec(**{**self._spec_args.__dict__, "weight": W})
            s = conv_operator_norms([spec], ConvState([self.x], [self.y]), n_iter=self.n_iter, update=upd)[0]
        else:
            s = _dense.spectral_norms([_dense.as_matrix(W)], _dense.PowerState([self.u], [self.v]),
                                      n_iter=self.n_iter, update=upd)[0]
        s = s.clamp_min(torch.finfo(s.dtype).tiny ** 0.5)
        return W / s if W.dtype == s.dtype else (W.to(s.dtype) / s).to(W.dtype)


def spectral_constraint(module: nn.Module, input_shape: Optional[Sequence[int]] = None, n_iter: int = 1,
                        seed: int = 0) -> nn.Module:
    """Constrain ``module.weight`` to unit spectral norm (operator norm for convs, at
    ``input_shape``) by a parametrization; returns the module."""
    from torch.nn.utils import parametrize

    if not isinstance(module, (nn.Linear,) + CONV_TYPES):
        raise TypeError(f"spectral_constraint supports Linear and (transposed) convs, got {type(module).__name__}")
    parametrize.register_parametrization(module, "weight", SpectralNormalize(module, input_shape, n_iter, seed=seed))
    return module
