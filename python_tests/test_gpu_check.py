"""`make gpu-check` (scripts/gpu_check.sh) on a machine without a GPU: it reports the
environment, says in one line that there is no GPU and exits 0; a python that cannot run the
check makes it exit non-zero with the reason in summary.txt. (The build itself is skipped
here, GPU_CHECK_SKIP_BUILD=1: the extension under test is already built.)"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU mode of the script")


def _run(tmp_path, python):
    env = dict(os.environ, PYTHON=python, OUT=str(tmp_path / "out"), GPU_CHECK_SKIP_BUILD="1")
    return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_without_gpu_says_so_and_passes(tmp_path):
    r = _run(tmp_path, sys.executable)
    assert r.returncode == 0, r.stdout + r.stderr
    no_gpu = [line for line in r.stdout.splitlines() if "no GPU" in line]
    assert len(no_gpu) == 1 and "torch.cuda.is_available() is False" in no_gpu[0], r.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert f"torch {torch.__version__}" in summary
    assert "build: skipped (GPU_CHECK_SKIP_BUILD=1)" in summary
    assert "HAS_CPP_EXT True" in summary
    assert "tests:" not in summary and "bench:" not in summary


def test_python_without_torch_fails_with_the_reason(tmp_path):
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    r = _run(tmp_path, str(fake))
    assert r.returncode != 0
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "cannot import torch" in summary and "No module named torch" in summary
