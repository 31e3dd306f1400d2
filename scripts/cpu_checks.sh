#!/usr/bin/env bash
# CPU checks quoted in issue notes (see checks/README.md). Run from the repository root; ~30 min on 2 cores.
set -euo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=checks/cpu
PARAMS=checks/smollm2-w4a4kv4-paper-params
mkdir -p "$OUT"
# 1. the README's main job, timed
start=$SECONDS
flatquant quantize --model smollm2-135m --preset cpu-quick --output /tmp/flatquant-cpu-quick --no-resume \
  --results-dir "$OUT/main-job" --no-progress
echo "main job wall seconds: $((SECONDS - start))" | tee "$OUT/main-job/wall_seconds.txt"
# 2. which quantizer carries the error: the GPU-calibrated parameters with one part left at 16 bits
for bits in "4 4 4" "16 4 4" "4 16 4" "4 4 16" "4 16 16" "16 4 16" "16 16 4"; do
  set -- $bits
  flatquant eval --model smollm2-135m --method flatquant --params "$PARAMS" --w-bits "$1" --a-bits "$2" \
    --kv-bits "$3" --dataset wikitext2 --max-windows 4 --results-dir "$OUT/bit-breakdown" --no-progress
done
for m in fp16 quarot; do
  flatquant eval --model smollm2-135m --method $m --dataset wikitext2 --max-windows 4 \
    --results-dir "$OUT/bit-breakdown" --no-progress
done
# 3. GPTQ on the saved (RTN-trained) parameters vs their RTN weights, same 4 windows (~14 min)
for wq in rtn gptq; do
  flatquant eval --model smollm2-135m --method flatquant --params "$PARAMS" --weight-quantizer $wq \
    --calib-samples 32 --calib-seqlen 2048 --dataset wikitext2 --max-windows 4 --results-dir "$OUT/gptq" --no-progress
done
flatquant eval --model smollm2-135m --method flatquant --params "$PARAMS" --weight-quantizer gptq --w-bits 4 \
  --a-bits 16 --kv-bits 16 --calib-samples 32 --calib-seqlen 2048 --dataset wikitext2 --max-windows 4 \
  --results-dir "$OUT/gptq" --no-progress
