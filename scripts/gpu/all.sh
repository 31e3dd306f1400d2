#!/usr/bin/env bash
# Every GPU measurement of the results tables, in sequence. Started detached by scripts/gpu/start.sh on the
# GPU machine; each step logs to $O and writes JSON records to $O/results (copied back by monitor.sh).
set -u
W=/root/work; R=$W/repo; O=$W/out
mkdir -p "$O/results"
export PYTHONPATH=/root/site:$R PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$R"
STEPS=${STEPS:-"accuracy1 kernels accuracy2 calibcost"}
for step in $STEPS; do
  echo "[$(date +%T)] start $step" >> "$O/steps.log"
  case $step in
    accuracy1) python benchmarks/run_accuracy.py --model /root/stage/model.gguf --data-dir $W/data \
                 --results-dir "$O/results" --work-dir $W/acc --parts baselines,flatquant > "$O/accuracy1.log" 2>&1 ;;
    kernels)   OUT="$O/kernels" bash benchmarks/run_kernels_gpu.sh > "$O/kernels.log" 2>&1 ;;
    accuracy2) python benchmarks/run_accuracy.py --model /root/stage/model.gguf --data-dir $W/data \
                 --results-dir "$O/results" --work-dir $W/acc --parts zeroshot,ablation,recipes > "$O/accuracy2.log" 2>&1 ;;
    calibcost) python benchmarks/bench_calib_layer.py --out "$O/results/calib_cost_llama3-8b-layer.json" \
                 > "$O/calibcost.log" 2>&1 ;;
  esac
  echo "[$(date +%T)] end $step rc=$?" >> "$O/steps.log"
done
touch "$O/DONE"
