"""The compiled libraries that setup.py builds, printed for CMakeLists.txt.

CMake runs this with the python of the torch it builds against (it imports torch, as setup.py
does). It executes setup.py with ``setuptools.setup`` replaced by a stub, so setup.py's own
``get_extensions()`` decides: the same libraries, sources, compile flags and defines, under
the same environment switches (FORCE_CUDA, SPECREG_FAST_GENERIC, DEBUG, ...). Nothing is
built or installed. Output, one line per library, fields separated by ``|``, lists by ``;``:

    name|language|sources|cxx flags|nvcc flags|defines|include dirs|library dirs|libraries

``language`` is ``cxx`` or ``cuda``; sources are relative to the repository root; the include
and library directories and the libraries are those torch's CppExtension/CUDAExtension add
(torch's headers, ``torch/lib``, c10/torch/torch_cpu/torch_python, and the CUDA ones for
``cuda``), so CMake needs no ``find_package(Torch)``.
"""
from __future__ import annotations

import os
import runpy
import sys
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extensions():
    captured = {}

    def fake_setup(**kwargs):
        captured.update(kwargs)

    sys.path.insert(0, ROOT)
    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py globs csrc/ relative to the working directory
    try:
        with mock.patch("setuptools.setup", fake_setup):
            runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
    return captured.get("ext_modules", [])


def main() -> int:
    for ext in extensions():
        args = ext.extra_compile_args
        cxx = args.get("cxx", []) if isinstance(args, dict) else list(args)
        nvcc = args.get("nvcc", []) if isinstance(args, dict) else []
        lang = "cuda" if any(s.endswith(".cu") for s in ext.sources) else "cxx"
        defines = [n if v is None else f"{n}={v}" for n, v in (ext.define_macros or [])]
        fields = [ext.name.split(".")[-1], lang, ";".join(ext.sources), ";".join(cxx), ";".join(nvcc),
                  ";".join(defines), ";".join(ext.include_dirs), ";".join(ext.library_dirs), ";".join(ext.libraries)]
        assert not any("|" in f for f in fields), fields
        print("|".join(fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
