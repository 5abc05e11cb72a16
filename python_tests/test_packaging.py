"""The package as users get it: schemas, a non-editable wheel, the pure-PyTorch fallback."""
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specreg_fast
from specreg_fast import ops

ROOT = Path(__file__).resolve().parents[1]


def test_extension_loaded_and_schemas_match_python_fallback():
    assert specreg_fast.HAS_CPP_EXT
    for name, schema in ops.SCHEMAS.items():
        op = getattr(torch.ops.specreg_fast, name).default
        assert str(op._schema) == "specreg_fast::" + schema
    assert torch._C._dispatch_has_kernel_for_dispatch_key("specreg_fast::power_step_", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("specreg_fast::sigma", "CPU")


SITE_PACKAGES = str(Path(torch.__file__).resolve().parents[1])


def _run(code, cwd, path):
    """Run ``code`` in a fresh interpreter that sees only ``path`` and the installed
    dependencies: -S skips site's .pth files, so an editable install of the source tree
    cannot shadow the copy under test."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), SITE_PACKAGES])}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_pure_pytorch_fallback_without_extension(tmp_path):
    """If the compiled library cannot load, the package still imports, warns, and computes
    the same numbers with the reference kernels."""
    pkg = tmp_path / "specreg_fast"
    shutil.copytree(ROOT / "specreg_fast", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import specreg_fast as sf\n"
        "assert not sf.HAS_CPP_EXT and any('compiled extension not loaded' in str(x.message) for x in w)\n"
        "W = torch.diag(torch.tensor([3.0, 1.0, 0.5]))\n"
        "st = sf.init_power_state([W], generator=torch.Generator().manual_seed(0))\n"
        "s = sf.spectral_norms([W], st, n_iter=60)\n"
        "assert abs(s.item() - 3.0) < 1e-5, s\n"
        "print('ok')\n")
    r = _run(code, tmp_path, tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_wheel_builds_and_imports_from_non_editable_install(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                        str(wheels), str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = list(wheels.glob("specreg_fast-*.whl"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import specreg_fast as sf, torch\n"
            f"assert sf.__file__.startswith({str(site)!r}), sf.__file__\n"
            "assert sf.HAS_CPP_EXT\n"
            "W = torch.randn(40, 30, dtype=torch.float64)\n"
            "s = sf.spectral_norm(W, tol=1e-12, max_iter=5000)\n"
            "e = torch.linalg.matrix_norm(W, 2)\n"
            "assert abs(s - e) / e < 1e-6, (s, e)\n"
            "print('ok')\n")
    r = _run(code, tmp_path, site)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


_LOAD_WITH_CUDA = r"""
import sys, types, warnings
import torch
info = types.ModuleType("specreg_fast._build_info")
info.CUDA_VERSION = {built!r}
if {built_torch!r} is not None:
    info.TORCH_VERSION = {built_torch!r}
sys.modules["specreg_fast._build_info"] = info
torch.version.cuda = {torch_cuda!r}
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import specreg_fast as sf
    from specreg_fast import ops
cuda_warnings = [str(x.message) for x in w if "CUDA kernels" in str(x.message)]
conv_warnings = [str(x.message) for x in w if "conv kernels were not loaded" in str(x.message)]
print(sf.HAS_CPP_EXT, ops.HAS_CONV_EXT, "specreg_fast._C_cuda" in sys.modules, len(cuda_warnings))
print(cuda_warnings + conv_warnings)
"""


_HAS_CUDA_LIB = bool(glob.glob(os.path.join(os.path.dirname(specreg_fast.__file__), "_C_cuda.*so")))
_TORCH_CUDA = torch.version.cuda or "13.0"


@pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="the compiled libraries are not built")
@pytest.mark.parametrize("built,torch_cuda,built_torch,cuda_loads,warns", [
    ("99.0", "13.0", None, False, 1),      # another CUDA major: not loaded, one warning, CPU kernels kept
    ("99.0", None, None, False, 0),        # a CPU-only torch: nothing to warn about
    (None, "13.0", None, False, 0),        # built without CUDA kernels
    # built with another torch minor: every library loads all the same (all on the stable ABI)
    (_TORCH_CUDA, _TORCH_CUDA, "2.99.0", _HAS_CUDA_LIB, 0),
], ids=["cuda-major-mismatch", "cpu-only-torch", "no-cuda-library", "torch-minor-mismatch"])
def test_cuda_library_loads_only_on_its_cuda_major(built, torch_cuda, built_torch, cuda_loads, warns):
    """The CUDA kernels' library is loaded only when torch's CUDA major is the one it was built
    for (read from specreg_fast/_build_info.py, faked here), whatever torch minor built it: both
    libraries are on the stable ABI. The CPU library loads regardless."""
    code = _LOAD_WITH_CUDA.format(built=built, torch_cuda=torch_cuda, built_torch=built_torch)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    flags, msgs = r.stdout.strip().splitlines()[-2:]
    assert flags == f"True {ops.HAS_CONV_EXT} {cuda_loads} {warns}", (flags, msgs)
    if warns:
        assert "built for CUDA 99.0" in msgs and "CPU kernels are loaded" in msgs, msgs
