#!/usr/bin/env python3
"""Unsloth's fast QLoRA recipe on the job bench's workload: the Unsloth side of the peer benchmark.

One run in this process, results as JSON (--out). bench/peer_compare.py runs it next to the job's side
(bench/train_throughput.py --shape 7b), same card, same model folder, same data, each in a fresh process;
it runs in a site folder of its own, /tmp/site-peer (bench/fetch-peer-wheels.sh: Unsloth pins trl<=1.15.0
and datasets<5, older than the job's), with this project on the path for the data.

    # in the project root, Unsloth's wheels in /tmp/site-peer (bench/peer_compare.py installs them)
    PYTHONPATH=/tmp/site-peer:$PWD python3 bench/peer_unsloth.py --model-dir /tmp/peer-model-7b \
        --micro-batch 5 --packing-length 2048 --lora-dropout 0.1 --gc off --out /tmp/u.json

The workload is the bench's:
  - the same model folder (the random-weight Llama shape made by train_throughput's make_model_in_subprocess),
  - the same examples: train_throughput's make_records (SNLI contradiction rows formatted by the job),
    tokenized by the job's own tokenize_examples (prompt + completion + EOS, completion_mask),
  - NF4 4-bit base with double quant, bf16 compute, LoRA r=64, alpha 16 on q,k,v,o,gate,up,down,
  - completion-only loss, rows packed to --packing-length tokens with trl's bfd packing, padding-free (one
    flattened row per micro-batch, documents kept apart),
  - lr 2e-4 cosine, 10 warm-up steps, max_grad_norm 0.3, fused AdamW (the job's choices, not Unsloth's),
  - --micro-batch x --packing-length: the job planner's choice for the card, so tokens per step match.
Unsloth's side: FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bf16, max_seq_length=packing
length), FastLanguageModel.get_peft_model(use_gradient_checkpointing="unsloth" | True | False), trl's
SFTTrainer patched by Unsloth with packing=True (which Unsloth turns into padding-free packed batches).

--attention: "torch-varlen" (default) gives torch 2.11's torch.nn.attention.varlen.varlen_attn the
`enable_gqa` keyword that Unsloth 2026.10.9's loader requires before it uses the function (torch 2.12
added it; the 7B shape has no grouped KV heads, so the keyword is always False here). Unsloth then takes
its own packed-attention path for torch >= 2.12 (flash varlen over cu_seqlens), the kernel the job's
varlen attention uses, instead of one SDPA call per run of equal-length documents (what an install
without xformers gets on torch 2.11). "stock" leaves Unsloth as installed. The wrapper must be in place
before `import unsloth`, which reads the signature.

Measured as the bench does: non-padding tokens/s over --steps optimizer steps after --warmup steps (a
callback synchronises the GPU at each step end; tokens counted from each micro-batch with transformers'
"non_padding" rule: attention_mask if present, else tokens != pad), s/step, tokens/step, peak GPU memory
(max_memory_allocated), MFU with train_throughput's flops_per_token and PEAK_FLOPS (4 x frozen + 6 x
trainable parameters per token, against 989 TFLOP/s), first_step_s (from tokenizing, model load and
trainer build included, to the end of the first optimizer step: the bench's clock), process_first_step_s
(from this process's start, Unsloth's import included) and the loss of every step (losses[0]: step 1,
which must match the job's at the same settings). Exit code 3 on CUDA out of memory (the JSON says so),
1 on any other error (traceback in the JSON).

Every library stays offline (the GPU machine has no network): Hub, datasets and Unsloth's usage
statistics (a Hub download at import) are switched off below, before anything imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

PROCESS_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# No network on the GPU machine: keep every library off it (Unsloth's usage statistics are a
# Hub download, skipped when UNSLOTH_DISABLE_STATISTICS is set or the Hub is offline).
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "DO_NOT_TRACK": "1",
                   "TOKENIZERS_PARALLELISM": "false",
                   # a torchvision/torch pairing probe at import; torchvision plays no part in this run
                   "UNSLOTH_SKIP_TORCHVISION_CHECK": "1"}.items():
    os.environ.setdefault(key, value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--proj", type=Path, default=ROOT,
                   help="the project checkout (its job/ and bench/train_throughput.py); default: this file's")
    p.add_argument("--name", default=None, help="label for the result")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before the measurement")
    p.add_argument("--examples", type=int, default=12000, help="examples (the bench's default)")
    p.add_argument("--micro-batch", type=int, default=8, help="packed rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--packing-length", type=int, default=2048)
    p.add_argument("--max-seq-length", type=int, default=512, help="examples longer than this are dropped (job)")
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--gc", choices=["unsloth", "true", "off"], default="unsloth",
                   help='use_gradient_checkpointing: "unsloth" (offloaded), true (plain), off')
    p.add_argument("--attention", choices=["stock", "torch-varlen"], default="torch-varlen")
    p.add_argument("--optim", default="adamw_torch_fused")
    p.add_argument("--cap-gb", type=float, help="cap GPU memory (set_per_process_memory_fraction)")
    p.add_argument("--work", type=Path, default=Path("/tmp/peer-unsloth"))
    p.add_argument("--out", type=Path)
    p.add_argument("--cpu-check", action="store_true",
                   help="no GPU: build the trainer and collate one batch only (debugging on a CPU machine)")
    return p.parse_args(argv)


def add_enable_gqa_to_torch_varlen() -> str:
    """torch 2.11's varlen_attn has window_size but not enable_gqa; Unsloth's loader wants both.
    Wrap it with the same signature plus enable_gqa (repeat the KV heads when set, as sdpa's math
    path does). Must run before `import unsloth` (it reads the signature at import)."""
    import inspect

    try:
        import torch.nn.attention.varlen as varlen
    except ImportError:
        return "torch has no torch.nn.attention.varlen"
    original = varlen.varlen_attn
    params = inspect.signature(original).parameters
    if "enable_gqa" in params:
        return "not needed: torch's varlen_attn already takes enable_gqa"
    if "window_size" not in params:
        return "not possible: torch's varlen_attn has no window_size"

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        if enable_gqa and key.shape[-2] != query.shape[-2]:
            groups = query.shape[-2] // key.shape[-2]
            key, value = key.repeat_interleave(groups, dim=-2), value.repeat_interleave(groups, dim=-2)
        return original(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux, scale=scale,
                        window_size=tuple(window_size))

    varlen_attn.__doc__ = original.__doc__
    varlen.varlen_attn = varlen_attn
    return "added enable_gqa to torch.nn.attention.varlen.varlen_attn (torch %s)" % __import__("torch").__version__


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes",
                 "datasets", "triton", "xformers", "flash-attn", "cut_cross_entropy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def attention_probe():
    """Count which packed-attention routine Unsloth actually calls (module-level functions that
    unsloth.utils.attention_dispatch._run_attention looks up at call time)."""
    import collections
    import functools

    counts = collections.Counter()
    try:
        import unsloth.utils.attention_dispatch as ad
    except Exception as exc:  # layout changed: report, do not fail the run
        return counts, {"error": f"attention_dispatch not importable: {exc}"}
    for name in ("_torch_varlen_packed", "_sdpa_packed_segments", "build_sdpa_packed_attention_mask",
                 "_varlen_attn_call"):
        fn = getattr(ad, name, None)
        if not callable(fn):
            continue

        def wrap(fn=fn, name=name):
            @functools.wraps(fn)
            def counted(*args, **kwargs):
                counts[name] += 1
                return fn(*args, **kwargs)
            return counted

        setattr(ad, name, wrap())
    facts = {"torch_varlen_loaded": getattr(ad, "_TORCH_VARLEN_ATTN", None) is not None,
             "lean_varlen": bool(getattr(ad, "_LEAN_VARLEN", False)),
             "has_xformers": bool(getattr(ad, "HAS_XFORMERS", False)),
             "has_flash_attn": bool(getattr(ad, "HAS_FLASH_ATTENTION", False)),
             "sdpa_packed_segments": bool(getattr(ad, "_SDPA_PACKED_SEGMENTS", False))}
    try:
        facts["packed_backend"] = ad.select_attention_backend(True)
    except Exception as exc:
        facts["packed_backend"] = f"? ({exc})"
    return counts, facts


def first_batch_check(trainer, tokenizer) -> dict:
    """Collate the first micro-batch as training will and describe it: rows, tokens, documents,
    supervised tokens, and whether every document's supervised part ends with EOS."""
    dataset = trainer.train_dataset
    n = min(trainer.args.per_device_train_batch_size, len(dataset))
    batch = trainer.data_collator([dataset[i] for i in range(n)])
    ids, labels = batch["input_ids"], batch.get("labels")
    info = {"keys": sorted(batch.keys()), "input_ids_shape": list(ids.shape)}
    if "position_ids" in batch:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        info["documents"] = len(starts)
    if "packed_seq_lengths" in batch:
        lengths = batch["packed_seq_lengths"].tolist()
        info["packed_seq_lengths_n"] = len(lengths)
        info["packed_seq_lengths_sum"] = int(sum(lengths))
        info["mean_document_tokens"] = round(sum(lengths) / max(len(lengths), 1), 1)
    if labels is not None:
        supervised = labels != -100
        info["supervised_tokens"] = int(supervised.sum())
        info["supervised_fraction"] = round(float(supervised.float().mean()), 4)
        eos = tokenizer.eos_token_id
        if "packed_seq_lengths" in batch and ids.shape[0] == 1:
            bounds = [0]
            for length in batch["packed_seq_lengths"].tolist():
                bounds.append(bounds[-1] + int(length))
            ends_ok = 0
            for a, b in zip(bounds, bounds[1:]):
                lab = labels[0, a:b]
                sup = (lab != -100).nonzero().flatten()
                # trl shifts nothing here: labels are aligned with input_ids; last supervised = EOS
                if sup.numel() and int(ids[0, a + int(sup[-1])]) == eos:
                    ends_ok += 1
            info["documents_ending_in_supervised_eos"] = ends_ok
    info["pad_token_id"] = tokenizer.pad_token_id
    info["eos_token_id"] = tokenizer.eos_token_id
    info["has_attention_mask"] = "attention_mask" in batch
    info["dtype"] = str(ids.dtype)
    del batch
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    name = args.name or (f"unsloth {args.attention} dropout={args.lora_dropout:g} gc={args.gc} "
                         f"{args.packing_length}x{args.micro_batch}x{args.grad_accum}")
    result = {"recipe": name, "library": "unsloth", "settings": {
        "micro_batch_size": args.micro_batch, "packing_length": args.packing_length,
        "gradient_accumulation": args.grad_accum, "tokens_per_step_planned": args.micro_batch * args.packing_length
        * args.grad_accum, "lora_r": 64, "lora_alpha": 16, "lora_dropout": args.lora_dropout,
        "target_modules": TARGETS, "use_gradient_checkpointing": args.gc, "attention": args.attention,
        "optim": args.optim, "load_in_4bit": True, "dtype": "bfloat16", "packing": True, "padding_free": True,
        "completion_only_loss": True, "lr": 2e-4, "lr_scheduler": "cosine", "warmup_steps": 10,
        "max_grad_norm": 0.3, "steps": args.steps, "warmup_measure_steps": args.warmup}}

    def write():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str))

    try:
        return run(args, result, write)
    except Exception as exc:  # noqa: BLE001 - a failed run must still leave its JSON
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        result["error"] = "out of memory" if oom else f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-6000:]
        if torch.cuda.is_available():
            result["peak_gib_at_error"] = torch.cuda.max_memory_allocated() / 2**30
        write()
        print(f"peer_unsloth: {name}: {result['error']}", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 3 if oom else 1


def run(args, result, write) -> int:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_check:
        raise RuntimeError("no CUDA device (use --cpu-check on a CPU machine)")
    if gpu and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total)
    result["varlen_patch"] = add_enable_gqa_to_torch_varlen() if args.attention == "torch-varlen" else "none (stock)"

    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(args.work / "unsloth_compiled_cache"))
    t_import = time.perf_counter()
    import unsloth  # noqa: F401 - first, before trl/transformers/peft, as Unsloth asks
    from unsloth import FastLanguageModel

    result["import_unsloth_s"] = round(time.perf_counter() - t_import, 1)
    if args.cpu_check:  # Unsloth skips its trl rewriting under UNSLOTH_ALLOW_CPU; do it here
        from unsloth._gpu_init import _patch_trl_trainer
        from unsloth.context_parallel import patch_sft_trainer
        from unsloth.models.llama import FastLlamaModel
        from unsloth.models.rl import PatchFastRL

        os.environ["UNSLOTH_ALLOW_CPU"] = "0"
        PatchFastRL(FastLanguageModel=FastLlamaModel)
        _patch_trl_trainer()
        patch_sft_trainer()
        os.environ["UNSLOTH_ALLOW_CPU"] = "1"
    calls, facts = attention_probe()
    result["attention_facts"] = facts
    result["versions"] = versions()
    result["device"] = torch.cuda.get_device_name() if gpu else "cpu"

    # The bench's data: records formatted by the job, tokenized by the job's tokenizer and code.
    sys.path[:0] = [str(args.proj.resolve()), str(args.proj.resolve() / "bench")]
    from train_throughput import PEAK_FLOPS, flops_per_token, make_records

    from job.model import load_tokenizer
    from job.stages.labels import tokenize_examples

    job_tokenizer = load_tokenizer(args.model_dir, str(args.model_dir))
    records = make_records(args.examples)

    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # first_step_s counts from here, as the bench does (tokenizing, model load, trainer build, step 1)
    t0 = time.perf_counter()
    examples = tokenize_examples(records, job_tokenizer, args.max_seq_length)
    dataset = examples.dataset
    lengths = [len(x) for x in dataset["input_ids"]]
    result["data"] = {"examples": len(dataset), "dropped": len(examples.dropped_rows),
                      "mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": max(lengths),
                      "tokenize_s": round(time.perf_counter() - t0, 1)}
    t_load = time.perf_counter()
    gc_value = {"unsloth": "unsloth", "true": True, "off": False}[args.gc]
    if args.cpu_check:  # FastLanguageModel needs a GPU: a plain PEFT model checks the trainer and data path
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=args.lora_dropout,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    else:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(args.model_dir), max_seq_length=args.packing_length, dtype=torch.bfloat16,
            load_in_4bit=True, use_gradient_checkpointing=gc_value)
    result["load_s"] = round(time.perf_counter() - t_load, 1)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = job_tokenizer.pad_token  # as the job does: never pad with EOS
    probe = records[0]["prompt"]
    result["tokenizer_same_ids"] = tokenizer(probe)["input_ids"] == job_tokenizer(probe)["input_ids"]
    if not args.cpu_check:
        model = FastLanguageModel.get_peft_model(
            model, r=64, lora_alpha=16, lora_dropout=args.lora_dropout, target_modules=TARGETS, bias="none",
            use_gradient_checkpointing=gc_value, random_state=42, max_seq_length=args.packing_length)
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    result["quantization"] = (quant.to_dict() if hasattr(quant, "to_dict") else quant)
    try:
        import bitsandbytes as bnb
        result["linear4bit_layers"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    except Exception:
        pass

    config = dict(
        output_dir=str(args.work / "out"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=10, weight_decay=0.0, max_grad_norm=0.3, max_steps=args.steps + args.warmup,
        optim=args.optim if gpu else "adamw_torch", bf16=gpu, fp16=False, logging_steps=1000,
        logging_first_step=True, save_strategy="no", report_to="none", seed=42, data_seed=42,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, disable_tqdm=True,
        max_length=args.packing_length, packing=True, packing_strategy="bfd", padding_free=True,
        completion_only_loss=True, dataset_num_proc=None, use_cpu=not gpu)
    if args.gc == "off":
        config["gradient_checkpointing"] = False  # else trl's default (True) would turn HF's back on
    sft_config = SFTConfig(**config)
    trainer = SFTTrainer(model=model, args=sft_config, train_dataset=dataset, processing_class=tokenizer)
    result["trainer_class"] = type(trainer).__mro__[0].__module__ + "." + type(trainer).__name__
    result["effective_args"] = {k: getattr(trainer.args, k, None) for k in (
        "packing", "padding_free", "packing_strategy", "max_length", "completion_only_loss",
        "gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps", "optim",
        "bf16", "remove_unused_columns")}
    result["packed_rows"] = len(trainer.train_dataset)
    result["first_batch"] = first_batch_check(trainer, tokenizer)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    write()

    # Tokens of each micro-batch, counted on the GPU (no sync) with transformers' non_padding rule.
    pad_id = tokenizer.pad_token_id
    seen_gpu = torch.zeros((), dtype=torch.int64, device="cuda" if gpu else "cpu")
    seen_cpu = [0]
    step_losses = []
    original_step = trainer.training_step

    def training_step(model, inputs, *rest, **kwargs):
        nonlocal seen_gpu
        ids = inputs["input_ids"]
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        elif pad_id is not None:
            n = (ids != pad_id).sum()
        else:
            n = ids.numel()
        if isinstance(n, torch.Tensor) and n.is_cuda:
            seen_gpu += n  # stays on the GPU: no synchronisation inside the step
        else:
            seen_cpu[0] += int(n)
        loss = original_step(model, inputs, *rest, **kwargs)
        step_losses.append(loss.detach())
        return loss

    trainer.training_step = training_step
    marks = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), seen_cpu[0] + int(seen_gpu.item()), int(state.num_input_tokens_seen)))

    trainer.add_callback(StepTimer())
    out = trainer.train()
    (t_a, n_a, s_a), (t_b, n_b, s_b) = marks[args.warmup - 1], marks[-1]
    steps = len(marks) - args.warmup
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    config_json = json.loads((args.model_dir / "config.json").read_text())
    # the bench's shape tuple: hidden, layers, heads, KV heads, intermediate, vocab
    config_json.setdefault("num_key_value_heads", config_json["num_attention_heads"])
    shape = tuple(config_json[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "vocab_size"))
    tokens_per_s = (n_b - n_a) / (t_b - t_a)
    result.update(
        tokens_per_s=tokens_per_s, s_per_step=(t_b - t_a) / steps, tokens_per_step=(n_b - n_a) / steps,
        measured_steps=steps, tokens_per_s_trainer_count=(s_b - s_a) / (t_b - t_a),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan"),
        reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if gpu else float("nan"),
        trainable_params=trainable, mfu=tokens_per_s * flops_per_token(shape, trainable) / PEAK_FLOPS,
        first_step_s=marks[0][0] - t0, process_first_step_s=marks[0][0] - PROCESS_START,
        wall_s=time.perf_counter() - t0, step_times=[round(b[0] - a[0], 3) for a, b in zip(marks, marks[1:])],
        losses=[round(float(x), 4) for x in step_losses], training_loss=getattr(out, "training_loss", None),
        attention_calls=dict(calls), device=result["device"])
    write()
    summary = {k: result[k] for k in ("recipe", "tokens_per_s", "s_per_step", "tokens_per_step", "peak_gib", "mfu",
                                      "first_step_s", "process_first_step_s")}
    print("peer_unsloth result: " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
