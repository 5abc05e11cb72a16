#!/usr/bin/env bash
# make test-wheel: the wheel in dist/ installed as a user would, with no compiler, into fresh
# venvs holding only a registry torch (TORCHES, default 2.14.1 and 2.11.0), then the op tests
# run against the installed package (not the source tree). Not part of CI: it downloads two
# torch builds. For each torch it prints the install time and which libraries loaded.
#
# No compiler: the install and the tests run with PATH holding the venv's bin and a folder of
# the few tools they need (no cc, c++, gcc, nvcc). The system CUDA toolkit is hidden from the
# loader: python runs under the dynamic loader with --inhibit-cache, so /etc/ld.so.cache
# (which on these machines lists the toolkit's lib64) is not read and LD_LIBRARY_PATH is unset;
# a library that resolves only through the toolkit fails to load.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCHES=${TORCHES:-"2.14.1 2.11.0"}
WORK=${WORK:-$ROOT/build/test-wheel}
TESTS=${TESTS:-"test_dense.py test_fft.py test_op_contracts.py test_abi_symbols.py"}
WHEEL=$(ls -t "$ROOT"/dist/specreg_fast-*.whl 2>/dev/null | head -1 || true)
[ -n "$WHEEL" ] || { echo "no wheel in dist/: run make wheel first" >&2; exit 2; }
LOADER=$(ls /lib64/ld-linux-x86-64.so.2 2>/dev/null || ls /lib/ld-linux-x86-64.so.2)
echo "wheel: $(basename "$WHEEL")"
mkdir -p "$WORK"
# the tools the tests call, and nothing that compiles
TOOLS="$WORK/tools"
rm -rf "$TOOLS" && mkdir -p "$TOOLS"
for t in nm objdump c++filt env sh bash uname cat ls rm mkdir; do
  p=$(command -v "$t" || true)
  [ -n "$p" ] && ln -sf "$p" "$TOOLS/$t"
done
status=0
for T in $TORCHES; do
  V="$WORK/venv-$T"
  echo "=== torch==$T"
  # a venv of an earlier run is reused when it holds this torch (REUSE_VENVS=0: always fresh);
  # the package under test is uninstalled first either way
  if [ "${REUSE_VENVS:-1}" = "1" ] && "$V/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$T')" \
      2>/dev/null; then
    "$V/bin/pip" uninstall -q -y specreg_fast 2>/dev/null || true
  else
    rm -rf "$V"
    "$PYTHON" -m venv "$V"
    "$V/bin/pip" install -q --upgrade pip
    "$V/bin/pip" install -q "torch==$T" numpy pytest hypothesis expecttest
  fi
  # the interpreter under the loader, without its cache (see the top); --argv0 keeps the venv's
  # path as sys.executable, so that python finds its pyvenv.cfg
  cat > "$V/bin/py-nocache" <<EOF
#!/bin/sh
exec "$LOADER" --inhibit-cache --argv0 "$V/bin/python" "$V/bin/python" "\$@"
EOF
  chmod +x "$V/bin/py-nocache"
  start=$(date +%s.%N)
  env -i HOME="$HOME" PATH="$V/bin:$TOOLS" "$V/bin/pip" install -q --no-deps --no-build-isolation "$WHEEL"
  end=$(date +%s.%N)
  echo "install time (torch $T): $(echo "$end - $start" | bc) s"
  # the op tests, from a copy outside the source tree, against the installed package
  TD="$WORK/tests-$T"
  rm -rf "$TD" && mkdir -p "$TD/python_tests"
  cp "$ROOT"/python_tests/conftest.py "$ROOT"/python_tests/spectral_testing.py "$TD/python_tests/"
  for f in $TESTS; do cp "$ROOT/python_tests/$f" "$TD/python_tests/"; done
  cp "$ROOT/pyproject.toml" "$TD/"
  (cd "$TD" && env -i HOME="$HOME" PATH="$V/bin:$TOOLS" "$V/bin/py-nocache" -c "
import warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    import specreg_fast as sf
    from specreg_fast import ops
for x in w:
    print('warning:', x.message)
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('package', sf.__file__)
print('HAS_CPP_EXT', sf.HAS_CPP_EXT, 'HAS_CONV_EXT', ops.HAS_CONV_EXT, 'HAS_CUDA_EXT', sf.HAS_CUDA_EXT,
      'built for CUDA', ops.BUILT_CUDA)
assert 'site-packages' in sf.__file__, 'imported the source tree, not the wheel'
") || status=1
  (cd "$TD" && env -i HOME="$HOME" PATH="$V/bin:$TOOLS" "$V/bin/py-nocache" -m pytest python_tests -q -m "not slow" \
      -p no:cacheprovider -x ${PYTEST_ARGS:-}) || status=1
done
exit $status
