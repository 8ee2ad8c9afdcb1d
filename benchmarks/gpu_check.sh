#!/usr/bin/env bash
# The one-call GPU check for a lent machine (docs/gpu.md): within DEADLINE_S seconds (default
# 470, under 8 minutes) it installs the carried CUTLASS headers, builds flextron._C with CUDA,
# runs the 30-second smoke script (every op once per path, maximum error printed), then the
# CUDA tests op by op with a per-test timeout, then the op benchmark (results checked against
# PyTorch before any speed is printed), and writes one JSON of everything. Every step is timed;
# a step that no longer fits the deadline is skipped and the summary says so. A failed build
# skips the rest; a failed smoke or test step does not.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; runs in the repo root
#
# A warm rerun (same machine, same sources) skips the build: the build directory lives in the
# repo's ignored build/ folder, and a hash of the sources is stored beside it.
#
# Output in $OUT (default ./gpu_check_out), at most 8 files: summary.txt, gpu_check.json (all
# results: steps, smoke, per-test-file counts and failures, benchmark rows), env.txt,
# build.log, smoke.log, tests.log, bench.log.
#
# Environment: OUT, PYTHON (python3), DEADLINE_S (470), FLEXTRON_CUDA_ARCHS (90a), MAX_JOBS
# (all cores), CUTLASS_WHEEL (.whl/nvidia_cutlass-*.whl, used when no CUTLASS headers are
# installed), TEST_TIMEOUT_S (per test, 90), BENCH_S (the benchmark's share, 120),
# SMOKE_S (60), BUILD_S (300).
set -u
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
DEADLINE_S="${DEADLINE_S:-470}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-90}"
BUILD_S="${BUILD_S:-300}" SMOKE_S="${SMOKE_S:-60}" BENCH_S="${BENCH_S:-120}"
export FLEXTRON_CUDA=1
export FLEXTRON_CUDA_ARCHS="${FLEXTRON_CUDA_ARCHS:-90a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FLEXTRON_BUILD_DIR="${FLEXTRON_BUILD_DIR:-$PWD/build/gpu_check}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts under benchmarks/ import flextron
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # per-step JSON/XML, merged into gpu_check.json
SITE=/tmp/flextron-site
mkdir -p "$OUT" "$FLEXTRON_BUILD_DIR"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
: >"$WORK/steps.tsv"
for log in build smoke tests bench; do : >"$OUT/$log.log"; done
status=0
START=$SECONDS

left() { echo $((DEADLINE_S - (SECONDS - START))); }

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LOG LIMIT_S RESERVE_S CMD...: runs CMD for at most min(LIMIT_S, time left - RESERVE_S)
# seconds (RESERVE_S: what the later steps need), logs its output, records the outcome; skipped
# (rc 125) when under 10 seconds would be left for it.
step() {
  local name="$1" log="$2" limit="$3" reserve="$4"
  shift 4
  local budget=$(($(left) - reserve))
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 10 ]; then
    note "$name: SKIPPED, no time left ($(left) s to the deadline)"
    printf '%s\tskipped\t0\t0\n' "$name" >>"$WORK/steps.tsv"
    return 125
  fi
  local start=$SECONDS rc
  echo "== $name (limit ${limit} s): $*" >>"$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) how="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="TIMED OUT after ${limit} s (rc=$rc)"
  note "$name: $how (${took} s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >>"$WORK/steps.tsv"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

{
  date -u
  nvidia-smi || true
  nvcc --version || true
  "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  echo "cores: $(nproc); archs: $FLEXTRON_CUDA_ARCHS; MAX_JOBS: $MAX_JOBS; deadline: $DEADLINE_S s"
} >"$OUT/env.txt" 2>&1

# CUTLASS headers: the carried nvidia-cutlass wheel (headers + Python, installed without deps).
if [ -z "${CUTLASS_DIR:-}" ] && ! "$PYTHON" -c "import cutlass_library" 2>/dev/null; then
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
sources_hash=$( (find csrc cmake -type f | sort | xargs cat; cat CMakeLists.txt setup.py;
                 echo "$FLEXTRON_CUDA_ARCHS"; "$PYTHON" -c "import sys, torch; print(sys.version, torch.__version__)") |
               sha256sum | cut -d' ' -f1)
built=0
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sources_hash" ] && ls flextron/_C*.so >/dev/null 2>&1; then
  note "build: SKIPPED, flextron._C is up to date (warm rerun)"
  printf 'build\tskipped-up-to-date\t0\t0\n' >>"$WORK/steps.tsv"
  built=1
