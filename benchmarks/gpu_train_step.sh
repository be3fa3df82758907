#!/usr/bin/env bash
# The training-step comparison of benchmarks/train_step.py on a GPU: every QCRD cost option vs DSS, fp32 and bf16
# (qcrd_bf16, dss_bf16), timed (median of 10 after a warm-up) plus the operation count and each variant's peak GPU
# memory, and the independent HF Seq2SeqTrainer DSS beside ours (needs `accelerate`); then decoder-only students
# (`--family causal`, Qwen2.5-0.5B shape): DSS, QCRD, QCRD's naive path (batch <= 32), LoRA r = 8 vs full weights,
# fp32 and bf16, one variant alive at a time (`--one-at-a-time`: 0.5 B parameters with AdamW's state do not fit
# many times over), timed plus peak GPU memory; a variant out of memory is reported and the others go on. Needs
# torch, transformers, tokenizers and pyyaml (and peft for the LoRA variants, skipped without it), not Ray: it runs
# from a bare checkout (PYTHONPATH is set here). Writes JSON next to the table; exits early without a GPU.
#   benchmarks/gpu_train_step.sh [OUT_DIR]     (default: benchmarks/results; PYTHON=... picks the interpreter,
#   FAMILIES="seq2seq causal" which families to run,
#   seq2seq: BATCHES="8 32 64" the batch sizes, VARIANTS=dss,qcrd,... a subset of train_step.py's variants,
#   REPEATS=10, MEASURE=both|time, HF=0 to skip the HF Trainer;
#   causal: CAUSAL_SHAPE=qwen0.5b, CAUSAL_BATCHES="8 32 128" (batch 128 at 0.5 B needs most of an H200's memory:
#   variants that do not fit are reported out of memory), CAUSAL_VARIANTS=... (default per batch, see below),
#   CAUSAL_REPEATS=2 rounds of CAUSAL_STEPS=3 timed steps per build, CAUSAL_MEASURE=time|both (both adds the
#   operation count, the same as on CPU, at one more step per variant))
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
families="${FAMILIES:-seq2seq causal}"

if [[ " $families " == *" seq2seq "* ]]; then
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
fi

if [[ " $families " == *" causal "* ]]; then
shape="${CAUSAL_SHAPE:-qwen0.5b}"
lora_ok=1
"$py" -c 'import peft' 2>/dev/null || { lora_ok=0; echo "peft not installed: the LoRA variants are skipped" >&2; }
causal_variants() {  # the default variants at batch $1: the naive path holds every candidate's activations
  local v="dss,qcrd,dss_bf16,qcrd_bf16"
  [ "$lora_ok" = 1 ] && v="$v,dss_lora_bf16,qcrd_lora_bf16"
  [ "$1" -le 8 ] && v="$v,qcrd_default_naive"
  [ "$1" -le 8 ] && [ "$lora_ok" = 1 ] && v="$v,dss_lora,qcrd_lora"
  [ "$1" -le 32 ] && v="$v,qcrd_default_naive_bf16"
  echo "$v"
}
for batch in ${CAUSAL_BATCHES:-8 32 128}; do
  json="$out/train_step_gpu_causal_${shape}_b$batch.json"
  if ! "$py" benchmarks/train_step.py --device cuda --family causal --shape "$shape" --batch "$batch" \
      --measure "${CAUSAL_MEASURE:-time}" --one-at-a-time --repeats "${CAUSAL_REPEATS:-2}" --steps "${CAUSAL_STEPS:-3}" \
      --threads 4 --json --variants "${CAUSAL_VARIANTS:-$(causal_variants "$batch")}" > "$json"; then
    echo "causal batch $batch: the run failed (above); going on" >&2
    continue
  fi
  "$py" - "$json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s, nan = r.get("seconds", {}), float("nan")
print(f"causal {r['shape']} batch {r['batch']}: load {r['load_before']} -> {r['load_after']}")
for n in list(s) + list(r.get("failed", {})):
    if n in s:
        print(f"  {n:<24} {1000 * s[n]:8.1f} ms  {r.get('time_vs_dss', {}).get(n, nan):5.2f}x DSS  "
              f"{r.get('flops_vs_dss', {}).get(n, nan):5.2f}x DSS ops  {r.get('peak_gpu_mib_timed', {}).get(n, 0):7.0f} MiB")
    else:
        print(f"  {n:<24} {r['failed'][n]}")
pairs = [("qcrd / dss", "qcrd", "dss"), ("qcrd_bf16 / dss_bf16", "qcrd_bf16", "dss_bf16"),
         ("naive / fast", "qcrd_default_naive", "qcrd"), ("naive / fast, bf16", "qcrd_default_naive_bf16", "qcrd_bf16"),
         ("bf16 speed-up qcrd", "qcrd", "qcrd_bf16"), ("bf16 speed-up dss", "dss", "dss_bf16"),
         ("full / lora qcrd", "qcrd", "qcrd_lora"), ("full / lora qcrd, bf16", "qcrd_bf16", "qcrd_lora_bf16"),
         ("full / lora dss, bf16", "dss_bf16", "dss_lora_bf16")]
print("  " + ", ".join(f"{label} {s[a] / s[b]:.2f}x" for label, a, b in pairs if a in s and b in s))
PY
done
fi

# Issue 23's metric syncs: the same steps with the code before the change (SYNC_BASELINE: a checkout of it, e.g.
# `git worktree add /tmp/before d9a7fd0^`), where every micro-batch read ~15 metrics with .item(), then with this
# checkout, where they stay tensors until log_every. Alternated SYNC_ROUNDS times (default 3); on CPU the two
# measure the same (docs/benchmarks.md), on a GPU each .item() waits for the queued kernels.
if [ -n "${SYNC_BASELINE:-}" ]; then
for round in $(seq "${SYNC_ROUNDS:-3}"); do
  for side in before after; do
    src="$PWD"; [ "$side" = before ] && src="$SYNC_BASELINE"
    PYTHONPATH="$src" "$py" benchmarks/train_step.py --device cuda --shape small \
      --batch 32 --measure time --repeats "${REPEATS:-10}" --variants qcrd,dss --json > "$out/syncs_${side}_$round.json"
  done
done
"$py" - "$out" "${SYNC_ROUNDS:-3}" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
runs = {side: [json.load(open(f"{out}/syncs_{side}_{r}.json"))["seconds"] for r in range(1, rounds + 1)]
        for side in ("before", "after")}
for v in ("qcrd", "dss"):
    before, after = (statistics.median(run[v] for run in runs[side]) for side in ("before", "after"))
    print(f"syncs {v}: {1000 * before:.1f} -> {1000 * after:.1f} ms per step ({after / before:.2f}x)")
PY
fi
