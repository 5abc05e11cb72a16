"""Loading the compiled libraries (``_C`` on the stable ABI, every CPU kernel; ``_C_cuda`` where
its torch and CUDA match), and the op schemas ``_C`` declares (defined here when it cannot be
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
    "depthwise_power_step_": "depthwise_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] ys, int[] params, "
                             "str[] padding_modes, int n_iter, float tol) -> Tensor",
    "depthwise_weight_grad_add_": "depthwise_weight_grad_add_(Tensor(a!)[] grads, Tensor[] weights, Tensor[] xs, "
                                  "Tensor[] ys, int[] params, str[] padding_modes) -> ()",
    "depthwise_passes": "depthwise_passes(Tensor[] weights, Tensor[] xs, Tensor[] ys, int[] params, "
                        "str[] padding_modes) -> Tensor[]",
    "circular_power_step_": "circular_power_step_(Tensor[] weights, Tensor(a!)[] xs, Tensor(b!)[] x_tops, "
                            "Tensor(c!)[] y_tops, int[] params, int n_iter) -> Tensor",
    "batched_power_step_": "batched_power_step_(Tensor blocks, Tensor(a!) us, Tensor(b!) vs, int n_iter) -> Tensor",
    "shifted_cholesky_info": "shifted_cholesky_info(Tensor H, Tensor shift) -> Tensor",
    "lowrank_power_step_": "lowrank_power_step_(Tensor[] weights, Tensor[] As, Tensor[] Bs, float[] scales, "
                           "Tensor(a!)[] us, Tensor(b!)[] vs, int n_iter, float tol) -> Tensor",
    "set_conv_kernel": "set_conv_kernel(str choice) -> str",
}

# The most power-iteration steps one op call may run (n_iter of every op, max_iter of the
# public functions): the same number as kMaxIterStable in csrc/stable_contracts.h (a test compares them).
# 10^6 steps are minutes on a 1024 x 1024 weight; a larger count is a bug, not a budget.
MAX_ITER = 1_000_000


def _load(name: str):
    """Import the compiled library ``specreg_fast.<name>`` (its static initializers register
    kernels); the ImportError on failure, else None."""
    import importlib

    try:
        importlib.import_module(f"specreg_fast.{name}")
        return None
    except ImportError as err:  # ABI mismatch, or built without it
        return err


def _cuda_major(version) -> "int | None":
    return int(str(version).split(".")[0]) if version else None


# specreg_fast._C: the schemas and every CPU kernel, dense and conv, on the LibTorch stable ABI
# (one binary for every torch from the floor on); _C_cuda: the CUDA kernels, loaded only on a
# torch of the CUDA major they were built for (stable ABI too). What does not load
# leaves its ops to the reference (or Triton, on a GPU).
_err = _load("_C")
HAS_CPP_EXT = _err is None
#: The CPU conv kernels are loaded: part of specreg_fast._C, so the same as HAS_CPP_EXT (kept
#: for the code and tests that ask about the conv ops by this name).
HAS_CONV_EXT = HAS_CPP_EXT
#: The CUDA major specreg_fast._C_cuda was built for (None: built without it).
BUILT_CUDA = None
if HAS_CPP_EXT:
    try:
        from .._build_info import CUDA_VERSION as BUILT_CUDA
    except ImportError:
        BUILT_CUDA = None
    if BUILT_CUDA is not None and torch.version.cuda is not None:
        if _cuda_major(BUILT_CUDA) != _cuda_major(torch.version.cuda):
            warnings.warn(f"specreg_fast: the CUDA kernels were built for CUDA {BUILT_CUDA}, torch has CUDA "
                          f"{torch.version.cuda}: not loaded; on a GPU the ops use Triton or the reference (the CPU "
                          f"kernels are loaded)", RuntimeWarning, stacklevel=2)
        else:
            _cuda_err = _load("_C_cuda")
            if _cuda_err is not None:
                warnings.warn(f"specreg_fast: the CUDA kernels were not loaded ({_cuda_err}); on a GPU the ops use "
                              f"Triton or the reference", RuntimeWarning, stacklevel=2)
else:
    warnings.warn(f"specreg_fast: compiled extension not loaded ({_err}); using the pure-PyTorch reference",
                  RuntimeWarning, stacklevel=2)
    _fallback_lib = torch.library.Library("specreg_fast", "DEF")
    for _schema in SCHEMAS.values():
        _fallback_lib.define(_schema)
