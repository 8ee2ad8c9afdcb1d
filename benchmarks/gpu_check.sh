#!/usr/bin/env bash
# The one-call GPU check for a lent machine (docs/gpu.md): within DEADLINE_S seconds (default
# 470, under 8 minutes) it installs the carried CUTLASS headers, builds flextron._C with CUDA,
# runs the 30-second smoke script (every op once per path, maximum error printed), then the
# CUDA tests (benchmarks/test_phase.py: one pytest session per group of ops, core tests first,
# a crashed or faulted test reported and the rest run in a fresh process), then the op
# benchmark (results checked against PyTorch before any speed is printed), and writes one JSON
# of everything. Every step is timed; a step that no longer fits the deadline is skipped and
# the summary says so. A failed build skips the rest; a failed smoke or test step does not.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine; runs in the repo root
#   bash benchmarks/gpu_check.sh --rehearse           # every step on the CPU: CUDA compile, smoke
#                                                     # on the CPU kernels, the ops' CPU tests, CUDA
#                                                     # tests listed as "not run: no device"
#   bash benchmarks/gpu_check.sh --rehearse --fast    # the same without the compile, a few tests
#                                                     # in one session (under a minute; tests/benchmarks/test_gpu_check.py)
#
# A warm rerun (same machine, same sources) skips the build: the build directory lives in the
# repo's ignored build/ folder, and a hash of the sources is stored beside it.
#
# Output in $OUT (default ./gpu_check_out), 8 files: summary.txt (environment, then one line per
# step), gpu_check.json (everything: steps, smoke, per-op test counts and failures, benchmark
# rows), tests.json (per op and test: passed / failed / skipped / not reached, rewritten after
# every pytest session, so it is there even when the run is cut short), junit.xml (every
# session's JUnit report), build.log, smoke.log, tests.log (pytest's -rA lines), bench.log.
#
# Environment: OUT, PYTHON (python3), DEADLINE_S (470), FLEXTRON_CUDA_ARCHS (90a), MAX_JOBS
# (all cores), CUTLASS_WHEEL (.whl/nvidia_cutlass-*.whl, used when no CUTLASS headers are
# installed), BENCH_S (the benchmark's share, 120), SMOKE_S (60), BUILD_S (300), TEST_TIMEOUT_S
# (per test where pytest-timeout is installed, 90),
# FLEXTRON_ROUTED_GEMM (auto | sm90 | sm80: the routed MLP's grouped GEMM, docs/gpu.md).
set -u
cd "$(dirname "$0")/.."

REHEARSE=0 FAST=0
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    --fast) FAST=1 ;;
    *) echo "usage: $0 [--rehearse [--fast]]" >&2; exit 2 ;;
  esac
done
if [ "$FAST" -eq 1 ] && [ "$REHEARSE" -eq 0 ]; then echo "$0: --fast is a form of --rehearse" >&2; exit 2; fi

OUT="${OUT:-$PWD/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
DEADLINE_S="${DEADLINE_S:-470}"
BUILD_S="${BUILD_S:-300}" SMOKE_S="${SMOKE_S:-60}" BENCH_S="${BENCH_S:-120}"
export FLEXTRON_CUDA=1
export FLEXTRON_CUDA_ARCHS="${FLEXTRON_CUDA_ARCHS:-90a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FLEXTRON_BUILD_DIR="${FLEXTRON_BUILD_DIR:-$PWD/build/gpu_check}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts under benchmarks/ import flextron
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # per-step JSON, merged into gpu_check.json
SITE=/tmp/flextron-site
mkdir -p "$OUT" "$FLEXTRON_BUILD_DIR"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
: >"$WORK/steps.tsv"
for log in build smoke tests bench; do : >"$OUT/$log.log"; done
rm -f "$OUT/tests.json" "$OUT/junit.xml" "$OUT/gpu_check.json"
status=0
START=$SECONDS

# The rehearsal's stand-ins for the device steps.
device=cuda smoke_args=() test_args=() bench_args=(--device cuda)
if [ "$REHEARSE" -eq 1 ]; then
  device=cpu smoke_args=(--device cpu) test_args=(--rehearse --max-per-op 3)
  bench_args=(--device cpu --host-overhead)
  if [ "$FAST" -eq 1 ]; then smoke_args+=(--quick) test_args=(--rehearse --max-per-op 1 --one-session); fi
fi

left() { echo $((DEADLINE_S - (SECONDS - START))); }

note() { echo "$*" | tee -a "$SUMMARY"; }

record() {  # record NAME RC SECONDS LIMIT_S
  printf '%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"
}

# step NAME LOG LIMIT_S RESERVE_S CMD...: runs CMD for at most min(LIMIT_S, time left - RESERVE_S)
# seconds (RESERVE_S: what the later steps need; CMD sees the limit as $STEP_LIMIT_S), logs its
# output, records the outcome; skipped (rc 125) when under 10 seconds would be left for it.
step() {
  local name="$1" log="$2" limit="$3" reserve="$4"
  shift 4
  local budget=$(($(left) - reserve))
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 10 ]; then
    note "$name: SKIPPED, no time left ($(left) s to the deadline)"
    record "$name" skipped 0 0
    return 125
  fi
  local start=$SECONDS rc
  echo "== $name (limit ${limit} s): $*" >>"$log"
  STEP_LIMIT_S=$limit timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) how="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="TIMED OUT after ${limit} s (rc=$rc)"
  note "$name: $how (${took} s)"
  record "$name" "$rc" "$took" "$limit"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

