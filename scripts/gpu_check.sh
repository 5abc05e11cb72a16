#!/usr/bin/env bash
# One-command GPU validation (`make gpu-check`), for a GPU machine lent for a few minutes with
# no network: the python it finds (${PYTHON:-python3}, no venv, nothing downloaded) builds the
# extension in place against its own torch (FORCE_CUDA=1, the visible GPU's arch, MAX_JOBS =
# cores), then runs the CUDA tests and `specreg-fast bench --device cuda --quick`.
#
# Everything lands in ${OUT:-gpu_check_out}/: env.txt, build.log, pytest.log + pytest_cuda.xml
# (junit), bench.log + bench.json, and summary.txt, appended to as each stage starts and ends,
# so a run cut off by the machine's time limit still says how far it got.
# Each stage has a time limit (seconds; the budget of a 16-core H200 machine):
#   GPU_CHECK_BUILD_TIMEOUT (120; 1800 without a GPU, where the build is only checked),
#   GPU_CHECK_TEST_TIMEOUT (120), GPU_CHECK_BENCH_TIMEOUT (60).
# GPU_CHECK_SKIP_BUILD=1 uses the extension already built (the script's own test).
# Exit status: 0 when every stage passed (or, without a GPU, when the build passed), else 1.
set -u -o pipefail

PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0
T0=$(date +%s)

say() { echo "gpu-check: $*" | tee -a "$SUMMARY"; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

# run_stage NAME TIMEOUT LOG CMD...: runs CMD with a time limit, output to LOG; records the outcome.
run_stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t=$(date +%s)
    say "$name: started (limit ${limit} s, log $(basename "$log"))"
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        say "$name: ok ($(elapsed "$t"))"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        say "$name: TIMEOUT after $(elapsed "$t") (limit ${limit} s); last lines of $(basename "$log"):"
        tail -n 15 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    else
        say "$name: FAILED (exit $rc, $(elapsed "$t")); last lines of $(basename "$log"):"
        tail -n 15 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    fi
    return $rc
}

# ---------------------------------------------------------------------------- environment
ENV_PROBE='
import os, platform, shutil, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton none")
print("nvcc", shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else "none"))
print("cores", os.cpu_count())
ok = torch.cuda.is_available()
print("gpu", torch.cuda.get_device_name(0) if ok else "none")
cc = torch.cuda.get_device_capability(0) if ok else None
print("arch", f"{cc[0]}.{cc[1]}" if cc else "none")
'
if ! "$PY" -c "$ENV_PROBE" > "$OUT/env.txt" 2>&1; then
    say "FAILED: $PY cannot import torch; see env.txt"
    sed 's/^/    /' "$OUT/env.txt" | tail -n 5 | tee -a "$SUMMARY"
    exit 1
fi
sed 's/^/    /' "$OUT/env.txt" >> "$SUMMARY"
ARCH=$(awk '$1 == "arch" {print $2}' "$OUT/env.txt")
CORES=$(awk '$1 == "cores" {print $2}' "$OUT/env.txt")
HAVE_GPU=1
if [ "$ARCH" = "none" ]; then
    HAVE_GPU=0
    ARCH=9.0  # no GPU to ask: build for the H200 (sm_90) the check is meant for
fi

# ---------------------------------------------------------------------------- build
# A prebuilt wheel in dist/ (make wheel) whose CUDA major is this torch's (its libraries are on
# the stable ABI of torch 2.11, so any torch from 2.11 on loads them): its libraries are
# unpacked into the tree (the tests below use the package from the tree), and nothing compiles,
# so the GPU minutes go to the tests. Otherwise the build, as before.
PREBUILT=
[ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ] || PREBUILT=$("$PY" - "$(ls -t dist/specreg_fast-*.whl 2>/dev/null | head -1)" <<'PYEOF' 2>/dev/null || true
import re, sys, zipfile
import torch
path = sys.argv[1]
if path and torch.version.cuda:
    with zipfile.ZipFile(path) as z:
        info = z.read("specreg_fast/_build_info.py").decode()
        m = re.search(r"CUDA_VERSION = '([0-9.]+)'", info)
        if m and m.group(1).split(".")[0] == torch.version.cuda.split(".")[0] and \
                tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 11):
            names = [n for n in z.namelist() if re.fullmatch(r"specreg_fast/(_C[a-z_]*\.[^/]*so|_build_info\.py)", n)]
            z.extractall(".", names)
            print(path)