elif step build "$OUT/build.log" "$BUILD_S" 60 "$PYTHON" setup.py build_ext --inplace; then
  echo "$sources_hash" >"$stamp"
  built=1
fi

if [ "$built" -eq 1 ]; then
  "$PYTHON" -c "from flextron import _C; print(_C.build_info())" >>"$OUT/env.txt" 2>&1

  # Reserve for the later steps: the benchmark and the JSON.
  step smoke "$OUT/smoke.log" "$SMOKE_S" $((BENCH_S + 10)) \
    "$PYTHON" benchmarks/gpu_smoke.py --json "$WORK/smoke.json"

  # The CUDA tests, one op at a time, each test under TEST_TIMEOUT_S (the thread method ends the
  # run of a file whose test hangs inside a CUDA call, with every thread's stack in the log;
  # under xdist the worker is replaced and the file goes on). Each file gets a share of the
  # time left before the benchmark's reserve in proportion to its number of tests.
  workers=()
  if "$PYTHON" -c "import xdist" 2>/dev/null; then workers=(-n 6); fi
  timeouts=()
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    timeouts=(--timeout "$TEST_TIMEOUT_S" --timeout-method thread)
  else
    note "tests: pytest-timeout missing, no per-test timeout (only each file's limit)"
  fi
  # The op tests (tests/ops/test_<op>.py) and the timer (tests/test_timing.py); `-m cuda`
  # selects their CUDA tests.
  files=(route routed_nested_mlp nested_linear nested_mlp varhead_attention backends timing)
  declare -A count path
  paths=()
  for op in "${files[@]}"; do
    path[$op]="tests/ops/test_$op.py"
    [ "$op" = timing ] && path[$op]="tests/test_timing.py"
    paths+=("${path[$op]}")
  done
  timeout 60 "$PYTHON" -m pytest -q --collect-only -p no:cacheprovider -m "cuda and not slow" \
    "${paths[@]}" 2>/dev/null | sed -n 's|^tests/\(ops/\)\{0,1\}test_\([a-z_]*\)\.py::.*|\2|p' \
    | sort | uniq -c >"$WORK/counts.txt"
  remaining_tests=0
  for op in "${files[@]}"; do
    count[$op]=$(awk -v op="$op" '$2 == op {print $1}' "$WORK/counts.txt")
    count[$op]=${count[$op]:-1}
    remaining_tests=$((remaining_tests + count[$op]))
  done
  for op in "${files[@]}"; do
    share=$(( ($(left) - BENCH_S - 10) * count[$op] / remaining_tests ))
    [ "$share" -lt 20 ] && share=20
    remaining_tests=$((remaining_tests - count[$op]))
    step "tests:$op (${count[$op]} tests)" "$OUT/tests.log" "$share" $((BENCH_S + 10)) \
      "$PYTHON" -m pytest -q -ra "${workers[@]}" "${timeouts[@]}" -m "cuda and not slow" \
      -p no:cacheprovider --junitxml "$WORK/tests_$op.xml" "${path[$op]}"
  done

  if [ -f benchmarks/bench_ops.py ]; then
    step bench "$OUT/bench.log" "$BENCH_S" 10 \
      "$PYTHON" benchmarks/bench_ops.py --device cuda --json "$WORK/bench_cuda.json"
  fi
fi

# Everything in one JSON: the steps, the smoke results, per-file test counts and failures, the
# benchmark rows.
"$PYTHON" - "$WORK" "$OUT/gpu_check.json" "$OUT/env.txt" <<'EOF' || note "json: failed"
import json, pathlib, sys
import xml.etree.ElementTree as ET
work, target, env = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
def load(name):
    path = work / name
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError as error:
        return {"unreadable": str(error)}
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    steps.append({"step": name, "rc": rc, "seconds": int(seconds), "limit_s": int(limit)})
tests = {}
for xml in sorted(work.glob("tests_*.xml")):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}: "
              f"{(bad.get('message') or '').splitlines()[0][:300] if bad.get('message') else ''}"
              for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    tests[xml.stem.removeprefix("tests_")] = {
        key: suite.get(key) for key in ("tests", "failures", "errors", "skipped", "time")
    } | {"failed": failed}
report = {"env": env.read_text() if env.exists() else None, "steps": steps, "smoke": load("smoke.json"),
          "tests": tests, "bench": load("bench_cuda.json")}
target.write_text(json.dumps(report, indent=1))
print(f"wrote {target}")
EOF
rm -rf "$WORK"
note "total: $((SECONDS - START)) s of $DEADLINE_S; exit status: $status"
exit "$status"
