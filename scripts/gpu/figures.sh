#!/usr/bin/env bash
# The flatness figures on a GPU: calibrate FlatQuant W4A4KV4 at the paper's budget (its per-epoch losses are
# saved with the parameters), then `flatquant plot` (channel magnitudes of layer $LAYER, error landscape, loss
# per epoch). Writes $OUT/params (the parameters), $OUT/results (the ppl record), $OUT/figures (PNG + JSON).
#   OUT=/tmp/out MODEL=smollm2-135m DATA_DIR=shared/data bash scripts/gpu/figures.sh
set -eu
OUT=${OUT:?set OUT}; MODEL=${MODEL:-smollm2-135m}; LAYER=${LAYER:-5}
DATA=${DATA_DIR:+--data-dir $DATA_DIR}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FLATQUANT_GIT_COMMIT=${FLATQUANT_GIT_COMMIT:-}
python -m flatquant quantize --model "$MODEL" --output "$OUT/params" --compare "" --dataset wikitext2 \
  --results-dir "$OUT/results" --no-progress $DATA
python -m flatquant plot --params "$OUT/params" --model "$MODEL" --layer "$LAYER" --windows 4 --seqlen 512 \
  --out-dir "$OUT/figures" $DATA
