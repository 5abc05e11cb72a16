# `make test` and `make demo` work on a fresh clone: they create .venv, install the pinned
# dependencies, build the extension, then run. A second run reuses the venv (and ninja's
# object files), so it is fast.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-stamp
EDIT   := $(VENV)/.editable-stamp
# Defined before the rules that list it: make expands prerequisites when it reads a rule.
REPRO  := $(VENV)/.repro-stamp
# The CUDA sources are compiled and linked (no GPU needed) whenever nvcc is around; set
# FORCE_CUDA=0 for a quicker CPU-only build.
NVCC   := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
FORCE_CUDA ?= $(if $(NVCC),1,0)
export FORCE_CUDA
PYTEST_ARGS ?=

.PHONY: all venv build test test-all demo bench bench-compare docs sanitize clean gpu-check test-compat test-isa-default test-generic wheel test-wheel

all: test

$(DEPS): requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(DEPS)

$(EDIT): $(DEPS) pyproject.toml setup.py
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# build_ext --inplace is incremental (ninja); the editable install only puts the package
# and the `specreg-fast` command on the venv's path.
build: $(EDIT)
	$(VPY) setup.py -q build_ext --inplace

# The Triton-interpreter tests need TRITON_INTERPRET=1 before triton is imported, which
# changes what @triton.jit returns (so no AOT compilation in that process): they run in a
# pytest process of their own, and the main run leaves them out.
TRITON_INTERP_TESTS := python_tests/test_triton_interpret.py

test: build $(REPRO)
	$(VPY) -m pytest python_tests -m "not slow" --ignore=$(TRITON_INTERP_TESTS) $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(VPY) -m pytest $(TRITON_INTERP_TESTS) -m "not slow" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory docs

test-all: build $(REPRO)
	$(VPY) -m pytest python_tests --ignore=$(TRITON_INTERP_TESTS) $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(VPY) -m pytest $(TRITON_INTERP_TESTS) $(PYTEST_ARGS)

$(REPRO): $(DEPS) requirements-repro.txt
	$(VPY) -m pip install -q -r requirements-repro.txt
	touch $@

# The main job: the paper's comparison on packaged MNIST digits and toy data (compact
# budget), after a table of every layer's sigma of a small CNN (exact vs fast).
demo: build $(REPRO)
	$(VENV)/bin/specreg-fast demo
	$(VENV)/bin/specreg-fast reproduce

# The whole suite in one table (the per-op scripts in bench/ give more detail).
bench: build $(REPRO)
	$(VENV)/bin/specreg-fast bench --json bench_results.json --plot bench_results.png

# Same-run speed comparison of a base revision (A) and this working tree (B): both timed
# interleaved over ROUNDS rounds, per case the ratio of medians B/A with a bootstrap interval,
# FAIL (exit status 1) where its lower end is above 1.05 (bench/compare_revisions.py). BASE is
# checked out in build/compare-base; its extension is this tree's, copied, when csrc/ and
# setup.py do not differ from BASE, else built there (CPU kernels only).
# make bench-compare BASE=main~3 ROUNDS=21 COMPARE_ARGS="--cases 'penalty/*'"
BASE    ?= main
ROUNDS  ?= 15
CMP_DIR := build/compare-base
COMPARE_ARGS ?=
bench-compare: build
	git worktree prune
	if [ -e $(CMP_DIR)/.git ]; then git -C $(CMP_DIR) checkout -q --force --detach $(BASE); \
	else rm -rf $(CMP_DIR) && mkdir -p build && git worktree add -q --detach $(CMP_DIR) $(BASE); fi
	rm -f $(CMP_DIR)/specreg_fast/_C*.so
	if git diff --quiet $(BASE) -- csrc setup.py && [ -z "$$(git ls-files --others --exclude-standard csrc)" ]; \
	then cp specreg_fast/_C*.so $(CMP_DIR)/specreg_fast/; \
	else cd $(CMP_DIR) && FORCE_CUDA=0 $(abspath $(VPY)) setup.py -q build_ext --inplace; fi
	$(VPY) bench/compare_revisions.py --a $(CMP_DIR) --b . --rounds $(ROUNDS) --json bench_compare.json \
	  $(COMPARE_ARGS)

