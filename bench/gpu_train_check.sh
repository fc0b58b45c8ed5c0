#!/usr/bin/env bash
# GPU evidence for the train stage: a 7B Llama-shaped model (random weights, made here) trained by
# `job run` with a 4-bit NF4 base and bf16 compute; SIGTERM after the first uploaded checkpoint must
# give exit 75, and a rerun must resume from that checkpoint and finish.
#   bash bench/gpu_train_check.sh OUT_DIR [extra --set ...]
set -uo pipefail
out=${1:?OUT_DIR}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JOB_CACHE_DIR=/tmp/qlora-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
model=/tmp/llama7b
if [ ! -f "$model/config.json" ]; then
  /usr/bin/time -f "model made in %e s" python -m job.tiny_model "$model" --csv tests/data/snli_sample.csv \
    --hidden 4096 --layers 32 --heads 32 --kv-heads 32 --intermediate 11008 --model-vocab 32000 \
    --dtype bfloat16 --device cuda 2>&1 | tail -2
fi
run=/tmp/run7b
rm -rf "$run" "$JOB_CACHE_DIR/work"
args=(run --stages format,train --set "run_uri=$run" --set data.uri=tests/data/snli_sample.csv
      --set "model.uri=$model" --set data.eval_size=20 --set train.max_steps=12
      --set train.checkpoint_every_steps=4 --set train.logging_steps=1 "$@")
python -m job "${args[@]}" > "$out/train1.log" 2>&1 &
pid=$!
until [ -f "$run/checkpoints/LATEST" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
kill -TERM $pid; wait $pid; echo "first run exit code: $?" | tee -a "$out/summary.txt"
grep -E "4-bit|compute dtype|SIGTERM|uploaded|label check" "$out/train1.log" | tee -a "$out/summary.txt"
cp "$run/checkpoints/LATEST" "$out/LATEST.after-sigterm.json"
python -m job "${args[@]}" > "$out/train2.log" 2>&1; echo "second run exit code: $?" | tee -a "$out/summary.txt"
grep -E "resuming|done in|4-bit" "$out/train2.log" | tee -a "$out/summary.txt"
cp "$run/_stages/train.json" "$out/train-marker.json"
python - "$run/_stages/train.json" <<'PY' | tee -a "$out/summary.txt"
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
print({k: m[k] for k in ("steps", "resumed_from_step", "tokens_seen", "tokens_per_s", "peak_gpu_memory_gb",
                         "quantized_linear_layers", "compute_dtype", "device", "settings")})
print("loss:", [(e["step"], round(e["loss"], 3)) for e in m["loss_curve"]])
PY
