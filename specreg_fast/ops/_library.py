"""Loading the compiled library, and the op schemas it declares (defined here when it cannot be
loaded, so that the plain-PyTorch reference kernels still run: ``HAS_CPP_EXT = False``)."""
from __future__ import annotations

import warnings

import torch

# Kept identical to csrc/specreg_fast.cpp (a test compares them): used only when the
# compiled library is missing.
SCHEMAS = {
    "power_step_": "power_step_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol) -> Tensor",
    "sigma": "sigma(Tensor[] weights, Tensor[] us, Tensor[] vs) -> Tensor",
    "sigma_from_step": "sigma_from_step(Tensor[] weights, Tensor[] us, Tensor[] vs, Tensor est) -> Tensor",
    "conv_power_step_": "conv_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] ys, int[] params, "
                        "str[] padding_modes, int n_iter, float tol) -> Tensor",
    "conv_sigma": "conv_sigma(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) -> Tensor",
    "conv_adjoint": "conv_adjoint(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, str[] padding_modes) "
                    "-> Tensor[]",
    "conv_weight_grad": "conv_weight_grad(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, "
                        "str[] padding_modes) -> Tensor[]",
    "conv_weight_grad_add_": "conv_weight_grad_add_(Tensor(a!)[] grads, Tensor[] weights, Tensor[] xs, Tensor[] ys, "
                             "int[] params, str[] padding_modes) -> ()",
    "conv_sigma_from_step": "conv_sigma_from_step(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, "
                            "str[] padding_modes, Tensor est) -> Tensor",
    "circular_power_step_": "circular_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] x_tops, "
                            "Tensor(c!)[] y_tops, int[] params, int n_iter) -> Tensor",
    "batched_power_step_": "batched_power_step_(Tensor blocks, Tensor(a!) us, Tensor(b!) vs, int n_iter) -> Tensor",
    "shifted_cholesky_info": "shifted_cholesky_info(Tensor H, Tensor shift) -> Tensor",
}

# The most power-iteration steps one op call may run (n_iter of every op, max_iter of the
# public functions): the same number as kMaxIter in csrc/op_contracts.h (a test compares them).
# 10^6 steps are minutes on a 1024 x 1024 weight; a larger count is a bug, not a budget.
MAX_ITER = 1_000_000

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)

    HAS_CPP_EXT = True
except ImportError as _err:  # ABI mismatch, or built without the extension
    HAS_CPP_EXT = False
    warnings.warn(f"specreg_fast: compiled extension not loaded ({_err}); using the pure-PyTorch reference",
                  RuntimeWarning, stacklevel=2)
    _fallback_lib = torch.library.Library("specreg_fast", "DEF")
    for _schema in SCHEMAS.values():
        _fallback_lib.define(_schema)