PYEOF
)
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
    say "build: skipped (GPU_CHECK_SKIP_BUILD=1)"
elif [ -n "$PREBUILT" ]; then
    say "build: none, the libraries of the prebuilt wheel $(basename "$PREBUILT") (its CUDA major is torch's)"
else
    if [ $HAVE_GPU = 1 ]; then limit=${GPU_CHECK_BUILD_TIMEOUT:-120}; else limit=${GPU_CHECK_BUILD_TIMEOUT:-1800}; fi
    if ! run_stage build "$limit" "$OUT/build.log" \
        env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$CORES" "$PY" setup.py build_ext --inplace; then
        say "stopping: no extension to test ($(elapsed "$T0") in all)"
        exit 1
    fi
fi
if ! "$PY" -c 'import specreg_fast as s; print("HAS_CPP_EXT", s.HAS_CPP_EXT, "HAS_CUDA_EXT", s.HAS_CUDA_EXT)' \
        >> "$OUT/env.txt" 2>&1; then
    say "FAILED: import specreg_fast (see env.txt)"
    exit 1
fi
say "$(tail -n 1 "$OUT/env.txt")"

if [ $HAVE_GPU = 0 ]; then
    say "no GPU visible (torch.cuda.is_available() is False): the build was checked, no CUDA test or bench ran ($(elapsed "$T0"))"
    exit $FAILED
fi

# ---------------------------------------------------------------------------- tests
# The GPU tests of test_cuda_build.py, then the CUDA tests (whose last one, the CUDA graph,
# may leave the context unusable if a kernel is not capture-safe), except the tests meant for
# the CPU machine: the host emulation of the kernels (CPU time) and the sm_80/sm_90 cubin check
# (this build targets the visible GPU's arch only). -v: a cut-off log names the test it was in.
run_stage tests "${GPU_CHECK_TEST_TIMEOUT:-120}" "$OUT/pytest.log" \
    "$PY" -m pytest python_tests/test_cuda_build.py python_tests/test_cuda.py -v -ra -p no:cacheprovider \
    -k "not emulated and not cubins" --junitxml="$OUT/pytest_cuda.xml"
tail -n 1 "$OUT/pytest.log" | sed 's/^/    /' | tee -a "$SUMMARY"

# ---------------------------------------------------------------------------- bench
# (python -m: the package is used from this tree, not installed)
run_stage bench "${GPU_CHECK_BENCH_TIMEOUT:-60}" "$OUT/bench.log" \
    "$PY" -m specreg_fast.cli bench --device cuda --quick --json "$OUT/bench.json"
if [ -s "$OUT/bench.json" ]; then
    "$PY" - "$OUT/bench.json" >> "$SUMMARY" 2>&1 <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
for r in res["rows"]:
    if r["group"] == "gpu":
        gb = "" if r["gbps"] is None else f" {r['gbps']:.0f} GB/s"
        frac = "" if r["frac_read_bw"] is None else f" ({100 * r['frac_read_bw']:.0f}% of peak HBM)"
        print(f"    {r['shape']:<12} {r['backend']:<10} {r['median_s'] * 1e6:9.1f} us{gb}{frac}"
              f"  {r['ratio_vs_reference']:.2f}x the reference")
EOF
fi

if [ $FAILED = 0 ]; then
    say "PASSED ($(elapsed "$T0") in all)"
else
    say "FAILED ($(elapsed "$T0") in all)"
fi
exit $FAILED