{
  date -u
  if [ "$REHEARSE" -eq 1 ]; then echo "REHEARSAL on the CPU: $*"; fi
  nvidia-smi 2>&1 | head -n 15
  nvcc --version 2>&1 | tail -n 2
  "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  echo "cores: $(nproc); archs: $FLEXTRON_CUDA_ARCHS; MAX_JOBS: $MAX_JOBS; deadline: $DEADLINE_S s"
} >>"$SUMMARY" 2>&1

# CUTLASS headers: the carried nvidia-cutlass wheel (headers + Python, installed without deps).
if [ "$FAST" -eq 0 ] && [ -z "${CUTLASS_DIR:-}" ] && ! "$PYTHON" -c "import cutlass_library" 2>/dev/null; then
  wheel="${CUTLASS_WHEEL:-$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)}"
  if [ -n "$wheel" ]; then
    step cutlass "$OUT/build.log" 60 0 "$PYTHON" -m pip install -q --no-deps --no-index --no-compile \
      --target "$SITE" "$wheel"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    note "cutlass: no nvidia-cutlass wheel found (carry .whl/, see docs/gpu.md)"
  fi
fi

# Skip the build when flextron._C was built here from these very sources and settings.
stamp="$FLEXTRON_BUILD_DIR/sources.sha256"
sources_hash() {
  (find csrc cmake -type f | sort | xargs cat; cat CMakeLists.txt setup.py
   echo "$FLEXTRON_CUDA_ARCHS"; "$PYTHON" -c "import sys, torch; print(sys.version, torch.__version__)") |
    sha256sum | cut -d' ' -f1
}
built=0
if [ "$FAST" -eq 1 ]; then
  note "build: SKIPPED (--fast: no CUDA compile; the flextron._C already built is used)"
  record build skipped 0 0
  built=1
elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(sources_hash)" ] && ls flextron/_C*.so >/dev/null 2>&1; then
  note "build: SKIPPED, flextron._C is up to date (warm rerun)"
  record build skipped-up-to-date 0 0
  built=1
elif step build "$OUT/build.log" "$BUILD_S" 60 "$PYTHON" setup.py build_ext --inplace; then
  sources_hash >"$stamp"
  built=1
fi

if [ "$built" -eq 1 ]; then
  "$PYTHON" -c "from flextron import _C; print('build:', _C.build_info())" >>"$SUMMARY" 2>&1

  # Reserve for the later steps: a minute of tests and the benchmark.
  step smoke "$OUT/smoke.log" "$SMOKE_S" $((BENCH_S + 70)) \
    "$PYTHON" benchmarks/gpu_smoke.py "${smoke_args[@]}" --json "$WORK/smoke.json"

  # The tests get all the time before the benchmark's share; test_phase.py keeps 15 s of its
  # limit to write its reports after the last session it cut short.
  tests_s=$(($(left) - BENCH_S - 10))
  step tests "$OUT/tests.log" "$tests_s" $((BENCH_S + 10)) \
    bash -c '"$0" benchmarks/test_phase.py --budget $((STEP_LIMIT_S - 15)) "$@"' "$PYTHON" \
    --json "$OUT/tests.json" --junit "$OUT/junit.xml" --work "$WORK/tests" "${test_args[@]}"

  if [ "$FAST" -eq 1 ]; then
    note "bench: SKIPPED (--fast)"
    record bench skipped 0 0
  else
    step bench "$OUT/bench.log" "$BENCH_S" 10 \
      "$PYTHON" benchmarks/bench_ops.py "${bench_args[@]}" --json "$WORK/bench.json"
  fi
fi

# Everything in one JSON: the steps, the smoke results, per-op test counts and failures, the
# benchmark rows.
"$PYTHON" - "$WORK" "$OUT" "$DEADLINE_S" "$REHEARSE" "$device" <<'PY' || note "json: failed"
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def load(path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError as error:
        return {"unreadable": str(error)}
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    steps.append({"step": name, "rc": rc, "seconds": int(seconds), "limit_s": int(limit)})
tests = load(out / "tests.json") or {"ops": {}}
per_op = {op: entry["counts"] | {"failed_tests": entry["failed"]} for op, entry in tests.get("ops", {}).items()}
report = {"rehearsal": sys.argv[4] == "1", "device": sys.argv[5], "deadline_s": int(sys.argv[3]),
          "environment": (out / "summary.txt").read_text(), "steps": steps, "smoke": load(work / "smoke.json"),
          "tests": per_op, "test_sessions": tests.get("sessions"), "bench": load(work / "bench.json")}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"wrote {out / 'gpu_check.json'}")
PY
rm -rf "$WORK"
note "total: $((SECONDS - START)) s of $DEADLINE_S; exit status: $status"
exit "$status"
