#!/usr/bin/env bash
# Issue 27's settings on a GPU, resumable: Table 15 from the committed W4A4KV4 paper-recipe parameters (no
# calibration), then Tables 11-13 cheapest rows first, then the accuracy variants, each call stopping new rows
# after $MAX_SECONDS in all (done.json in $WORK lets the next call continue). Records go to $OUT/settings.
#   OUT=/tmp/out MODEL=/root/stage/model.gguf WORK=/root/st MAX_SECONDS=420 bash scripts/gpu/settings.sh
set -eu
OUT=${OUT:?set OUT}; MODEL=${MODEL:-smollm2-135m}; WORK=${WORK:-/root/st}; MAX_SECONDS=${MAX_SECONDS:-420}
export PYTHONPATH=${PYTHONPATH:-$PWD} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK/params" "$OUT/settings"
[ -d "$WORK/params/w4a4kv4" ] || cp -r checks/smollm2-w4a4kv4-paper-params "$WORK/params/w4a4kv4"
START=$(date +%s)
left() { echo $(( MAX_SECONDS - ($(date +%s) - START) )); }
run() { python benchmarks/accuracy/run_settings.py --model "$MODEL" --out-dir "$WORK" --results-dir "$OUT/settings" "$@"; }
run --tables 15 --no-zeroshot
[ "$(left)" -gt 0 ] && run --tables 11,12,13 --max-seconds "$(left)"
[ "$(left)" -gt 0 ] && run --tables "" --variants base,ref,alpha0.3 --max-seconds "$(left)"
true
