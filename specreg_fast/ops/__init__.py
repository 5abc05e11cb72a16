"""Custom-op front: typed wrappers around ``torch.ops.specreg_fast.*``.

The schemas are declared once, in ``csrc/specreg_fast.cpp``. This package adds what the
C++ side cannot: fake (meta) implementations for ``torch.compile``, the autograd formulas of
the functional ops, and the plain-PyTorch reference registered under
``CompositeExplicitAutograd`` so that a device with no kernel of its own (a CUDA tensor in a
CPU-only build, MPS, ...) still runs. If the compiled extension cannot be loaded, the same
schemas are defined here and only the reference runs (``HAS_CPP_EXT = False``).

One module per op family, as ``csrc/cpu/``: ``power_step`` (dense), ``lowrank_step`` (LoRA), ``conv_operator``,
``circular_conv``, ``batched_power``, ``shifted_cholesky``; ``_checks`` holds the argument
checks they share and ``_library`` loads the extension. Each module registers its own ops,
once, when this package is imported. The conv geometry the conv ops take (packing, decoding,
the map in plain PyTorch) is :mod:`specreg_fast.geometry`.

Besides the ops, the package's own modules and tests use the reference kernels
(``power_step_reference``, ...), the argument conversions of the public functions
(``iter_arg``, ``tol_arg``), ``check_disjoint_state`` and the dtype rule (``acc_dtype``,
``out_dtype``, from :mod:`specreg_fast.contract`); those names are exported here too, without
being part of ``__all__``.
"""
from __future__ import annotations

from ..contract import acc_dtype, out_dtype
from ..geometry import decode_conv_params, pack_conv_params
from ._checks import check_disjoint_state, iter_arg, tol_arg
from ._library import BUILT_CUDA, HAS_CONV_EXT, HAS_CPP_EXT, MAX_ITER, SCHEMAS
from .batched_power import batched_power_step_, batched_power_step_reference, check_batched_args
from .circular_conv import circular_output_shapes, circular_power_step_, circular_power_step_reference, polyphase_split
from .conv_operator import (conv_adjoint, conv_adjoint_reference, conv_power_step_, conv_power_step_reference,
                            conv_sigma, conv_sigma_from_step, conv_sigma_reference, conv_weight_grad, conv_weight_grad_add_,
                            conv_weight_grad_add_reference, conv_weight_grad_reference)
from .lowrank_step import lowrank_power_step_, lowrank_power_step_reference
from .depthwise import (depthwise_kernel, depthwise_passes, depthwise_power_step_, depthwise_power_step_reference,
                        depthwise_preferred, depthwise_supported, depthwise_weight_grad_add_, set_depthwise_kernel)
from .power_step import power_step_, power_step_reference, rank1_grad, sigma, sigma_from_step, sigma_reference
from .shifted_cholesky import shifted_cholesky_info, shifted_cholesky_info_reference

__all__ = ["power_step_", "sigma", "sigma_from_step", "conv_power_step_", "conv_sigma", "conv_adjoint",
           "conv_weight_grad", "conv_weight_grad_add_", "conv_sigma_from_step", "circular_power_step_",
           "batched_power_step_", "shifted_cholesky_info", "lowrank_power_step_",
           "depthwise_power_step_", "depthwise_weight_grad_add_", "depthwise_passes", "pack_conv_params", "HAS_CPP_EXT", "HAS_CONV_EXT",
           "SCHEMAS"]
