#!/usr/bin/env bash
# The one complete GPU verification, for one call of the device tool (about 5-6 minutes on an H100):
#   1. builds the CPU and CUDA extensions at once (JIT, two processes);
#   2. runs every test that can run on CUDA, each test file in its own pytest process (4 at a time), so a crash in
#      one cannot hide the rest: the GPU files whole, every other file with -k "cuda or gpu";
#   3. the op benchmark: fused per backend, eager, torch.compile, diffusers; plain and thresholded; 2^16-2^26;
#      float32 and bfloat16 (python -m dpm_kernels bench);
#   4. benchmarks/bench_overhead.py --device cuda: host cost per step of every front end on each backend, and the
#      first use of a trajectory;
#   5. benchmarks/profile_step.py: where a fused scheduler step's host microseconds go, per backend.
#
#   usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#   GPU_CHECK_TEST_FILES="tests/a.py tests/b.py": only these test files (default: all of tests/test_*.py)
#
# OUT_DIR receives at most 8 files (what the device tool returns): summary.md (environment, build, one line per
# test file -- passed / failed / CRASHED -- every failure's name, the benchmark tables), logs.tar.gz (every full
# log), the benchmark's and the overhead run's CSV and markdown, profile.txt. The summary is printed last.
# --dry-run runs the same pipeline on the CPU with tiny sizes and collect-only tests (tests/test_gpu_check.py
# runs it, so the script cannot rot where no GPU is lent).
# diffusers, k-diffusion and torchsde are not on the lent GPU image: carry their wheels in .whl/ (see
# benchmarks/README.md); they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOGS="$(mktemp -d)"
export PYTHONUNBUFFERED=1
export DPM_KERNELS_VERBOSE_BUILD=0
export MAX_JOBS="${MAX_JOBS:-8}"
PY="${PYTHON:-python3}"
status=0
if [ "$DRY" = 1 ]; then
  DEVICE=cpu                                     # the environment's own build (tests share it)
else
  DEVICE=cuda
  export TORCH_EXTENSIONS_DIR="$LOGS/ext"        # a fresh build, kept out of OUT
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # the machine's own arch only: a faster build
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

summary="$LOGS/summary.md"
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ' (dry run on the CPU)')"
  echo
  echo '```'
  nvidia-smi -L 2>/dev/null
  $PY -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', \
torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1
  $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -n 1
  git log -1 --format='commit %h %cd' --date=short 2>/dev/null
  echo '```'
} > "$summary"

echo "== build: CPU and CUDA extensions at once"
t0=$SECONDS
exts="cpu"
[ "$DRY" = 0 ] && exts="cpu cuda"
pids=()
for e in $exts; do
  timeout 420 $PY -c "import sys; from dpm_kernels import _build; r = _build.load('$e'); print('$e:', r or 'loaded'); \
sys.exit(r is not None)" > "$LOGS/build_$e.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
{
  echo
  echo "## build ($((SECONDS - t0)) s)"
  echo '```'
  for e in $exts; do tail -n 1 "$LOGS/build_$e.log"; done
  $PY -m dpm_kernels info 2>&1 | tail -n 8
  echo '```'
} >> "$summary"

echo "== tests: one pytest process per file"
GPU_FILES="tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_gpu_sampling.py"
run_file() {  # $1: test file; prints "file rc"
  local f="$1" sel=() log
  log="$LOGS/tests/$(basename "$f" .py).log"
  case " $GPU_FILES " in *" $f "*) ;; *) sel=(-k "cuda or gpu") ;; esac
  local extra=(-rfE)
  [ "$DRY" = 1 ] && extra=(--collect-only)
  timeout 300 $PY -m pytest -q -p no:cacheprovider "${extra[@]}" "${sel[@]}" "$f" > "$log" 2>&1
  echo "$f $?"
}
export -f run_file
export LOGS PY GPU_FILES DRY
mkdir -p "$LOGS/tests"
t0=$SECONDS
# GPU_CHECK_TEST_FILES: a subset of the files (the dry run's test uses two); default: every test file
ls ${GPU_CHECK_TEST_FILES:-tests/test_*.py} | xargs -P 4 -I{} bash -c 'run_file {}' > "$LOGS/test_rcs.txt"
{
  echo
  echo "## tests ($((SECONDS - t0)) s; rc 5 = no test of the file runs on CUDA)"
  echo
  echo "| file | rc | result |"
  echo "|---|---|---|"
  sort "$LOGS/test_rcs.txt" | while read -r f rc; do
    log="$LOGS/tests/$(basename "$f" .py).log"
    last=$(grep -E " in [0-9.]+s" "$log" | tail -n 1 | tr -d '=')
    case "$rc" in
      0|5) what="$last" ;;
      1) what="FAILED: $last" ;;
      2|3|4) what="ERROR (pytest rc $rc): $(grep -E "^E |Error" "$log" | head -n 1 | cut -c1-200)" ;;
      124) what="TIMED OUT" ;;
      *) what="CRASHED (rc $rc): $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-200)" ;;
    esac
    echo "| $(basename "$f") | $rc | $what |"
  done
  echo
  grep -hE "^(FAILED|ERROR) " "$LOGS"/tests/*.log | head -n 60 | sed 's/^/- /'
} >> "$summary"
awk '$2 != 0 && $2 != 5 {bad = 1} END {exit bad}' "$LOGS/test_rcs.txt" || status=1

echo "== op benchmark"
t0=$SECONDS
if [ "$DRY" = 1 ]; then
  bench=(--device cpu --sizes 10,12 --orders 2 --dtypes float32 --providers fused,eager --min-time 0)
else
  bench=(--device cuda --sizes 16,20,24,26 --orders 2 --dtypes float32,bfloat16 --thresholding both
         --providers fused,eager,compile,diffusers --min-time 0.05)
fi
timeout 240 $PY -m dpm_kernels bench "${bench[@]}" --out "$OUT" --no-progress > "$LOGS/bench.log" 2>&1 || status=1
{ echo; echo "## op benchmark ($((SECONDS - t0)) s)"; echo; grep -E "^\|" "$LOGS/bench.log"; tail -n 2 "$LOGS/bench.log"; } \
  >> "$summary"

echo "== host cost per step"
t0=$SECONDS
over=(--device "$DEVICE" --rounds 15 --out "$OUT")
[ "$DRY" = 1 ] && over=(--device cpu --smoke --out "$OUT")
timeout 180 $PY benchmarks/bench_overhead.py "${over[@]}" > "$LOGS/overhead.log" 2>&1 || status=1
{ echo; echo "## host cost per step ($((SECONDS - t0)) s)"; echo; grep -vE "^(appended|USDT)" "$LOGS/overhead.log"; } \
  >> "$summary"

echo "== profile"
prof=(--device "$DEVICE" --out "$OUT/profile.txt")
[ "$DRY" = 1 ] && prof+=(--smoke)
timeout 120 $PY benchmarks/profile_step.py "${prof[@]}" > "$LOGS/profile.log" 2>&1 || status=1
{ echo; echo "## profile (profile.txt)"; echo; grep -E "^## |launches per step" "$OUT/profile.txt" 2>/dev/null; } \
  >> "$summary"

echo "== done: status $status"
echo >> "$summary"
echo "status: $status" >> "$summary"
cp "$summary" "$OUT/summary.md"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" --exclude ext summary.md tests test_rcs.txt build_cpu.log \
  $( [ "$DRY" = 0 ] && echo build_cuda.log ) bench.log overhead.log profile.log 2>/dev/null
rm -rf "$LOGS"
cat "$OUT/summary.md"
exit $status
