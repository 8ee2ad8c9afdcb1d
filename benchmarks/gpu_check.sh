#!/usr/bin/env bash
# One-shot GPU check for a lent machine (see docs/gpu.md): installs the carried
# CUTLASS headers, builds flextron._C with CUDA for the local GPU, runs the CUDA
# tests and the op benchmark. Every step logs under $OUT; a failed test step does
# not stop the benchmark (a failed build skips both); the exit status is that of
# the first failed step.
#
#   bash benchmarks/gpu_check.sh            # from the repo root
#
# Environment: OUT (log folder; default ./gpu_check_out), PYTHON (default python3),
# FLEXTRON_CUDA_ARCHS (default 90a), CUTLASS_WHEEL (default .whl/nvidia_cutlass-*.whl,
# only needed when the nvidia-cutlass headers are not installed), MAX_JOBS (default
# all cores), and per-step limits in seconds BUILD_S, TEST_S, BENCH_S.
set -u
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
export FLEXTRON_CUDA=1
export FLEXTRON_CUDA_ARCHS="${FLEXTRON_CUDA_ARCHS:-90a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FLEXTRON_BUILD_DIR="${FLEXTRON_BUILD_DIR:-/tmp/flextron-build}"
export PYTHONUNBUFFERED=1
BUILD_S="${BUILD_S:-240}" TEST_S="${TEST_S:-190}" BENCH_S="${BENCH_S:-130}"
SITE=/tmp/flextron-site
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0

# step NAME LOG LIMIT_S CMD...: run CMD under a time limit, log its output, record the outcome.
step() {
  local name="$1" log="$2" limit="$3"
  shift 3
  local start=$SECONDS rc
  echo "== $name: $*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

{
  date -u
  nvidia-smi || true
  nvcc --version || true
  "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  echo "cores: $(nproc); archs: $FLEXTRON_CUDA_ARCHS; MAX_JOBS: $MAX_JOBS"
} >"$OUT/env.txt" 2>&1

# CUTLASS headers: the carried nvidia-cutlass wheel (pure headers + Python, installed without deps).
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" 2>/dev/null; then
  wheel="${CUTLASS_WHEEL:-$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)}"
  if [ -n "$wheel" ]; then
    step cutlass "$OUT/build.log" 120 "$PYTHON" -m pip install -q --no-deps --no-index --target "$SITE" "$wheel"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "cutlass: no nvidia-cutlass wheel found (carry .whl/, see docs/gpu.md)" | tee -a "$SUMMARY"
  fi
fi

if step build "$OUT/build.log" "$BUILD_S" "$PYTHON" setup.py build_ext --inplace; then
  "$PYTHON" -c "from flextron import _C; print(_C.build_info())" >>"$OUT/env.txt" 2>&1
  workers=()  # pytest-xdist, where installed: the CPU-side checks and torch.compile run in parallel
  if "$PYTHON" -c "import xdist" 2>/dev/null; then workers=(-n 4); fi
  step tests "$OUT/tests.log" "$TEST_S" "$PYTHON" -m pytest -q -ra "${workers[@]}" -m "cuda and not slow" \
    -p no:cacheprovider tests
  if [ -f benchmarks/bench_ops.py ]; then
    step bench "$OUT/bench.log" "$BENCH_S" "$PYTHON" benchmarks/bench_ops.py --device cuda --json "$OUT/bench_cuda.json"
  else
    echo "bench: benchmarks/bench_ops.py not present, skipped" | tee -a "$SUMMARY"
  fi
fi
echo "exit status: $status" | tee -a "$SUMMARY"
exit "$status"
