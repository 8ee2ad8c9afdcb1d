#!/usr/bin/env bash
# The routers' recipe, on the quality recipe's trained checkpoint (benchmarks/recipe_general.sh):
#
#   bash benchmarks/recipe_routers.sh                       # MODEL: the recipe's last checkpoint
#   MODEL=runs/mine OUT=runs/mine-routers bash benchmarks/recipe_routers.sh
#
#   1. copy      the checkpoint into OUT/model (the routers and the latency table are written there)
#   2. profile   the latency table at prefill 4x128 and decode 1x256, one thread, process CPU clock
#   3. static    the static router, started at the trained configurations (surrogate-model loop),
#                then FINETUNE_STEPS (default 0) of joint LLM + router fine-tuning at MODEL_LR;
#                each budget keeps the best of that, its start and the trained configurations
#   4. sequence  the sequence router over the trained configurations and the static router's,
#                fitted on the training text, its settings chosen on the validation text
#   5. bench     benchmarks/bench_routers.py on the test text at both shapes (nothing tuned on it)
#
# Every stage skips what is done.  Timings on the 2-core machine: docs/routers.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RECIPE=${RECIPE:-runs/recipe}
MODEL=${MODEL:-}
OUT=${OUT:-runs/routers}
# Joint LLM + static-router fine-tuning after the SM loop: off by default, because 300 steps at
# 1e-4 raised the validation loss of every trained configuration (docs/routers.md).
FINETUNE_STEPS=${FINETUNE_STEPS:-0}
MODEL_LR=${MODEL_LR:-1e-4}
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

if [[ -z $MODEL ]]; then
  latest=$RECIPE/train/checkpoints/latest.json
  [[ -f $latest ]] || { echo "no $latest: run benchmarks/recipe_general.sh first (or set MODEL)" >&2; exit 2; }
  MODEL=$RECIPE/train/checkpoints/$("$PY" -c "import json,sys;print(json.load(open(sys.argv[1]))['path'])" "$latest")
fi
T=$OUT/model
if [[ ! -f $T/config.json ]]; then
  stamp "copy $MODEL to $T"
  mkdir -p "$OUT"
  cp -r "$MODEL" "$T"
fi
if [[ ! -f $T/latency.json ]]; then
  stamp "profile"
  "$PY" -m flextron profile --model "$T" --prefill 4x128 --decode 1x256 --threads 1 --clock cpu \
      --repeats 5 --check 5
fi
has_router() { "$PY" -c "import json,sys;sys.exit(0 if sys.argv[2] in json.load(open(sys.argv[1]))['routers'] else 1)" \
    "$T/routers.json" "$1" 2>/dev/null; }
if ! has_router static; then
  stamp "static router"
  "$PY" -m flextron train-router --model "$T" --kind static --init trained \
      --budgets 0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0 --mlp-choices 12 --steps 150 \
      --finetune-steps "$FINETUNE_STEPS" --model-lr "$MODEL_LR" --threads 2 \
      --router-lr 3e-3 --latency-weight 20 --sm-threshold 0.2 --sm-updates 8 --sm-probe-blocks 2 \
      --seq-len 128 --tau 1.0 0.3 --data data/general/train --latency-shape prefill:4x128 \
      --log "$OUT/static-log.json"
fi
if ! has_router sequence; then
  stamp "sequence router"
  "$PY" -m flextron train-router --model "$T" --kind sequence --data data/general/train \
      --validation-data data/general/validation --seq-len 256 --prefix 32 --sequence-blocks 256 \
      --validation-blocks 64 --threads 2 --log "$OUT/sequence-fit.json"
fi
for shape in prefill:4x128 decode:1x256; do
  name=${shape%%:*}
  [[ -f $OUT/bench-$name/routers.json ]] && continue
  stamp "bench at $shape"
  "$PY" benchmarks/bench_routers.py --model "$T" --data data/general/test --latency-shape "$shape" \
      --routings uniform,static,sequence,trained --eval-blocks 32 --repeats "$([[ $name == decode ]] && echo 11 || echo 5)" \
      --timing-blocks "$([[ $name == decode ]] && echo 4 || echo 1)" --threads 1 --out "$OUT/bench-$name" \
      > "$OUT/bench-$name.md"
done
stamp "done: $OUT/bench-prefill.md, $OUT/bench-decode.md"
