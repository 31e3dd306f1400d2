#!/usr/bin/env bash
# Every GPU measurement of the results tables, in sequence. Started detached by scripts/gpu/start.sh on the
# GPU machine; each step logs to $O and writes JSON records to $O/results (packed by monitor.sh).
set -u
W=/root/work; R=$W/repo; O=$W/out
mkdir -p "$O/results"
export PYTHONPATH=/root/site:$R PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$R"
ACC="python benchmarks/accuracy/run_accuracy.py --model /root/stage/model.gguf --data-dir $W/data --results-dir $O/results --work-dir $W/acc"
STEPS=${STEPS:-"calibcheck accuracy1 zeroshot calibcost kernels ablation"}
for step in $STEPS; do
  echo "[$(date +%T)] start $step" >> "$O/steps.log"
  case $step in
    calibcheck) python benchmarks/calib/bench_calib_layer.py --shape smollm2-135m --nsamples 16 --epochs 1 --check-graph \
                  --out "$O/calibcheck.json" > "$O/calibcheck.log" 2>&1 ;;
    accuracy1)  $ACC --parts baselines,flatquant > "$O/accuracy1.log" 2>&1 ;;
    zeroshot)   $ACC --parts zeroshot > "$O/zeroshot.log" 2>&1 ;;
    calibcost)  for s in smollm2-135m llama3-8b; do
                  python benchmarks/calib/bench_calib_layer.py --shape $s --epochs 2 \
                    --out "$O/results/calib_cost_$s-layer.json" >> "$O/calibcost.log" 2>&1; done ;;
    kernels)    OUT="$O/kernels" bash benchmarks/run_kernels_gpu.sh > "$O/kernels.log" 2>&1 ;;
    ablation)   $ACC --parts ablation,recipes > "$O/ablation.log" 2>&1 ;;
    gptq)       $ACC --parts gptq --zeroshot-batch-size ${ZS_BATCH:-64} > "$O/gptq.log" 2>&1 ;;
    longcalib)  $ACC --parts longcalib --zeroshot-batch-size ${ZS_BATCH:-64} --long-nsamples ${LONG_N:-256} \
                  --long-epochs ${LONG_E:-30} > "$O/longcalib.log" 2>&1 ;;
  esac
  echo "[$(date +%T)] end $step rc=$?" >> "$O/steps.log"
done
touch "$O/DONE"
