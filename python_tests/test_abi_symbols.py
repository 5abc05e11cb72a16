"""The compiled libraries' binary interface to torch (setup.py, csrc/stable_api.h).

specreg_fast._C is built on the LibTorch stable ABI: of everything torch's own libraries
export, it may use only the stable C shim (the extern "C" ``aoti_torch_*`` / ``torch_*``
functions), never a C++ symbol (``at::``, ``c10::``, ``torch::``), which would tie it to the
torch minor it was built with. Read off the dynamic symbol table (``nm -D --undefined-only``),
as a user's loader sees it. The CPU libraries must not need a CUDA library either, so that a
torch of another CUDA major, or a CPU-only one, still loads them.
"""
import functools
import glob
import os
import shutil
import subprocess

import pytest
import torch

import specreg_fast
from specreg_fast import ops

PKG = os.path.dirname(specreg_fast.__file__)
TORCH_LIB = os.path.join(os.path.dirname(torch.__file__), "lib")
# The library still written (in part: its dense CUDA kernels, csrc/cuda/power_step_cuda.cu and
# cuda_module.cpp) against ATen's C++ API; checked for the CUDA dependency only. Its conv kernels
# are _C's stable code (csrc/cuda/conv_device_*.cpp).
NOT_YET_STABLE = ("_C_cuda",)

pytestmark = pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")


def _lib(name):
    found = glob.glob(os.path.join(PKG, f"{name}.*so")) + glob.glob(os.path.join(PKG, f"{name}.so"))
    return found[0] if found else None


def _nm(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, path], check=True, capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def _torch_exports():
    """Every dynamic symbol torch's own libraries define (mangled)."""
    names = set()
    for lib in glob.glob(os.path.join(TORCH_LIB, "lib*.so*")):
        base = os.path.basename(lib)
        if base.startswith(("libtorch", "libc10", "libshm")):
            names.update(_nm(lib, "--defined-only"))
    return names


def _is_stable_shim(sym):
    return not sym.startswith("_Z") and sym.startswith(("aoti_torch_", "torch_"))


_TORCH_NAMESPACES = ("at::", "c10::", "torch::", "caffe2::", "aoti_torch::")


def _in_torch_namespace(demangled):
    for prefix in ("typeinfo for ", "typeinfo name for ", "vtable for ", "VTT for ", "guard variable for "):
        if demangled.startswith(prefix):
            demangled = demangled[len(prefix):]
    return demangled.startswith(_TORCH_NAMESPACES)


def unstable_symbols(path):
    """The undefined dynamic symbols of `path`, demangled, that tie it to one torch build: a C++
    symbol of torch's namespaces, or anything else torch's libraries export outside the stable C
    shim (torch also re-exports some of the C++ standard library, which is no tie to torch)."""
    undefined = _nm(path, "--undefined-only")
    exports = _torch_exports()
    demangled = subprocess.run(["c++filt"], input="\n".join(undefined), capture_output=True,
                               text=True).stdout.split("\n")
    bad = []
    for sym, name in zip(undefined, demangled):
        if _in_torch_namespace(name):
            bad.append(name)
        elif sym in exports and not _is_stable_shim(sym) and "std::" not in name and not sym.startswith("__"):
            bad.append(name)
    return sorted(set(bad))


@pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="the compiled library is not built")
def test_stable_library_uses_only_the_stable_c_shim():
    path = _lib("_C")
    assert path is not None
    bad = unstable_symbols(path)
    assert bad == [], f"{os.path.basename(path)} uses {len(bad)} symbols outside the stable C shim: {bad[:20]}"
    # and it does use the shim (else the check would look at the wrong library)
    assert any(_is_stable_shim(s) for s in _nm(path, "--undefined-only"))


@pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="the compiled library is not built")
def test_stable_library_holds_the_conv_kernels():
    """The conv ops' CPU kernels are in _C (and so under the check above), not in a library of
    their own: _C registers their CPU kernels, and no specreg_fast._C_conv is loaded."""
    import sys

    with open(_lib("_C"), "rb") as f:
        blob = f.read()
    for op in ("conv_power_step_", "conv_sigma", "conv_sigma_from_step", "conv_adjoint", "conv_weight_grad",
               "conv_weight_grad_add_", "circular_power_step_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"specreg_fast::{op}", "CPU"), op
        assert op.encode() + b"\0" in blob, op  # the name _C registers the kernel under
    previous = torch.ops.specreg_fast.set_conv_kernel("auto")  # the kernel switch is _C's too
    assert torch.ops.specreg_fast.set_conv_kernel(previous) == "auto"
    assert "specreg_fast._C_conv" not in sys.modules and ops.HAS_CONV_EXT


def test_the_check_sees_a_library_on_atens_cpp_api():
    """The same check flags a library built on ATen's C++ API (torch's own Python bindings):
    the check can fail."""
    lib = os.path.join(TORCH_LIB, "libtorch_python.so")
    if not os.path.exists(lib):
        pytest.skip("torch has no libtorch_python.so")
    bad = unstable_symbols(lib)
    assert any(s.startswith(("at::", "c10::")) for s in bad), bad[:10]


@pytest.mark.parametrize("name", ["_C"])
def test_cpu_libraries_need_no_cuda_library(name):
    path = _lib(name)
    if path is None:
        pytest.skip(f"specreg_fast.{name} is not built")
    out = subprocess.run(["objdump", "-p", path], check=True, capture_output=True, text=True).stdout
    needed = [line.split()[-1] for line in out.splitlines() if line.strip().startswith("NEEDED")]
    assert needed and not [n for n in needed if "cuda" in n or "cudart" in n or "nvrtc" in n], needed