# On a GPU machine (no venv, no network): build for the visible GPU, run the CUDA tests and the
# CUDA benchmarks, report into $(or $(OUT),gpu_check_out)/ (scripts/gpu_check.sh). Without a GPU
# it checks the build and says so.
gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

# The CPU tests against another torch (make test-compat TORCH=2.11.0; not part of CI): a side
# venv with that torch and the pinned test and repro deps (as make test), the tree copied into
# it (so the extension built against that torch does not replace .venv's), built and tested there.
# TORCHVISION must pair with TORCH (torch 2.11 <-> torchvision 0.26; 2.14 <-> 0.29).
TORCH  ?= 2.11.0
TORCHVISION ?= 0.26.0
COMPAT := .venv-compat-$(TORCH)
test-compat:
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	sed -e 's/#.*//' -e '/^torch==/d' -e '/^torchvision==/d' -e '/^[[:space:]]*$$/d' requirements-dev.txt \
	    > $(COMPAT)/requirements-compat.txt
	$(COMPAT)/bin/python -m pip install -q torch==$(TORCH) torchvision==$(TORCHVISION) -r $(COMPAT)/requirements-compat.txt
	$(COMPAT)/bin/python -m pip install -q -r requirements-repro.txt
	rm -rf $(COMPAT)/src && mkdir -p $(COMPAT)/src
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(COMPAT)/src
	cd $(COMPAT)/src && ../bin/python setup.py -q build_ext --inplace
	cd $(COMPAT)/src && ../bin/python -m pytest python_tests -m "not slow" --ignore=$(TRITON_INTERP_TESTS) $(PYTEST_ARGS)
	cd $(COMPAT)/src && TRITON_INTERPRET=1 ../bin/python -m pytest $(TRITON_INTERP_TESTS) -m "not slow" $(PYTEST_ARGS)

# The extension built with -fsanitize=address,undefined into a copy of the package under
# build/sanitize (the regular build is left alone), then the op tests against it. libasan
# must be the first library loaded into python (libstdc++ next: else ASan's __cxa_throw
# interceptor is unresolved and the first C++ exception aborts); leak checks are off (the interpreter's own
# allocations would swamp them), a UBSan report aborts the test that triggered it.
SAN_DIR   := build/sanitize
SAN_TESTS := test_native_crashes.py test_fuzz.py test_dense.py test_conv_operator.py test_fft.py
sanitize: $(DEPS)
	rm -rf $(SAN_DIR)/specreg_fast $(SAN_DIR)/python_tests
	mkdir -p $(SAN_DIR) && cp -r specreg_fast python_tests pyproject.toml $(SAN_DIR)/
	rm -f $(SAN_DIR)/specreg_fast/_C*.so
	SPECREG_FAST_SANITIZE=1 $(VPY) setup.py -q build_ext --build-lib $(SAN_DIR) --build-temp $(SAN_DIR)/obj
	cd $(SAN_DIR) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(abspath $(VPY)) -m pytest $(addprefix python_tests/,$(SAN_TESTS)) -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

# The docs site into site/ (mkdocs-material + mkdocstrings, mkdocs.yml): strict, so a warning,
# a broken link or an unresolved reference fails it. mkdocs lives in its own venv (.venv-docs,
# requirements-docs.txt: its pins conflict with the repro deps'); the tutorials in docs/ run at
# build time with .venv's python on the CPU (scripts/docs/hooks.py), and the benchmark tables
# are generated from results/*.json. DOCS_SKIP=a,b renders those tutorials (or pages marked
# docs-skippable) without running them, each with a banner that says so.
DOCS_VENV := .venv-docs
DOCS_DEPS := $(DOCS_VENV)/.docs-stamp
DOCS_SKIP ?=
$(DOCS_DEPS): requirements-docs.txt
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install -q -r requirements-docs.txt
	touch $@

