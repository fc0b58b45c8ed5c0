"""Training throughput, in one process on one card: the Colab notebook's QLoRA recipe against the
job's train stage with its defaults (and any variants), on the same data and model shape.

    python bench/train_throughput.py --shape 7b --steps 12 --warmup 4 \
        [--variant "flex: model.attn_implementation=flex_attention"] [--out results.json]

The model has random weights, made on the GPU (speed and memory do not depend on weight values);
the tokenizer is the test tokenizer trained on SNLI (or --tokenizer DIR). Data: the SNLI
contradiction rows of tests/data, formatted by the job and repeated to fill the steps. Reports
non-padding tokens/s after the warm-up steps, seconds per step, peak GPU memory, MFU (4N + 6T
FLOPs per token: N frozen base parameters, T trainable LoRA parameters, against 989 TFLOP/s dense
bf16 of an H100/H200 SXM) and each recipe's ratio to the notebook's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "small": (1024, 8, 16, 16, 2816, 32000),
}
PEAK_FLOPS = 989e12


def make_records(n: int) -> list[dict]:
    from job.config import load_config
    from job.stages.format import read_csv, select_rows, to_jsonl

    csv = ROOT / "tests" / "data" / "snli_sample.csv"
    cfg = load_config(None, ("run_uri=/tmp/b", f"data.uri={csv}", "model.uri=/m"), environ={})
    frame = read_csv(csv, str(csv), ["gold_label", "sentence1", "sentence2"])
    records, _ = select_rows(frame, cfg, str(csv))
    rows = [json.loads(line) for line in to_jsonl(records, cfg).splitlines()]
    return (rows * (n // len(rows) + 1))[:n]


class StepTimer:
    """Wall time and non-padding tokens at every optimizer step (synchronised with the GPU)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                torch.cuda.synchronize()
                timer.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        self.marks = []
        self.callback = Callback()

    def summary(self, warmup: int) -> dict:
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        steps = len(self.marks) - warmup
        return {"tokens_per_s": (n1 - n0) / (t1 - t0), "s_per_step": (t1 - t0) / steps,
                "tokens_per_step": (n1 - n0) / steps, "measured_steps": steps}


def notebook_trainer(model_dir, tokenizer, records, steps, out_dir):
    """The notebook: fp16 compute, batch 4, LoRA r=64 on q/v, gradient checkpointing, paged AdamW
    32-bit, group by length, no packing, pad = EOS (its bug; irrelevant for speed)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from job.stages.labels import tokenize_examples

    examples = tokenize_examples(records, tokenizer, 4096)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map={"": 0}, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float16))
    model.config.use_cache = False
    # transformers 5 replaced group_by_length=True by train_sampling_strategy="group_by_length"
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    grouping = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                else {"group_by_length": True})
    args = SFTConfig(output_dir=str(out_dir), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     optim="paged_adamw_32bit", learning_rate=2e-4, max_grad_norm=0.3, max_steps=steps,
                     warmup_steps=0, lr_scheduler_type="constant", **grouping, fp16=False, bf16=False,
                     gradient_checkpointing=True, logging_steps=1000, save_strategy="no", report_to="none",
                     include_num_input_tokens_seen="non_padding", packing=False, max_length=4096,
                     completion_only_loss=True, disable_tqdm=True)
    peft = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=examples.dataset, processing_class=tokenizer,
                      peft_config=peft)


def job_trainer(model_dir, tokenizer, records, steps, out_dir, sets):
    """The job's train stage as `job run` builds it, with its defaults plus `sets`."""
    from job.config import load_config
    from job.model import compute_dtype
    from job.pipeline import Context
    from job.stages.labels import tokenize_examples
    from job.stages.train import build_trainer, load_base_model, plan_batch
    from job.storage import open_store

    cfg = load_config(None, (f"run_uri={out_dir}/run", "data.uri=x.csv", f"model.uri={model_dir}",
                             f"train.max_steps={steps}", "train.checkpoint_every_steps=0",
                             "train.checkpoint_every_minutes=0", "train.logging_steps=1000", *sets), environ={})
    examples = tokenize_examples(records, tokenizer, cfg.train.max_seq_length)
    dtype = compute_dtype(cfg.train.compute_dtype)
    settings = plan_batch(cfg, examples, Path(model_dir))
    model = load_base_model(cfg, Path(model_dir), dtype)
    ctx = Context(store=open_store(f"{out_dir}/run"), work_dir=Path(out_dir) / "work", fingerprint="bench")
    trainer = build_trainer(cfg, ctx, model, tokenizer, examples.dataset, dtype, settings)
    trainer.args.disable_tqdm = True
    return trainer, settings


