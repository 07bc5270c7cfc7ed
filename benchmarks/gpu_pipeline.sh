#!/usr/bin/env bash
# Issue 22's device run as one command: the whole product on one GPU under Ray, with the bare training step beside
# it (stages and what is measured: benchmarks/gpu_pipeline.py). About 7 minutes on an H100/H200 (estimated from
# the H200's measured step and compile times; --steps and --eval-samples shorten it).
#
#   bash benchmarks/gpu_wheels.sh        # first, here (a package index): what the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_pipeline.sh      # there, with .whl/ carried beside the working tree
#
# Writes into $OUT (default benchmarks/results): gpu_pipeline.json, gpu_pipeline.log, each stage's log under
# gpu_pipeline_logs/, nvidia-smi-pipeline.txt. Extra arguments go to gpu_pipeline.py (e.g. --steps 120).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu-pipeline}
mkdir -p "$OUT/gpu_pipeline_logs"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sagan-site .whl/*.whl \
    || { echo "error: the wheels in .whl/ did not install; rebuild them with benchmarks/gpu_wheels.sh"; exit 1; }
  export PYTHONPATH=/tmp/sagan-site${PYTHONPATH:+:$PYTHONPATH}
  # --no-deps checks no version: every wheel's requirements against the image's packages, before any stage
  $PY benchmarks/gpu_wheels.py check --target /tmp/sagan-site || exit 1
fi
nvidia-smi > "$OUT/nvidia-smi-pipeline.txt" 2>&1
rm -rf "$WORK"
# The inductor and Triton caches of this run only: the training stage compiles cold (a reported figure), the
# bare step and the resume after it find them warm.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton"
timeout "${PIPELINE_TIMEOUT_S:-540}" $PY benchmarks/gpu_pipeline.py --work "$WORK" --out "$OUT/gpu_pipeline.json" "$@" \
  2>&1 | tee "$OUT/gpu_pipeline.log"
code=${PIPESTATUS[0]}
cp "$WORK"/*.log "$OUT/gpu_pipeline_logs/" 2>/dev/null
echo "gpu_pipeline exit: $code"
exit "$code"
