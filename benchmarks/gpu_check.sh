#!/usr/bin/env bash
# Issue 13's GPU measurement as one command, on one GPU (about 7 minutes on an H100/H200, compilation included):
#
#   OUT=benchmarks/results bash benchmarks/gpu_check.sh
#
# Needs only torch (with CUDA) and this repository's sagan/; torch-fidelity, webdataset and braceexpand (for the
# evaluation timing) come from pip, or from wheels in .whl/ on a machine without a package index.
# Writes: train_step.json (every variant, the learning check, FLOPs, MFU), eval_speed.json (a 50k FID + IS pass),
# their logs, and nvidia-smi.txt. Each part has its own time limit, so one that hangs does not lose the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sagan-site .whl/*.whl \
    && export PYTHONPATH=/tmp/sagan-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Variants run most important first; none starts after ${TRAIN_BUDGET_S}s, nor a compiled one that would overrun it.
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-270}
timeout $((TRAIN_BUDGET_S + 200)) $PY benchmarks/train_step.py --preset imagenet128 --learning-steps 200 --profile 10 \
  --budget-s "$TRAIN_BUDGET_S" --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log" | grep -v Warning
echo "train_step exit: ${PIPESTATUS[0]}"
timeout 180 $PY benchmarks/eval_speed.py --num-samples 50000 --out "$OUT/eval_speed.json" 2>&1 | tee "$OUT/eval_speed.log"
echo "eval_speed exit: ${PIPESTATUS[0]}"
