#!/usr/bin/env bash
# The general-English recipe on the embedded SmolLM2-135M-Instruct, end to end:
#
#   bash benchmarks/recipe_general.sh                 # OUT=runs/recipe
#   STOP_AFTER=40 bash benchmarks/recipe_general.sh   # in slices: rerun until it prints the table
#   TRAIN_FLAGS="--device cuda --bf16" bash benchmarks/recipe_general.sh   # on a GPU
#
#   OUT, STEPS, P_FULL, BUDGET_WEIGHTS, LR, SEED, STOP_AFTER and TRAIN_FLAGS are read from the
#   environment.  On a CPU with AVX-512 BF16 every run trains in bf16 (--bf16: fp32 parameters,
#   optimizer state and loss; 1.7x the fp32 tokens/s) and the default is 900 steps, which fit the
#   same two hours as 600 fp32 steps; elsewhere fp32 and 600 steps (bf16 without those
#   instructions is slower than fp32).
#
#   1. corpus     make corpus (Debian packages -> data/general: ~9.3M training tokens, validation
#                 text for choosing settings, test text for reporting)
#   2. convert    importance ranking and the budgets' configurations chosen on general text
#   3. train      elastic distillation: STEPS x 4 blocks x 256 tokens, budgets 0.25/0.5/0.75, and
#      beside it the baselines (b): one pruned-and-distilled run per budget, STEPS/3 steps each
#      (equal share), one after the other; the two streams run side by side at one thread each
#   5. bench      benchmarks/bench_quality.py on the test text (flextron, the export in transformers and
#                 llama.cpp, baselines); settings are chosen with its --split validation
#
# Every stage skips what is done, and training resumes, so the recipe can be run in slices of
# STOP_AFTER steps.  Timings on the 2-core machine: docs/quality.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/recipe}
PY=${PYTHON:-.venv/bin/python}
P_FULL=${P_FULL:-0.05}  # the share of Flextron steps that train the full model
BUDGET_WEIGHTS=${BUDGET_WEIGHTS:-0.7,1.1,1.3}  # how often the Flextron run draws budgets 0.25, 0.5, 0.75
LR=${LR:-3e-4}  # peak learning rate of every run (Flextron and baselines alike)
SEED=${SEED:-0}
STOP_AFTER=${STOP_AFTER:-0}

stamp() { echo "[$(date +%H:%M:%S)] $*"; }

# Train (or resume) one run; returns non-zero while steps remain after a STOP_AFTER slice.
train_run() {
  local out=$1 steps=$2
  shift 2
  local resume=() slice=()
  [[ -f $out/checkpoints/latest.json ]] && resume=(--resume)
  [[ $STOP_AFTER -gt 0 ]] && slice=(--stop-after "$STOP_AFTER")
  "$PY" -m flextron train --model "$OUT/converted" --out "$out" --steps "$steps" --warmup-steps 8 \
      "${TRAIN[@]}" "${TRAIN_FLAGS[@]}" "$@" "${resume[@]}" "${slice[@]}" || exit 1
  "$PY" - "$out" "$steps" <<'EOF'
import json, sys
latest = json.load(open(f"{sys.argv[1]}/checkpoints/latest.json"))
sys.exit(0 if latest["step"] >= int(sys.argv[2]) else 3)
EOF
}

final_checkpoint() { echo "$1/checkpoints/$("$PY" -c "import json,sys;print(json.load(open(sys.argv[1]))['path'])" "$1/checkpoints/latest.json")"; }

stamp "corpus"; make -s corpus  # also builds and installs the package
# bf16 where the CPU has AVX-512 BF16 (TRAIN_FLAGS, when set, decides instead).
if [[ -z ${TRAIN_FLAGS+set} ]]; then
  "$PY" -c "import sys; from flextron.ops.info import bf16_is_fast; sys.exit(not bf16_is_fast())" \
      && TRAIN_FLAGS=--bf16 || TRAIN_FLAGS=
fi
read -ra TRAIN_FLAGS <<< "$TRAIN_FLAGS"  # extra `flextron train` options for every run
[[ " ${TRAIN_FLAGS[*]} " == *" --bf16 "* ]] && STEPS=${STEPS:-900} || STEPS=${STEPS:-600}
TRAIN=(--data data/general/train --seq-len 256 --batch-size 4 --lr "$LR" --freeze-embeddings
       --eval-every 0 --save-every 50 --val-blocks 4 --threads 1 --seed "$SEED")
stamp "training flags: ${TRAIN_FLAGS[*]:-fp32}, $STEPS steps, seed $SEED"
if [[ ! -f $OUT/converted/config.json ]]; then
  stamp "convert"
  "$PY" -m flextron convert --model default --out "$OUT/converted" --calib data/general/train \
      --samples 32 --seq-len 256 --budget-samples 8 --budgets 0.25,0.5,0.75
fi
baselines() {
  for budget in 0.75 0.5 0.25; do
    stamp "baseline (b) at $budget: $((STEPS / 3)) steps"
    train_run "$OUT/baseline-b/b$budget" $((STEPS / 3)) --p-full 0 --budgets "$budget" \
        --eval-budgets "$budget" || return $?
  done
}
# Side by side at one thread each: about 15% more tokens/s in all than one after the other at two
# threads (docs/training.md#throughput-tokenss-and-share-of-the-gemm-rate).
stamp "train: $STEPS Flextron steps, the baselines (b) beside them"
train_run "$OUT/train" "$STEPS" --p-full "$P_FULL" --budgets 0.25,0.5,0.75 --budget-weights "$BUDGET_WEIGHTS" \
    > "$OUT/train.log" 2>&1 &
flextron=$!
baselines > "$OUT/baselines.log" 2>&1 &
baseline=$!
wait $flextron && flextron_status=0 || flextron_status=$?
wait $baseline && baseline_status=0 || baseline_status=$?
if ((flextron_status == 1 || baseline_status == 1)); then
  stamp "training failed: see $OUT/train.log and $OUT/baselines.log"
  exit 1
fi
((flextron_status || baseline_status)) && { stamp "slice done: rerun to continue"; exit 0; }
stamp "bench"
"$PY" benchmarks/bench_quality.py --model "$(final_checkpoint "$OUT/train")" --converted "$OUT/converted" \
    --baseline-b "$OUT/baseline-b"
stamp "done"
