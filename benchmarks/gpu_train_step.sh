#!/usr/bin/env bash
# The training-step comparison of benchmarks/train_step.py on a GPU: every QCRD cost option vs DSS, fp32 and bf16
# (qcrd_bf16, dss_bf16), timed (median of 10 after a warm-up) plus the operation count and each variant's peak GPU
# memory, and the independent HF Seq2SeqTrainer DSS beside ours (needs `accelerate`). Needs torch, transformers,
# tokenizers and pyyaml, not Ray: it runs from a bare checkout (PYTHONPATH is set here). Writes JSON next to the
# table; exits early without a GPU.
#   benchmarks/gpu_train_step.sh [OUT_DIR]     (default: benchmarks/results; PYTHON=... picks the interpreter,
#   BATCHES="8 32 64" the batch sizes, VARIANTS=dss,qcrd,... a subset of train_step.py's variants, REPEATS=10,
#   MEASURE=both|time, HF=0 to skip the HF Trainer)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
py="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to torch: nothing to measure (the CPU run is python benchmarks/train_step.py)" >&2
  exit 2
fi
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv; uptime
  "$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} | tee "$out/gpu.txt"
for batch in ${BATCHES:-8 32 64}; do
  "$py" benchmarks/train_step.py --device cuda --shape small --batch "$batch" --measure "${MEASURE:-both}" \
    --repeats "${REPEATS:-10}" --threads 4 $([ "${HF:-1}" = 0 ] || echo --hf) --json ${VARIANTS:+--variants "$VARIANTS"} > "$out/train_step_gpu_b$batch.json"
  "$py" - "$out/train_step_gpu_b$batch.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"batch {r['batch']}: load {r['load_before']} -> {r['load_after']}")
for n, t in r["seconds"].items():
    print(f"  {n:<18} {1000 * t:8.1f} ms  {r['time_vs_dss'][n]:5.2f}x DSS  {r.get('flops_vs_dss', {}).get(n, float('nan')):5.2f}x DSS ops"
          f"  {r.get('peak_gpu_mib', {}).get(n, 0):7.0f} MiB")
print(f"  bf16 speed-up: qcrd {r['seconds']['qcrd'] / r['seconds']['qcrd_bf16']:.2f}x, "
      f"dss {r['seconds']['dss'] / r['seconds']['dss_bf16']:.2f}x")
if "ours_dss_vs_hf" in r:
    print(f"  ours DSS vs HF Seq2SeqTrainer DSS: {r['ours_dss_vs_hf']:.2f}x its step time "
          f"({1000 * r['ours_dss_seconds_vs_hf']:.1f} vs {1000 * r['hf_dss_seconds']:.1f} ms)")
PY
done
