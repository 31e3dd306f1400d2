#!/usr/bin/env bash
# GPU driver for the W4A4 kernels (issue 5): tests on CUDA, then both benchmarks -> JSON under $OUT.
# Run from the repo root on the GPU machine:   OUT=/some/dir bash benchmarks/run_kernels_gpu.sh
# Budget: at most ~9 minutes on an H100 (step limits 240 + 100 + 200 s, plus start-up); the JSON files
# are rewritten after every record, so a step cut short still leaves its finished records.
set -u
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv 2>/dev/null || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/kernels_env.txt"

echo "== kernel tests (cuda) =="
timeout 240 python -m pytest -q tests/kernels -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/kernels_pytest.txt" | tail -25
echo "pytest rc=${PIPESTATUS[0]}" | tee -a "$OUT/kernels_pytest.txt"

echo "== fused transform + quantize benchmark (paper Table 6) =="
timeout 100 python benchmarks/bench_fused_transform.py --out "$OUT/bench_fused_transform.json" 2>&1 \
  | tee "$OUT/bench_fused_transform.txt"
echo "fused bench rc=${PIPESTATUS[0]}"

echo "== W4A4 linear benchmark =="
timeout 200 python benchmarks/bench_w4a4_linear.py --out "$OUT/bench_w4a4_linear.json" 2>&1 \
  | tee "$OUT/bench_w4a4_linear.txt"
echo "w4a4 bench rc=${PIPESTATUS[0]}"
ls -la "$OUT"