docs: build $(REPRO) $(DOCS_DEPS)
	SPECREG_DOCS_PYTHON=$(abspath $(VPY)) SPECREG_DOCS_SKIP=$(DOCS_SKIP) NO_MKDOCS_2_WARNING=1 \
	  $(DOCS_VENV)/bin/mkdocs build --strict

# The wheel, into dist/ (the libraries built against .venv's torch; _C on the stable ABI of torch
# 2.11 on). CUDA kernels for every GPU from Turing to Blackwell plus PTX for later ones, whatever
# GPU the build machine has (an unset TORCH_CUDA_ARCH_LIST builds sm_80 and sm_90 only). Then
# auditwheel, when installed, gives it a manylinux tag; torch's own libraries, the CUDA runtime
# and libgomp are left out (torch ships them): without auditwheel the wheel is for this machine's
# glibc only (the linux_x86_64 tag says so).
WHEEL_ARCHS ?= 7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX
AUDIT_EXCLUDES := libtorch.so libtorch_cpu.so libtorch_cuda.so libtorch_python.so libc10.so libc10_cuda.so \
                  libcudart.so.13 libcudart.so.12 libgomp.so.1
wheel: $(DEPS)
	rm -rf dist/specreg_fast-*.whl build/wheel-raw
	TORCH_CUDA_ARCH_LIST="$(WHEEL_ARCHS)" $(VPY) -m pip wheel --no-build-isolation --no-deps -w build/wheel-raw .
	if $(VPY) -m auditwheel --version >/dev/null 2>&1; then \
	  PATH="$(abspath $(dir $(VPY))):$$PATH" LD_LIBRARY_PATH="$$($(VPY) -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')" \
	  $(VPY) -m auditwheel repair $(addprefix --exclude ,$(AUDIT_EXCLUDES)) -w dist build/wheel-raw/specreg_fast-*.whl; \
	else mkdir -p dist && cp build/wheel-raw/specreg_fast-*.whl dist/ && echo "no auditwheel: dist/ has a local-only wheel"; fi
	ls -l dist/

# The wheel installed with no compiler into fresh venvs of torch 2.14.1 and 2.11.0 from the
# registry, the op tests run against it (scripts/test_wheel.sh; downloads torch: not part of CI).
test-wheel:
	PYTHON=$(PYTHON) bash scripts/test_wheel.sh

# The op tests on the code a CPU without AVX2/AVX-512 runs (not part of CI; each run is a
# portability check, the suite must pass on every CPU): `test-isa-default` with ATen's own
# kernels held to their baseline (ATEN_CPU_CAPABILITY=default), `test-generic` on a build of
# the extension whose hot loops have only their generic path (SPECREG_FAST_GENERIC=1, no
# target_clones), built into build/generic beside the regular build.
ISA_TESTS := test_dense.py test_conv_operator.py test_fft.py test_op_contracts.py test_input_validation.py \
             test_bounds.py test_reference.py test_native_crashes.py test_fuzz.py
GEN_DIR := build/generic
test-isa-default: build
	ATEN_CPU_CAPABILITY=default $(VPY) -m pytest $(addprefix python_tests/,$(ISA_TESTS)) -m "not slow" $(PYTEST_ARGS)
test-generic: $(DEPS)
	rm -rf $(GEN_DIR)/specreg_fast $(GEN_DIR)/python_tests
	mkdir -p $(GEN_DIR) && cp -r specreg_fast python_tests pyproject.toml $(GEN_DIR)/
	rm -f $(GEN_DIR)/specreg_fast/*.so
	SPECREG_FAST_GENERIC=1 FORCE_CUDA=0 $(VPY) setup.py -q build_ext --build-lib $(GEN_DIR) --build-temp $(GEN_DIR)/obj
	cd $(GEN_DIR) && $(abspath $(VPY)) -m pytest $(addprefix python_tests/,$(ISA_TESTS)) -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info specreg_fast/*.so site
