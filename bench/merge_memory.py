"""Merge peak host memory (RSS) and time on CPU: the streaming merge (job/stream_merge.py, today's stage)
vs loading the whole model with the adapter and merging in place (the stage before issue 20, kept for
bases that are not plain safetensors).

    python bench/merge_memory.py [--out /tmp/merge-bench] [--hidden 2048] [--layers 16] [--rank 16]
                                 [--methods streaming,loaded]

Makes (once) a random Llama of the given shape saved in bf16 (2 GB shards, as Hub checkpoints) and a
random all-linear LoRA adapter, then runs each merge in its own process and reads that process's peak
RSS (VmHWM). Streaming = merge_weights + verify_merged (every tensor read back and checked); loaded =
from_pretrained + PeftModel + merge_in_fp32 + save_pretrained. Neither includes the logits check (the
loaded path ran it on the model it had in memory; the streaming stage runs it only where it is affordable).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(out: Path, hidden: int, layers: int, rank: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir, adapter_dir = out / "model", out / "adapter"
    if (adapter_dir / "adapter_model.safetensors").is_file():
        return model_dir, adapter_dir
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         intermediate_size=int(hidden * 2.6875) // 64 * 64, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(model_dir, max_shard_size="2GB")
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def streaming(model_dir: Path, adapter_dir: Path, out: Path) -> dict:
    import torch

    from job.stream_merge import merge_weights, verify_merged

    start = time.perf_counter()
    written = merge_weights(model_dir, adapter_dir, out, torch.bfloat16, "cpu", 2 * 10**9)
    merged = time.perf_counter()
    check = verify_merged(model_dir, adapter_dir, out, torch.bfloat16, "cpu")
    return {**written, **check, "merge_s": round(merged - start, 1), "check_s": round(time.perf_counter() - merged, 1)}


def loaded(model_dir: Path, adapter_dir: Path, out: Path) -> dict:
    import torch

    from job.stages.merge import load_with_adapter, merge_in_fp32

    start = time.perf_counter()
    model = load_with_adapter(model_dir, adapter_dir, torch.bfloat16, "cpu", "sdpa")
    merged, layers = merge_in_fp32(model)
    merged.save_pretrained(out, max_shard_size=2 * 10**9)
    return {"lora_modules": layers, "merge_s": round(time.perf_counter() - start, 1)}


def peak_rss_gb() -> float:
    """This process's resident-set high-water mark (VmHWM: its own address space since exec; ru_maxrss
    would also count the parent's pages at fork/exec time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def measure(method: str, model_dir: Path, adapter_dir: Path, out: Path) -> dict:
    """Run one method in a fresh process; its result plus its peak RSS."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.merge_memory import {method}, "
            f"peak_rss_gb; from pathlib import Path; result = {method}(Path({str(model_dir)!r}), "
            f"Path({str(adapter_dir)!r}), Path({str(out)!r})); print(json.dumps({{**result, "
            f"'peak_rss_gb': peak_rss_gb()}}))")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"method": method, **json.loads(result.stdout.strip().splitlines()[-1]),
            "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/merge-bench"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", default="streaming,loaded")
    args = parser.parse_args()
    model_dir, adapter_dir = make_inputs(args.out, args.hidden, args.layers, args.rank)  # reused when there
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    print(f"model: {size / 1e9:.2f} GB bf16 safetensors ({args.hidden} hidden, {args.layers} layers), "
          f"adapter r={args.rank} all-linear")
    for method in args.methods.split(","):
        print(json.dumps(measure(method, model_dir, adapter_dir, args.out / f"merged-{method}")))


if __name__ == "__main__":
    main()
