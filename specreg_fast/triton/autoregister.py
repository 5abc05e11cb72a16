"""Imported by ``specreg_fast/__init__.py`` once ``HAS_CUDA_EXT`` is known: registers the
Triton kernels as the CUDA implementation of the dense ops when the compiled extension has
none (see ``specreg_fast.backends``). A no-op without CUDA or without triton."""
from ..backends import register_triton_for_cuda

REGISTERED = register_triton_for_cuda()
