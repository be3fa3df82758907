#!/usr/bin/env bash
# The training-step comparison of benchmarks/train_step.py on a GPU: every QCRD cost option vs DSS, fp32 and bf16
# (qcrd_bf16), timed (median of 10 after a warm-up) plus the operation count, and the independent HF
# Seq2SeqTrainer DSS beside ours (needs `accelerate`). Writes JSON next to the table; exits early without a GPU.
#   benchmarks/gpu_train_step.sh [OUT_DIR]     (default: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to torch: nothing to measure (the CPU run is python benchmarks/train_step.py)" >&2
  exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv | tee "$out/gpu.txt"
uptime | tee -a "$out/gpu.txt"
for batch in 8 32; do
  python benchmarks/train_step.py --device cuda --shape small --batch "$batch" --measure both --repeats 10 \
    --threads 4 --hf --json | tee "$out/train_step_gpu_b$batch.json"
done
