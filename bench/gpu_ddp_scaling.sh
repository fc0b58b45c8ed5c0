#!/usr/bin/env bash
# Multi-GPU scaling of the train stage: the same 7B Llama-shaped QLoRA run (random weights made
# here, 4-bit NF4 base, the job's throughput defaults) with `job run` on 1 GPU and with
# `torchrun --nproc-per-node 2 -m job run` on 2 GPUs of the same machine, on the same rows, with the
# same micro-batch plan. Prints each run's tokens/s (non-padding, from the train marker, i.e. the
# Trainer's count summed over ranks) and the ratio. Needs 2 GPUs.
#   bash bench/gpu_ddp_scaling.sh OUT_DIR [STEPS] [extra --set ...]
set -uo pipefail
out=${1:?OUT_DIR}; steps=${2:-40}; shift; shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JOB_CACHE_DIR=/tmp/qlora-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
model=/tmp/llama7b
if [ ! -f "$model/config.json" ]; then
  python -m job.tiny_model "$model" --csv tests/data/snli_sample.csv \
    --hidden 4096 --layers 32 --heads 32 --kv-heads 32 --intermediate 11008 --model-vocab 32000 \
    --dtype bfloat16 --device cuda 2>&1 | tail -2
fi
# Enough rows that 2 GPUs never run out of packed rows within STEPS steps.
data=/tmp/snli-bench.csv
python - "$data" <<'PY'
import sys, pandas as pd
frames = [pd.read_csv(p) for p in ("tests/data/snli_sample.csv",)]
rows = pd.concat(frames * 200, ignore_index=True)
rows["sentence2"] = rows["sentence2"] + " (" + rows.index.astype(str) + ")"  # distinct rows survive dedup
rows.to_csv(sys.argv[1], index=False)
PY
common=(--stages "format,train" --set data.uri="$data" --set "model.uri=$model" --set data.eval_size=20
        --set "train.max_steps=$steps" --set train.checkpoint_every_steps=0 --set train.checkpoint_every_minutes=0
        --set train.logging_steps=5 "$@")
for n in 1 2; do
  run=/tmp/ddp-run-$n
  rm -rf "$run" "$JOB_CACHE_DIR/work"
  if [ "$n" = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 python -m job run --set "run_uri=$run" "${common[@]}" > "$out/run-$n.log" 2>&1
  else
    torchrun --standalone --nproc-per-node 2 -m job run --set "run_uri=$run" "${common[@]}" > "$out/run-$n.log" 2>&1
  fi
  echo "$n GPU(s): exit $?" | tee -a "$out/summary.txt"
  cp "$run/_stages/train.json" "$out/train-marker-$n.json" 2>/dev/null
done
python - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, sys
out = sys.argv[1]
m = {n: json.load(open(f"{out}/train-marker-{n}.json"))["metrics"] for n in (1, 2)}
for n in (1, 2):
    print(n, "GPU(s):", {k: m[n][k] for k in ("steps", "tokens_seen", "tokens_per_s", "train_seconds",
                                               "peak_gpu_memory_gb", "processes", "settings")})
print(f"scaling: {m[2]['tokens_per_s'] / m[1]['tokens_per_s']:.2f}x (goal >= 1.8x)")
PY
