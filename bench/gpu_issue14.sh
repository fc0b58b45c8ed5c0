#!/usr/bin/env bash
# Issue #14 (the structural pass) changes no behaviour: this runs the same whole pipeline (format,
# train, merge, evaluate; the GPU defaults: 4-bit NF4 base, varlen attention, Liger when installed)
# with the code before the pass (OLD) and after it (NEW) on one GPU, and compares what the markers
# say: loss curve, merge check, evaluation scores. Then, with 2 GPUs, the NEW code under torchrun:
# a whole run (the rank protocol brings rank 1 through training and ends it with rank 0's exit
# code), and a run whose format stage fails on rank 0 (both ranks must end with exit code 2).
#   bash bench/gpu_issue14.sh OLD_TREE NEW_TREE OUT_DIR
set -uo pipefail
old=${1:?OLD_TREE}; new=${2:?NEW_TREE}; out=${3:?OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
data=$new/tests/data/snli_sample.csv
model=/tmp/m14
(cd "$new" && python -m job.tiny_model "$model" --csv "$data" --hidden 256 --layers 4 --heads 4 --kv-heads 4 \
  --intermediate 688 --device cuda 2>&1 | tail -1)
common=(--set "data.uri=$data" --set "model.uri=$model" --set data.eval_size=40 --set train.max_steps=30
        --set train.learning_rate=1e-3 --set train.logging_steps=1 --set train.checkpoint_every_steps=10
        --set evaluate.max_examples=40 --set merge.dtype=fp32)
for tree in old new; do
  dir=${!tree}
  (cd "$dir" && CUDA_VISIBLE_DEVICES=0 JOB_CACHE_DIR=/tmp/cache-$tree python -m job run \
     --set "run_uri=/tmp/run-$tree" "${common[@]}" > "$out/run-$tree.log" 2>&1)
  echo "$tree: exit $?" | tee -a "$out/summary.txt"
  mkdir -p "$out/markers-$tree" && cp /tmp/run-$tree/_stages/*.json "$out/markers-$tree/" 2>/dev/null
done
python - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, sys
out = sys.argv[1]
m = {t: {s: json.load(open(f"{out}/markers-{t}/{s}.json")) for s in ("format", "train", "merge", "evaluate")}
     for t in ("old", "new")}
old, new = m["old"], m["new"]
lo = [e["loss"] for e in old["train"]["metrics"]["loss_curve"]]
ln = [e["loss"] for e in new["train"]["metrics"]["loss_curve"]]
print("steps", len(lo), len(ln), "max |loss old - new|", max(abs(a - b) for a, b in zip(lo, ln)))
print("final loss", lo[-1], ln[-1])
for k in ("attention", "liger", "compute_dtype", "settings", "quantized_linear_layers", "tokens_seen"):
    print("train", k, old["train"]["metrics"][k], "|", new["train"]["metrics"][k])
for k in ("max_logit_diff", "tolerance", "adapter_effect", "dtype", "device", "merged_layers"):
    print("merge", k, old["merge"]["metrics"][k], "|", new["merge"]["metrics"][k])
for k in ("json_valid_rate", "schema_valid_rate", "eos_stop_rate", "chrf"):
    print("evaluate finetuned", k, old["evaluate"]["metrics"]["finetuned"][k], "|",
          new["evaluate"]["metrics"]["finetuned"][k])
print("format fingerprint same:", old["format"]["fingerprint"] == new["format"]["fingerprint"])
print("metric keys same:", {s: sorted(old[s]["metrics"]) == sorted(new[s]["metrics"]) for s in old})
print("new phase seconds:", {s: new[s].get("phase_seconds", new[s].get("phases")) for s in new})
PY
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  (cd "$new" && JOB_CACHE_DIR=/tmp/cache-ddp JOB_EXIT_CODE_FILE=/tmp/ddp-exit torchrun --standalone --nproc-per-node 2 \
     -m job run --set run_uri=/tmp/run-ddp "${common[@]}" > "$out/ddp.log" 2>&1)
  echo "ddp whole run: torchrun exit $?, rank 0 exit $(cat /tmp/ddp-exit)" | tee -a "$out/summary.txt"
  python -c "import json; m = json.load(open('/tmp/run-ddp/_stages/train.json'))['metrics']; \
print('ddp train: processes', m['processes'], 'replicas', m['replica_digests'], 'final loss', m['final_loss'])" \
    | tee -a "$out/summary.txt"
  (cd "$new" && JOB_CACHE_DIR=/tmp/cache-ddp JOB_EXIT_CODE_FILE=/tmp/ddp-exit torchrun --standalone --nproc-per-node 2 \
     -m job run --set run_uri=/tmp/run-ddp-bad "${common[@]}" --set data.source_column=nope \
     > "$out/ddp-bad.log" 2>&1)
  echo "ddp bad column: torchrun exit $?, rank 0 exit $(cat /tmp/ddp-exit)" | tee -a "$out/summary.txt"
  grep -E "exitcode|rank 0 stopped" "$out/ddp-bad.log" | head -8 | tee -a "$out/summary.txt"
fi
