#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: build them instrumented (into their own
# build directory), run the fused-step, property-based, error-path and CPU-backend tests against them, and fail on
# any sanitizer report. Run from the repository root:   tests/sanitize.sh
# Python itself is not instrumented: the sanitizer runtimes are preloaded; leak checking is off (the interpreter
# keeps memory until exit by design). UBSan aborts at the first report (-fno-sanitize-recover=all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
LOGDIR="${SANITIZE_LOGDIR:-$(mktemp -d)}"
LOG="$LOGDIR/sanitize.log"
export DPM_KERNELS_SANITIZE=1
export DPM_KERNELS_BUILD_DIR="${DPM_KERNELS_BUILD_DIR:-${TMPDIR:-/tmp}/dpm_kernels_sanitize_build}"
# reports go to files as well: pytest captures the stderr of a test, and an abort would lose it
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:log_path=$LOGDIR/asan"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$LOGDIR/ubsan"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=2

# the instrumented build, and a check that the tests will really load it
$PY - <<'PYEOF' 2>&1 | tee "$LOG"
import os, torch, dpm_kernels
from dpm_kernels.backends import registry
assert registry.choose("cpu", torch.device("cpu")).name == "cpu"
maps = open("/proc/self/maps").read()
so = [line.split()[-1] for line in maps.splitlines() if "dpm_kernels_cpu" in line]
assert so and all(p.startswith(os.environ["DPM_KERNELS_BUILD_DIR"]) for p in so), so
print("sanitize: instrumented kernels loaded from", so[0])
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "sanitize: the instrumented build failed" >&2; exit 1; }

# cpu-cpu: the C++ backend's cases of the shared matrices; test_cpu_backend: 2^24+ samples, strides, threads;
# test_error_paths: the C++ error messages, in a child process that inherits the instrumented build
$PY -m pytest -q -p no:cacheprovider -x -k "cpu-cpu or not (cpu-torch or cpu-triton)" \
  tests/test_fused_step.py tests/test_properties.py tests/test_op_errors.py tests/test_cpu_backend.py \
  tests/test_error_paths.py \
  2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
if compgen -G "$LOGDIR/asan.*" >/dev/null || compgen -G "$LOGDIR/ubsan.*" >/dev/null \
    || grep -qE "ERROR: AddressSanitizer|runtime error:" "$LOG"; then
  echo "sanitize: sanitizer report:" >&2
  cat "$LOGDIR"/asan.* "$LOGDIR"/ubsan.* 2>/dev/null | head -40 | cut -c1-240 >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize: tests failed under the sanitizers (exit $status; see $LOG)" >&2
  exit "$status"
fi
echo "sanitize: clean"
