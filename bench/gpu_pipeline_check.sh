#!/usr/bin/env bash
# GPU evidence for every stage: `job run` (format -> train -> merge -> evaluate) with a 4-bit NF4
# base on a Llama-shaped model with random weights made here (7B by default), then `job predict`.
#   bash bench/gpu_pipeline_check.sh OUT_DIR [extra job options, e.g. --config examples/quickstart.yaml]
set -uo pipefail
out=${1:?OUT_DIR}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JOB_CACHE_DIR=/tmp/qlora-cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
model=${MODEL_DIR:-/tmp/llama7b}
if [ ! -f "$model/config.json" ]; then
  python -m job.tiny_model "$model" --csv tests/data/snli_sample.csv --hidden "${HIDDEN:-4096}" \
    --layers "${LAYERS:-32}" --heads 32 --kv-heads 32 --intermediate "${INTERMEDIATE:-11008}" \
    --model-vocab 32000 --dtype bfloat16 --device cuda > "$out/make-model.log" 2>&1
fi
run=/tmp/run-pipeline
rm -rf "$run" "$JOB_CACHE_DIR/work"
start=$(date +%s)
python -m job run "$@" --set "run_uri=$run" --set "model.uri=$model" --set train.load_in_4bit=true \
  > "$out/run.log" 2>&1
echo "job run exit code: $? after $(( $(date +%s) - start )) s" | tee "$out/summary.txt"
grep -E "stage .*: (done|running)|4-bit|compute dtype|merge|logit|evaluate" "$out/run.log" | cut -c1-300 >> "$out/summary.txt"
cp "$run"/_stages/*.json "$out/" 2>/dev/null
cp "$run/report/report.md" "$out/report.md" 2>/dev/null
ls -la "$run/merged" >> "$out/summary.txt" 2>&1
python -m job predict --model "$run/merged" --max-new-tokens 24 "A man plays a guitar." > "$out/predict.jsonl" 2> "$out/predict.log"
echo "predict exit code: $?" >> "$out/summary.txt"
python - "$run/_stages" <<'PY' >> "$out/summary.txt"
import json, sys, pathlib
for stage in ("train", "merge", "evaluate"):
    p = pathlib.Path(sys.argv[1]) / f"{stage}.json"
    if p.exists():
        m = json.loads(p.read_text())
        print(stage, m["seconds"], "s", {k: v for k, v in m["metrics"].items() if not isinstance(v, (list, dict))})
PY
cat "$out/summary.txt"
