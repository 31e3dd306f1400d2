#!/usr/bin/env bash
# GPU driver for the W4A4 kernels (issue 5): tests on CUDA, then both benchmarks -> JSON under $OUT.
# Run from the repo root on the GPU machine:   OUT=/some/dir bash benchmarks/run_kernels_gpu.sh
# Steps (KERNEL_STEPS): tests, fused, linear, tma (bench_tma_gemm.py: the large-M GEMM's config sweep; TMA_ARGS adds
# e.g. --ms 8192,16384; not in the default set), decode (bench_decode_parts.py; DECODE_ARGS adds e.g. --no-sweep),
# ncu (a profiler capture of the decode transform kernels, diagnostic; not in the default set), ncu_cases
# (benchmarks/probes/profile_cases.py under Nsight Compute: decode GEMMs and the prefill transform, diagnostic).
# All four take ~11 minutes (step limits 300 + 120 + 210 + 240 s; TEST_TIMEOUT, LINEAR_TIMEOUT and
# DECODE_TIMEOUT change three of them): more than one device call allows, so run them as two calls.
# The JSON files are rewritten after every record, so a step cut short still leaves its finished records.
set -u
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv 2>/dev/null || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/kernels_env.txt"

STEPS="${KERNEL_STEPS:-tests fused linear decode}"  # any subset, e.g. KERNEL_STEPS="fused linear"
if [[ " $STEPS " == *" tests "* ]]; then
echo "== kernel tests (cuda) =="
timeout ${TEST_TIMEOUT:-300} python -m pytest -q ${TEST_ARGS:-tests/kernels} -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/kernels_pytest.txt" | tail -25
echo "pytest rc=${PIPESTATUS[0]}" | tee -a "$OUT/kernels_pytest.txt"
fi

if [[ " $STEPS " == *" fused "* ]]; then
echo "== fused transform + quantize benchmark (paper Table 6) =="
timeout 120 python benchmarks/kernels/bench_fused_transform.py --out "$OUT/bench_fused_transform.json" 2>&1 \
  | tee "$OUT/bench_fused_transform.txt"
echo "fused bench rc=${PIPESTATUS[0]}"
fi

if [[ " $STEPS " == *" linear "* ]]; then
echo "== W4A4 linear benchmark =="
# The pinned Triton int8 full-linear route is left out (the slowest route at M >= 256 in the H100 run); its GEMM is
# still timed in the GEMM-only part.
timeout ${LINEAR_TIMEOUT:-210} python benchmarks/kernels/bench_w4a4_linear.py --routes auto,decode,int_mm,scaled_mm,tma_int8,tma_fp8 --rep-ms 12 \
  --out "$OUT/bench_w4a4_linear.json" 2>&1 \
  | tee "$OUT/bench_w4a4_linear.txt"
echo "w4a4 bench rc=${PIPESTATUS[0]}"
fi
if [[ " $STEPS " == *" tma "* ]]; then
echo "== large-M GEMM alone: the TMA kernel's configs against cuBLASLt =="
timeout ${TMA_TIMEOUT:-240} python benchmarks/kernels/bench_tma_gemm.py ${TMA_ARGS:-} --out "$OUT/bench_tma_gemm.json" 2>&1 \
  | tee "$OUT/bench_tma_gemm.txt" | grep -v "^exactness" | cut -c1-400
echo "tma bench rc=${PIPESTATUS[0]}"
fi
if [[ " $STEPS " == *" decode "* ]]; then
echo "== decode (M <= 16) breakdown =="
timeout ${DECODE_TIMEOUT:-240} python benchmarks/kernels/bench_decode_parts.py ${DECODE_ARGS:-} --out "$OUT/bench_decode_parts.json" 2>&1 \
  | tee "$OUT/bench_decode_parts.txt"
echo "decode bench rc=${PIPESTATUS[0]}"
fi
if [[ " $STEPS " == *" ncu "* ]]; then
echo "== ncu: the decode transform kernels' per-instruction stalls (diagnostic, not a benchmark) =="
# Source counters with per-SASS-line warp stall samples for the block and split transforms at M = 1 and 16
# (benchmarks/probes/probe_decode_latency.py --eager runs each piece 3 times). Printed as CSV for offline reading.
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 240 "$NCU" --section WarpStateStats --section SourceCounters --section LaunchStats -k "regex:_fused_(block|split)_kernel" \
  --launch-count 12 -f -o "$OUT/ncu_transform" python benchmarks/probes/probe_decode_latency.py --eager > "$OUT/ncu_transform_log.txt" 2>&1
echo "ncu rc=$?"
"$NCU" -i "$OUT/ncu_transform.ncu-rep" --page details > "$OUT/ncu_transform_details.txt" 2>&1 || true
"$NCU" -i "$OUT/ncu_transform.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_transform_source.csv" 2>&1 || true
ls -la "$OUT"/ncu_transform* | tail -5
fi
if [[ " $STEPS " == *" ncu_cases "* ]]; then
echo "== ncu: which unit limits the decode GEMMs and the prefill transform (diagnostic, not a benchmark) =="
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 240 "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
  --section SchedulerStats -f -o "$OUT/ncu_cases" python benchmarks/probes/profile_cases.py ${PROFILE_ARGS:-} \
  > "$OUT/ncu_cases_log.txt" 2>&1
echo "ncu rc=$?"
"$NCU" -i "$OUT/ncu_cases.ncu-rep" --page details > "$OUT/ncu_cases_details.txt" 2>&1 || true
rm -f "$OUT/ncu_cases.ncu-rep"
fi
ls -la "$OUT"
