"""specreg_fast: spectral regularization cheap enough to leave on.

Fast sigma_max estimates of every hidden layer of a model (dense weights and the exact
operator norm of convolutions), as torch custom ops with custom backwards, for the penalty
``gamma * sum_l sigma_max(W_l)^2`` of Yang, Zavatone-Veth & Pehlevan (arXiv 2405.17181).
"""
import torch as _torch

from . import bounds, conv, fft, layers, ops, reference
from .bounds import operator_norm_bounds
from .conv import ConvSpec, ConvState, conv_operator_norm, conv_operator_norms, init_conv_state
from .fft import CircularState, circular_conv_norms, init_circular_state, to_circular_padding
from .dense import PowerState, as_matrix, init_power_state, spectral_norm, spectral_norms
from .ops import HAS_CPP_EXT
from .penalty import SpectralNormalize, SpectralPenalty, spectral_constraint
from . import integrations  # attach/stats; the trainer callbacks import their framework only when imported

__version__ = "0.1.0"


def _has_kernel(op: str, key: str) -> bool:
    return _torch._C._dispatch_has_kernel_for_dispatch_key(f"specreg_fast::{op}", key)


#: True when the compiled library registered CUDA kernels (built with FORCE_CUDA=1 or on a GPU machine).
HAS_CUDA_EXT = HAS_CPP_EXT and _has_kernel("power_step_", "CUDA")
from .backends import register_triton_for_cuda as _register_triton  # noqa: E402

_register_triton()  # the Triton kernels as the CUDA kernels of the dense ops where the extension has none

__all__ = [
    "bounds",
    "operator_norm_bounds",
    "CircularState",
    "ConvSpec",
    "ConvState",
    "circular_conv_norms",
    "conv",
    "conv_operator_norm",
    "conv_operator_norms",
    "fft",
    "init_circular_state",
    "init_conv_state",
    "layers",
    "to_circular_padding",
    "HAS_CPP_EXT",
    "HAS_CUDA_EXT",
    "PowerState",
    "SpectralNormalize",
    "SpectralPenalty",
    "spectral_constraint",
    "as_matrix",
    "init_power_state",
    "integrations",
    "ops",
    "reference",
    "spectral_norm",
    "spectral_norms",
]
