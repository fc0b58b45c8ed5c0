#!/usr/bin/env bash
# Issue #20 on one GPU: the biggest model a card can train, through every stage.
#
#   bash bench/gpu_issue20.sh OUT_DIR small-cards     # the 7B shape with 12 GiB free, then with 16 GiB free
#                                                     # (FREE_GIB="12" for one; HOST_LIMIT_GB=8 in a cgroup)
#   bash bench/gpu_issue20.sh OUT_DIR both            # 12 GiB free within 8 GB of host memory, then wide
#   bash bench/gpu_issue20.sh OUT_DIR wide            # a 70B-wide model with 4 layers, the whole card; then
#                                                     # `job plan` for the real 70B config (80 GB card, 200 GB host)
#   bash bench/gpu_issue20.sh OUT_DIR small           # a 1B shape, whole card: every stage's plan and peaks
#   bash bench/gpu_issue20.sh OUT_DIR evaluate16      # after small-cards: its run's evaluate again, 16 GiB free
#   bash bench/gpu_issue20.sh OUT_DIR 13b             # the 13B shape, 22 GiB free, 16 GB host: up to evaluate
#   bash bench/gpu_issue20.sh OUT_DIR 13b-export      # then its export, the base's weights deleted first (disk)
#
# A smaller card is made by a ballast process that holds all but N GiB of the GPU (torch.empty, kept alive),
# so every stage sees the real free memory through CUDA (mem_get_info), as it would on that card. Each run
# is format, train (4 steps), merge, export (q8_0 with its check) and evaluate with the job's defaults
# (NF4 base, varlen attention, Liger when installed), under /usr/bin/time -v for the process's peak RSS;
# each stage's marker holds its plan and its own measured peaks (memory.plan, memory.measured).
set -uo pipefail
out=${1:?OUT_DIR}; what=${2:?small-cards or wide}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JOB_CACHE_DIR=/tmp/qlora-cache
# At most 8 files come back from the GPU machine: summary.txt, and per run its log and its markers.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
data=tests/data/snli_sample.csv

make_model() {  # make_model DIR HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE
  [ -f "$1/config.json" ] && return 0
  python -m job.tiny_model "$1" --csv "$data" --hidden "$2" --layers "$3" --heads "$4" --kv-heads "$5" \
    --intermediate "$6" --model-vocab 32000 --dtype bfloat16 --device cuda 2>&1 | tail -2 >> "$out/summary.txt"
}

ballast_pid=""
ballast() {  # ballast FREE_GIB: hold all but FREE_GIB of the GPU until release
  rm -f /tmp/ballast.ready
  python - "$1" <<'PY' &
import sys, time, torch
free, total = torch.cuda.mem_get_info()
keep = int(float(sys.argv[1]) * 2**30)
x = torch.empty(max(free - keep - 300 * 2**20, 0), dtype=torch.uint8, device="cuda")  # the context takes ~300 MiB
open("/tmp/ballast.ready", "w").write(str(x.numel()))
time.sleep(3600)
PY
  ballast_pid=$!
  while [ ! -f /tmp/ballast.ready ]; do sleep 1; done
  python -c "import torch; f, t = torch.cuda.mem_get_info(); print(f'free now {f / 2**30:.2f} GiB of {t / 2**30:.1f}')" \
    | tee -a "$out/summary.txt"
}
release() { [ -n "$ballast_pid" ] && kill "$ballast_pid" 2>/dev/null; wait "$ballast_pid" 2>/dev/null; ballast_pid=""; }
trap release EXIT

# HOST_LIMIT_GB: run the job inside a cgroup (v2) whose memory.max is that many GB, as in a container with
# that memory limit: mapped model files count there but can be reclaimed; anonymous memory cannot.
in_host_limit() {
  if [ -n "${HOST_LIMIT_GB:-}" ] && mkdir -p /sys/fs/cgroup/qlora-job 2>/dev/null \
     && echo "${HOST_LIMIT_GB}G" > /sys/fs/cgroup/qlora-job/memory.max 2>/dev/null; then
    echo "  (in a cgroup with memory.max=${HOST_LIMIT_GB}G)" >> "$out/summary.txt"
    sh -c 'echo $$ > /sys/fs/cgroup/qlora-job/cgroup.procs && exec "$@"' sh "$@"
  else
    [ -n "${HOST_LIMIT_GB:-}" ] && echo "  (no cgroup memory limit could be set)" >> "$out/summary.txt"
    "$@"
  fi
}