def flops_per_token(shape, trainable: int) -> float:
    hidden, layers, _h, _kv, inter, vocab = shape
    frozen = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden
    return 4 * frozen + 6 * trainable


def run_recipe(name, make, warmup, shape):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    made = make()
    trainer, settings = made if isinstance(made, tuple) else (made, {})
    timer = StepTimer()
    trainer.add_callback(timer.callback)
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        del trainer, made
        gc.collect()
        torch.cuda.empty_cache()
        return {"recipe": name, "settings": settings, "tokens_per_s": float("nan"), "s_per_step": float("nan"),
                "tokens_per_step": float("nan"), "peak_gib": float("nan"), "mfu": float("nan"),
                "first_step_s": float("nan"), "error": "out of memory"}
    result = timer.summary(warmup)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result.update(recipe=name, settings=settings, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                  mfu=result["tokens_per_s"] * flops_per_token(shape, trainable) / PEAK_FLOPS,
                  wall_s=time.perf_counter() - t0, first_step_s=timer.marks[0][0] - t0)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--examples", type=int, default=40000)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: train the test tokenizer)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    parser.add_argument("--recipes", default="notebook,job", help="comma list of notebook, job")
    parser.add_argument("--variant", action="append", default=[],
                        help='"NAME: key=value key=value" - the job recipe with extra settings')
    parser.add_argument("--cap-gb", type=float, help="cap this process's GPU memory (a 16 GiB card: 16)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total)

    from job.model import load_tokenizer
    from job.tiny_model import make_model

    shape = SHAPES[args.shape]
    hidden, layers, heads, kv, inter, vocab = shape
    if not (args.model_dir / "config.json").is_file():
        make_model(args.model_dir, ROOT / "tests" / "data" / "snli_sample.csv", hidden=hidden, layers=layers,
                   heads=heads, kv_heads=kv, intermediate=inter, model_vocab=vocab, dtype="bfloat16",
                   device="cuda", tokenizer_dir=args.tokenizer)
    tokenizer = load_tokenizer(args.model_dir, str(args.model_dir))
    records = make_records(args.examples)
    total = args.steps + args.warmup
    work = Path("/tmp/bench-work")
    results = []
    recipes = [r for r in args.recipes.split(",") if r]
    if "notebook" in recipes:
        results.append(run_recipe("notebook", lambda: notebook_trainer(args.model_dir, tokenizer, records, total,
                                                                       work / "nb"), args.warmup, shape))
    if "job" in recipes:
        results.append(run_recipe("job defaults", lambda: job_trainer(args.model_dir, tokenizer, records, total,
                                                                      work / "job", ()), args.warmup, shape))
    for variant in args.variant:
        name, _, sets = variant.partition(":")
        results.append(run_recipe(name.strip(), lambda s=tuple(sets.split()): job_trainer(
            args.model_dir, tokenizer, records, total, work / name.strip(), s), args.warmup, shape))
        print(json.dumps(results[-1]), flush=True)

    base = next((r["tokens_per_s"] for r in results if r["recipe"] == "notebook"), None)
    cap = f", memory capped at {args.cap_gb:g} GiB" if args.cap_gb else ""
    print(f"\n{torch.cuda.get_device_name()}, shape {args.shape}, {args.steps} measured steps after {args.warmup}{cap}")
    print(f"{'recipe':<28}{'tok/s':>9}{'s/step':>8}{'tok/step':>10}{'peak GiB':>10}{'MFU':>7}{'x nb':>7}"
          f"{'1st step s':>11}")
    for r in results:
        if r.get("error"):
            print(f"{r['recipe']:<28}{r['error']}\n    settings: {r['settings']}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.1f}" if base else "-"
        print(f"{r['recipe']:<28}{r['tokens_per_s']:>9.0f}{r['s_per_step']:>8.2f}{r['tokens_per_step']:>10.0f}"
              f"{r['peak_gib']:>10.1f}{r['mfu']:>7.1%}{ratio:>7}{r['first_step_s']:>11.1f}")
        print(f"    settings: {r['settings']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
