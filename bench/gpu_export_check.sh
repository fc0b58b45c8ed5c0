#!/usr/bin/env bash
# GGUF export of the 7B shape (random weights, Llama-2-7B: hidden 4096, 32 layers, intermediate 11008,
# vocab 32000, bf16 safetensors like merged/): time, peak resident memory and file size per type,
# written to OUT_DIR/export_7b.json. Runs on the CPU of the GPU machine (the model is built on the GPU
# when one is visible); about 3-5 minutes. Needs the `gguf` package (pure Python): carry its wheel and
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl; export PYTHONPATH=/tmp/site:$PWD
#   bash bench/gpu_export_check.sh OUT_DIR [TYPES, default "q8_0 f16"]
set -uo pipefail
out=${1:?OUT_DIR}; types=${2:-"q8_0 f16"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
model=${MODEL_DIR:-/tmp/llama7b-export}
device=cpu; python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" && device=cuda
if [ ! -f "$model/config.json" ]; then
  start=$(date +%s)
  python -m job.tiny_model "$model" --csv tests/data/snli_sample.csv --hidden "${HIDDEN:-4096}" \
    --layers "${LAYERS:-32}" --heads 32 --kv-heads "${KV_HEADS:-32}" --intermediate "${INTERMEDIATE:-11008}" \
    --model-vocab 32000 --dtype bfloat16 --device "$device" > "$out/make-model.log" 2>&1 || { cat "$out/make-model.log"; exit 1; }
  echo "model built in $(( $(date +%s) - start )) s on $device" | tee "$out/summary.txt"
fi
# One process per type, so each peak RSS is that export's alone (VmHWM of a fresh process).
for t in $types; do
  python - "$model" "$t" "$out" <<'PY' 2>&1 | tee -a "$out/summary.txt"
import json, math, os, resource, sys, time
from pathlib import Path

import numpy as np

from job.export_gguf import inspect_model, write_gguf, permute_qk

model, out_type, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def rss_gb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
import torch, gguf  # imported before the baseline, as in the job
before = rss_gb("VmRSS")
t0 = time.monotonic()
plan = inspect_model(model)
path = Path(f"/tmp/export-7b.{out_type}.gguf")
info = write_gguf(plan, path, out_type, name="llama7b-random")
seconds = time.monotonic() - t0
peak = rss_gb("VmHWM")
largest = max(math.prod(t.shape) for t in plan.tensors)
# Spot check without loading the model: one permuted tensor read back from the file.
reader = gguf.GGUFReader(path)
tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
back = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(tensor.shape[::-1].tolist() if hasattr(tensor.shape, "tolist") else tensor.shape[::-1])
from safetensors import safe_open
spec = next(t for t in plan.tensors if t.gguf_name == "blk.0.attn_k.weight")
with safe_open(spec.file, framework="pt") as f:
    src = permute_qk(f.get_tensor(spec.hf_name).float(), int(plan.config.get("num_key_value_heads"))).numpy()
err = float(np.abs(back.reshape(src.shape) - src).max() / np.abs(src).max())
record = {"type": out_type, "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2),
          "rss_before_gib": round(before, 2), "file_gib": round(path.stat().st_size / 2**30, 2),
          "n_params": plan.n_params, "model_bf16_gib": round(plan.n_params * 2 / 2**30, 2),
          "largest_tensor_fp32_gib": round(largest * 4 / 2**30, 3), "tensors": info["tensors"],
          "tensor_types": info["tensor_types"], "spot_check_rel_err_blk0_attn_k": err,
          "cpus": os.cpu_count(), "torch": torch.__version__, "gguf": getattr(gguf, "__version__", "?")}
print(json.dumps(record))
results = out / "export_7b.json"
prior = json.loads(results.read_text()) if results.exists() else []
results.write_text(json.dumps(prior + [record], indent=2) + "\n")
path.unlink()
PY
done
cat "$out/export_7b.json"
