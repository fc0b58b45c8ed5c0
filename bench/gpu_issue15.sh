#!/usr/bin/env bash
# The GPU evidence for "fast by default" (varlen attention + Liger), in two calls of under 10 minutes on
# a machine with 2 GPUs: two independent lanes run side by side, one per GPU, so nothing shares a card.
#   bash bench/gpu_issue15.sh call1 OUT_DIR   # lane 0: `job run` with default settings on a fresh machine
#                                             #         (speed, first step), then the notebook recipe and the
#                                             #         job default alternated 3 times;
#                                             # lane 1: bench/gpu_varlen_check.py (logits and LoRA gradients
#                                             #         vs per-example sdpa; 30-step loss curves sdpa vs varlen,
#                                             #         varlen vs varlen+Liger)
#   bash bench/gpu_issue15.sh call2 OUT_DIR   # lane 0: variants sdpa / varlen without Liger / flex (fresh
#                                             #         machine, 240 s limit); lane 1: 80 and 16 GiB caps, then
#                                             #         the 7B GGUF export (bench/gpu_export_check.sh)
# Each lane's log and JSON go to OUT_DIR/lane<N>/ and are packed into OUT_DIR/lane<N>.tgz.
set -uo pipefail
call=${1:?call1 or call2}; out=${2:?OUT_DIR}
mkdir -p "$out/lane0" "$out/lane1"
export PYTHONUNBUFFERED=1 JOB_CACHE_DIR=/tmp/qlora-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bnb', bitsandbytes.__version__)" \
  | tee -a "$out/gpu.txt"
model=/tmp/bench-model-7b
t0=$(date +%s)
python -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import train_throughput as b; \
b.make_model_in_subprocess(Path('$model'), '7b', None)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
echo "model ready after $(( $(date +%s) - t0 )) s" | tee -a "$out/gpu.txt"

# Enough distinct rows for 30 steps of 16k tokens (the SNLI sample repeated, each copy made distinct).
data=/tmp/snli-bench.csv
python - "$data" <<'PY'
import sys, pandas as pd
rows = pd.concat([pd.read_csv("tests/data/snli_sample.csv")] * 60, ignore_index=True)
rows["sentence2"] = rows["sentence2"] + " (" + rows.index.astype(str) + ")"
rows.to_csv(sys.argv[1], index=False)
PY

default_run() {  # the shipped defaults: nothing about kernels, batch or checkpointing is set
  local dir=$1; shift
  rm -rf /tmp/run-default "$JOB_CACHE_DIR/work"
  python -m job run --stages format,train --set run_uri=/tmp/run-default --set "data.uri=$data" \
    --set "model.uri=$model" --set data.eval_size=20 --set train.max_steps=30 --set train.logging_steps=1 "$@" \
    > "$dir/job-default.log" 2>&1
  echo "job run (defaults): exit $?" >> "$dir/summary.txt"
  cp /tmp/run-default/_stages/train.json "$dir/train-marker-default.json" 2>/dev/null
  grep -E "stage train: running|train: step 1/|attention|liger|Liger|settings|done in" "$dir/job-default.log" \
    | head -20 >> "$dir/summary.txt"
}

lane() {  # lane N COMMANDS...: run on GPU N, log into OUT/laneN
  local n=$1; shift
  ( export CUDA_VISIBLE_DEVICES=$n; "$@" ) > "$out/lane$n/lane.log" 2>&1
}

call1_lane0() {
  local d=$out/lane0
  default_run "$d"
  timeout 360 python bench/train_throughput.py --shape 7b --model-dir "$model" --steps 10 --warmup 3 --repeats 3 \
    --out "$d/throughput.json" > "$d/throughput.log" 2>&1
  echo "throughput: exit $?" >> "$d/summary.txt"
}
call1_lane1() {
  local d=$out/lane1
  timeout 480 python bench/gpu_varlen_check.py "$d/varlen" --model-dir "$model" > "$d/varlen.log" 2>&1
  echo "varlen check: exit $?" >> "$d/summary.txt"
}
call2_lane0() {
  local d=$out/lane0
  timeout 330 python bench/train_throughput.py --shape 7b --model-dir "$model" --steps 10 --warmup 3 --recipes job \
    --variant sdpa --variant varlen --out "$d/variants.json" > "$d/variants.log" 2>&1
  echo "variants: exit $?" >> "$d/summary.txt"
  timeout 240 python bench/train_throughput.py --shape 7b --model-dir "$model" --steps 10 --warmup 3 --recipes job \
    --variant flex --out "$d/flex.json" > "$d/flex.log" 2>&1
  echo "flex (fresh machine, 240 s limit): exit $?" >> "$d/summary.txt"
}
call2_lane1() {
  local d=$out/lane1
  for cap in 80 16; do
    timeout 150 python bench/train_throughput.py --shape 7b --model-dir "$model" --steps 10 --warmup 3 --recipes job \
      --cap-gb "$cap" --out "$d/cap$cap.json" > "$d/cap$cap.log" 2>&1
    echo "cap $cap GiB: exit $?" >> "$d/summary.txt"
  done
  MODEL_DIR=$model timeout 200 bash bench/gpu_export_check.sh "$d/export" "q8_0" > "$d/export.log" 2>&1
  echo "export: exit $?" >> "$d/summary.txt"
}

lane 0 "${call}_lane0" &
lane 1 "${call}_lane1" &
wait
for n in 0 1; do
  tail -40 "$out/lane$n/summary.txt" 2>/dev/null
  tar -czf "$out/lane$n.tgz" -C "$out" "lane$n" && rm -rf "${out:?}/lane$n"
done
echo "total $(( $(date +%s) - t0 )) s"
