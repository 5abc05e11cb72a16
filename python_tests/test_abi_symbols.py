"""The compiled libraries' binary interface to torch (setup.py, csrc/stable_api.h).

specreg_fast._C is built on the LibTorch stable ABI: of everything torch's own libraries
export, it may use only the stable C shim (the extern "C" ``aoti_torch_*`` / ``torch_*``
functions), never a C++ symbol (``at::``, ``c10::``, ``torch::``), which would tie it to the
torch minor it was built with. Read off the dynamic symbol table (``nm -D --undefined-only``),
as a user's loader sees it. The CPU libraries must not need a CUDA library either, so that a
torch of another CUDA major, or a CPU-only one, still loads them.

specreg_fast._C_cuda's CUDA kernels (csrc/cuda/*.cu) are on the stable ABI too (nvcc compiles
them with TORCH_TARGET_VERSION): their objects are held to the same rule, and the library as a
whole is, once its conv sources (still ATen, csrc/cuda/*.cpp) are ported.
"""
import functools
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import specreg_fast
from specreg_fast import ops

PKG = os.path.dirname(specreg_fast.__file__)
ROOT = os.path.dirname(PKG)
TORCH_LIB = os.path.join(os.path.dirname(torch.__file__), "lib")
# Every library is on the stable ABI now (the CPU kernels in _C, the CUDA kernels in _C_cuda).

pytestmark = pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")


def _lib(name):
    found = glob.glob(os.path.join(PKG, f"{name}.*so")) + glob.glob(os.path.join(PKG, f"{name}.so"))
    return found[0] if found else None


def _nm(path, *flags):
    # a shared library: its dynamic symbols (what the loader resolves); an object file has none,
    # so there the whole symbol table
    dyn = ["-D"] if not path.endswith(".o") else []
    out = subprocess.run(["nm", *dyn, *flags, path], check=True, capture_output=True, text=True).stdout
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


# ----------------------------------------------------------------------------- _C_cuda
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
_ATEN_INCLUDE = re.compile(r"^\s*#\s*include\s+<(ATen/|c10/|torch/library\.h|torch/extension\.h)", re.M)


def _includes_aten(path, seen=None):
    """Whether `path`, or a file of the project it includes, includes an ATen/c10 header."""
    seen = set() if seen is None else seen
    path = os.path.normpath(path)
    if path in seen or not os.path.exists(path):
        return False
    seen.add(path)
    with open(path) as f:
        text = f.read()
    if _ATEN_INCLUDE.search(text):
        return True
    here = os.path.dirname(path)
    return any(_includes_aten(os.path.join(base, inc), seen)
               for inc in _LOCAL_INCLUDE.findall(text) for base in (here, os.path.join(ROOT, "csrc")))


def _cuda_sources():
    """The sources of _C_cuda (setup.py: csrc/cuda/*.cu and *.cpp)."""
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                  glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))


_ATEN_CUDA_SOURCES = [os.path.relpath(p, ROOT) for p in _cuda_sources() if _includes_aten(p)]


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "csrc")), reason="no source tree (the installed wheel)")
def test_cuda_kernels_include_no_aten(tmp_path):
    """The dense CUDA kernels are on the stable ABI (their host code reaches torch through
    torch::stable and the C shim): no ATen/c10 header, directly or through a project header."""
    cu = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    assert cu
    assert [p for p in cu if _includes_aten(p)] == []
    # the scan sees an ATen source (else it could not fail)
    (tmp_path / "uses_aten.h").write_text("#pragma once\n#include <ATen/ATen.h>\n")
    (tmp_path / "kernel.cu").write_text('#include "uses_aten.h"\n')
    assert _includes_aten(str(tmp_path / "kernel.cu"))


def _cuda_objects():
    """The objects of the stable .cu sources from this tree's last build_ext (build/temp*), when
    they are not older than their source (an editable or wheel build may keep them elsewhere)."""
    out = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        rel = os.path.relpath(src, ROOT)
        objs = glob.glob(os.path.join(ROOT, "build", "temp*", os.path.splitext(rel)[0] + ".o"))
        objs = [o for o in objs if os.path.getmtime(o) >= os.path.getmtime(src)]
        if objs:
            out.append(max(objs, key=os.path.getmtime))
    return out


@pytest.mark.skipif(not _cuda_objects(), reason="no up-to-date object of csrc/cuda/*.cu under build/ "
                                                "(FORCE_CUDA=1 setup.py build_ext --inplace makes them)")
@pytest.mark.parametrize("obj", _cuda_objects(), ids=os.path.basename)
def test_cuda_kernel_objects_use_only_the_stable_c_shim(obj):
    """Each object of the dense CUDA kernels, as linked into _C_cuda: no C++ symbol of torch,
    only the stable C shim, the CUDA runtime and the C/C++ runtime."""
    bad = unstable_symbols(obj)
    assert bad == [], f"{os.path.basename(obj)} uses {len(bad)} symbols outside the stable C shim: {bad[:20]}"
    undefined = _nm(obj, "--undefined-only")
    assert any(s == "aoti_torch_get_current_cuda_stream" for s in undefined)  # the stream, through the shim
    assert any(s.startswith("cuda") for s in undefined)  # and the runtime (the SM count)


@pytest.mark.skipif(_lib("_C_cuda") is None, reason="specreg_fast._C_cuda is not built")
def test_cuda_library_uses_only_the_stable_c_shim():
    """_C_cuda as a whole (its .cu kernels and the device-generic conv code): no C++ symbol of
    torch, only the stable C shim, the CUDA runtime and the C/C++ runtime."""
    assert _ATEN_CUDA_SOURCES == []
    path = _lib("_C_cuda")
    bad = unstable_symbols(path)
    assert bad == [], f"{os.path.basename(path)} uses {len(bad)} symbols outside the stable C shim: {bad[:20]}"
    assert any(_is_stable_shim(s) for s in _nm(path, "--undefined-only"))


@pytest.mark.parametrize("name", ["_C"])
def test_cpu_libraries_need_no_cuda_library(name):
    path = _lib(name)
    if path is None:
        pytest.skip(f"specreg_fast.{name} is not built")
    out = subprocess.run(["objdump", "-p", path], check=True, capture_output=True, text=True).stdout
    needed = [line.split()[-1] for line in out.splitlines() if line.strip().startswith("NEEDED")]
    assert needed and not [n for n in needed if "cuda" in n or "cudart" in n or "nvrtc" in n], needed
