#!/usr/bin/env bash
# Issue 20, item 4, as one short device check (not run yet: no GPU was lent to the session that wrote
# it). Study throughput on one GPU: a cell's seeds packed against one trial per GPU (1 worker) and
# against fractional packing (4 workers sharing the GPU, as `gpus_per_trial: 0.25`), with tokens/s,
# FLOP/s and MFU per trial in the JSON. Needs the SVA and KWS samples at ../shared/data (the
# quickstart generates its data). PEAK_TFLOPS: the card's float32 peak (H100/H200 SXM: 67).
#
#   OUT=/tmp/out PEAK_TFLOPS=67 bash tools/gpu_throughput.sh
set -euo pipefail
export PYTHONPATH=$PWD HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
OUT=${OUT:-.}
PEAK=${PEAK_TFLOPS:-67}
CASES=${CASES:-quickstart sva kws}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/card.txt"
for workers in 1 4; do
  python -m scaling.cli bench --no-attention --device cuda --study-throughput $CASES --throughput-workers $workers \
    --throughput-rounds 1 --peak-tflops "$PEAK" --json "$OUT/study_throughput_gpu_w$workers.json"
done