pipeline() {  # pipeline NAME MODEL [extra job options]
  local name=$1 model=$2 run=${RUN_DIR:-/tmp/run-$1}
  shift 2
  [ -n "${KEEP_RUN:-}" ] || rm -rf "$run" "$JOB_CACHE_DIR/work"
  local start; start=$(date +%s)
  in_host_limit /usr/bin/time -v -o "/tmp/$name.time" python -m job run --set "run_uri=$run" --set "data.uri=$data" \
    --set "model.uri=$model" --set train.max_steps=4 --set train.checkpoint_every_steps=2 \
    --set export.enabled=true --set export.check_prompts=2 --set evaluate.max_new_tokens=16 \
    --set evaluate.max_examples=16 --set data.eval_size=16 --set evaluate.compare_base=false "$@" > "$out/$name.log" 2>&1
  echo "$name: job run exit $? after $(( $(date +%s) - start )) s; process peak RSS $(grep 'Maximum resident' \
    "/tmp/$name.time" | awk '{printf "%.2f GB", $NF / 1e6}')" | tee -a "$out/summary.txt"
  grep -E "memory plan|^ *[a-z]+: +(cuda|cpu)|DOES NOT FIT|out of memory|Traceback|Error" "$out/$name.log" \
    | cut -c1-400 | head -30 >> "$out/summary.txt"
  python - "$run" "$name" <<'PY' | tee -a "$out/summary.txt"
import json, pathlib, sys
run, name = pathlib.Path(sys.argv[1]), sys.argv[2]
for stage in ("format", "train", "merge", "export", "evaluate"):
    p = run / "_stages" / f"{stage}.json"
    if not p.exists():
        print(f"  {name} {stage}: no marker")
        continue
    m = json.loads(p.read_text())
    plan, got = (m.get("memory") or {}).get("plan") or {}, (m.get("memory") or {}).get("measured") or {}
    print(f"  {name} {stage}: {m['seconds']:.0f} s; plan {plan.get('device')} GPU {plan.get('gpu_gb')} host "
          f"{plan.get('host_gb')} disk {plan.get('disk_gb')} ({plan.get('how')}); measured GPU "
          f"{got.get('gpu_peak_gb')} host {got.get('host_peak_gb')} anonymous, {got.get('host_peak_rss_gb')} RSS "
          f"with mapped files ({got.get('host_peak_scope')})")
    metrics = m.get("metrics") or {}
    keep = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict)) and k not in ("loss_curve",)}
    print("     ", json.dumps(keep)[:600])
PY
  python -c "import json, pathlib, sys; print(json.dumps({p.stem: json.loads(p.read_text()) for p in
      sorted(pathlib.Path(sys.argv[1]).glob('_stages/*.json'))}, indent=1))" "$run" > "$out/$name.markers.json"
  du -sh "$run"/* "$JOB_CACHE_DIR" 2>/dev/null | tee -a "$out/summary.txt"
  df -h /tmp | tail -1 | tee -a "$out/summary.txt"
}

case $what in
  both)
    FREE_GIB=12 HOST_LIMIT_GB=8 bash "$0" "$out" small-cards
    FREE_GIB=79 bash "$0" "$out" wide
    ;;
  small-cards)
    make_model /tmp/llama7b 4096 32 32 32 11008
    for free in ${FREE_GIB:-12 16}; do
      ballast "$free"
      pipeline "7b-${free}gib" /tmp/llama7b
      # predict where the 16-bit model does not fit: the same fallback as evaluate
      python -m job predict --model "/tmp/run-7b-${free}gib/merged" --max-new-tokens 16 "A man plays a guitar." \
        > /tmp/predict.jsonl 2> /tmp/predict.log
      echo "predict with ${free} GiB free: exit $? $(tail -c 300 /tmp/predict.jsonl)" | tee -a "$out/summary.txt"
      tail -8 /tmp/predict.log | cut -c1-300 >> "$out/summary.txt"
      release
    done
    ;;
  small)  # a 1B Llama shape on the whole card: a quick check of every stage's markers (plan and peaks)
    make_model /tmp/llama1b 2048 16 16 16 5504
    pipeline 1b /tmp/llama1b
    ;;
  evaluate16)  # the 7B's evaluate again with 16 GiB free (a T4-class card), on small-cards' 12 GiB run
    ballast 16
    KEEP_RUN=1 RUN_DIR=/tmp/run-7b-12gib pipeline 7b-16gib-evaluate /tmp/llama7b --stages evaluate --force evaluate
    release
    ;;
  13b)  # the 13B shape with 22 GiB free (A10G/L4) in 16 GB of host memory: format, train, merge, evaluate
    make_model /tmp/llama13b 5120 40 40 40 13824
    df -h /tmp | tail -1 | tee -a "$out/summary.txt"
    python -m job plan --set run_uri=/tmp/run-13b --set "data.uri=$data" --set model.uri=/tmp/llama13b \
      --set export.enabled=true --gpu-memory 22 --host-memory 16 2>&1 | tail -12 | tee -a "$out/summary.txt"
    ballast 22
    # export.enabled=false: with export on, the disk plan refuses the run (45.5 GiB by export's end, about 40 free
    # once the 26 GB base is written), as it should; 13b-export runs it after the base's weights are deleted.
    HOST_LIMIT_GB=16 RUN_DIR=/tmp/run-13b pipeline 13b-22gib /tmp/llama13b --stages format,train,merge,evaluate \
      --set export.enabled=false
    release
    ;;
  13b-export)  # then export, after deleting the base's weights: 64 GiB of disk holds two 26 GB copies, not three
    rm -f /tmp/llama13b/*.safetensors /tmp/llama13b/model.safetensors.index.json
    ballast 22
    HOST_LIMIT_GB=16 KEEP_RUN=1 RUN_DIR=/tmp/run-13b pipeline 13b-22gib-export /tmp/llama13b --stages export
    release
    ;;
  wide)
    make_model /tmp/wide70b 8192 4 64 8 28672
    ballast "${FREE_GIB:-79}"  # an 80 GB card, also on an H200
    pipeline wide70b /tmp/wide70b
    release
    mkdir -p /tmp/llama70b-config
    python - <<'PY'
import json, shutil
config = json.load(open("/tmp/wide70b/config.json"))
config.update(num_hidden_layers=80)  # the real Llama-2-70B's shape: only its config is needed to plan
json.dump(config, open("/tmp/llama70b-config/config.json", "w"))
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"/tmp/wide70b/{name}", "/tmp/llama70b-config/")
PY
    python -m job plan --set run_uri=/tmp/run-plan70b --set "data.uri=$data" --set model.uri=/tmp/llama70b-config \
      --set export.enabled=true --gpu-memory 79 --host-memory 200 --disk 1000 2>&1 | tee -a "$out/summary.txt"
    ;;
esac
