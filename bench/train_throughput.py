"""Training throughput on one card: the Colab notebook's QLoRA recipe against the job's train stage
with its defaults (and any variants), on the same data and model shape.

    python bench/train_throughput.py --shape 7b --steps 12 --warmup 4 --repeats 3 \
        [--variant sdpa --variant varlen --variant varlen+liger --variant flex] \
        [--variant "mine: train.lora_dropout=0"] \
        [--variant "seg: env:PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"] [--cap-gb 80] [--out results.json]

Each recipe runs in a fresh process of its own, one after another, on the same card: Liger patches
the architecture's module for the whole process (it cannot be switched off again), and a fresh
process also shows the start-up a batch job pays (first_step_s: from building the trainer, model load
included, to the end of the first optimizer step; process_first_step_s: from the process start).
With --repeats N the notebook and the job defaults alternate N times (notebook, job, notebook, ...),
so a drift of the machine hits both; the summary gives each recipe's median and spread.
Presets for --variant: sdpa, varlen, varlen+liger, flex (see VARIANTS); any other value is
"NAME: key=value key=value", the job recipe with those settings (a word "env:VAR=value" sets the recipe
process's environment instead).

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
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()

import torch  # noqa: E402 - PROCESS_START counts the import too

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "small": (1024, 8, 16, 16, 2816, 32000),
}
PEAK_FLOPS = 989e12
VARIANTS = {  # named variants of the job recipe
    "sdpa": ("model.attn_implementation=sdpa", "train.liger=false"),
    "varlen": ("model.attn_implementation=varlen", "train.liger=false"),
    "varlen+liger": ("model.attn_implementation=varlen", "train.liger=true"),
    "flex": ("model.attn_implementation=flex_attention", "train.liger=false"),
}


def make_records(n: int) -> list[dict]:
    from job.config import load_config
    from job.readers import read_csv
    from job.stages.format import select_rows, to_jsonl

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


def step_profiler(start_step: int, out: Path):
    """A callback that runs torch.profiler over the two optimizer steps after `start_step` and writes the
    kernels' GPU time (the top 40, by total) to `out`. Profiling slows those steps: read the shares, not the
    tokens/s of a profiled run."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        profiler = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == start_step:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
            elif state.global_step == start_step + 2 and self.profiler is not None:
                torch.cuda.synchronize()
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages().table(sort_by="device_time_total", row_limit=40,
                                                           max_name_column_width=90)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(table)
                self.profiler = None

    return Profile()


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
    from job.dtypes import pick_dtype
    from job.pipeline import Context
    from job.stages.labels import tokenize_examples
    from job.stages.train import build_trainer, choose_kernels, load_base_model, plan_batch
    from job.storage import open_store

    cfg = load_config(None, (f"run_uri={out_dir}/run", "data.uri=x.csv", f"model.uri={model_dir}",
                             f"train.max_steps={steps}", "train.checkpoint_every_steps=0",
                             "train.checkpoint_every_minutes=0", "train.logging_steps=1000", *sets), environ={})
    examples = tokenize_examples(records, tokenizer, cfg.train.max_seq_length)
    dtype = pick_dtype(cfg.train.compute_dtype, "train")[0]
    kernels = choose_kernels(cfg, Path(model_dir))
    settings = plan_batch(cfg, examples, Path(model_dir), kernels)
    model = load_base_model(cfg, Path(model_dir), dtype, kernels)
    ctx = Context(store=open_store(f"{out_dir}/run"), work_dir=Path(out_dir) / "work", fingerprint="bench")
    trainer = build_trainer(cfg, ctx, model, tokenizer, examples.dataset, dtype, settings)
    trainer.args.disable_tqdm = True
    compiled = compile_decoder_layers(trainer.model, os.environ.get("BENCH_COMPILE_LAYERS", ""))
    if os.environ.get("BENCH_FUSED_BASE") == "0":  # the 4-bit base as its own autograd node (job/fused_lora.py)
        for module in trainer.model.modules():
            if hasattr(module, "fused_with_base"):
                module.fused_with_base = False
    return trainer, {**settings, "compiled_layers": compiled, "attention": kernels["attention"],
                     "liger": kernels["liger"], "liger_reason": kernels["liger_reason"],
                     "lora_dropout_recomputed": trainer.lora_dropout_recompute["layers"],
                     "fused_lora_layers": trainer.fused_lora["layers"]}


def compile_decoder_layers(model, how: str) -> int:
    """Regional compilation (issue 21's lever, as Unsloth does): `torch.compile` of each decoder layer in
    place; the layers share their code, so one compiled graph serves all of them. `how`: "" (off), "1"
    (torch's default shapes), "dynamic" (dynamic=True: packed rows change cu_seqlens every step).
    A trial in the bench (variant word env:BENCH_COMPILE_LAYERS=...), not a job setting until it wins."""
    if not how:
        return 0
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=True if how == "dynamic" else None)
    return len(layers)


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
    if os.environ.get("BENCH_PROFILE"):  # variant word env:BENCH_PROFILE=FILE: where the GPU time of 2 steps goes
        trainer.add_callback(step_profiler(warmup, Path(os.environ["BENCH_PROFILE"])))
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        del trainer, made
        gc.collect()
        torch.cuda.empty_cache()
        return {"recipe": name, "settings": settings, "tokens_per_s": float("nan"), "s_per_step": float("nan"),
                "tokens_per_step": float("nan"), "peak_gib": float("nan"), "mfu": float("nan"),
                "first_step_s": float("nan"), "error": "out of memory",
                "device": torch.cuda.get_device_name()}
    result = timer.summary(warmup)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result.update(recipe=name, settings=settings, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                  reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                  alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                  mfu=result["tokens_per_s"] * flops_per_token(shape, trainable) / PEAK_FLOPS,
                  wall_s=time.perf_counter() - t0, first_step_s=timer.marks[0][0] - t0,
                  process_first_step_s=timer.marks[0][0] - PROCESS_START, device=torch.cuda.get_device_name(),
                  losses=[e["loss"] for e in trainer.state.log_history if "loss" in e])
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def make_model_in_subprocess(model_dir: Path, shape_name: str, tokenizer: Path | None) -> None:
    """The random-weight model, made on the GPU by a process of its own (this one never touches CUDA,
    so every recipe's process finds the card as a fresh job would)."""
    if (model_dir / "config.json").is_file():
        return
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape_name]
    cmd = [sys.executable, "-m", "job.tiny_model", str(model_dir), "--csv", str(ROOT / "tests/data/snli_sample.csv"),
           "--hidden", hidden, "--layers", layers, "--heads", heads, "--kv-heads", kv, "--intermediate", inter,
           "--model-vocab", vocab, "--dtype", "bfloat16", "--device", "cuda"]
    if tokenizer:
        cmd += ["--tokenizer", str(tokenizer)]
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
    print(f"model {shape_name} made in {time.perf_counter() - t0:.1f} s: {model_dir}", flush=True)


def recipe_specs(args) -> list[dict]:
    """What to run, in order: the notebook and the job defaults alternating --repeats times, then variants."""
    recipes = [r for r in args.recipes.split(",") if r]
    specs = []
    for _ in range(args.repeats):
        specs += [{"name": "notebook", "kind": "notebook", "sets": []}] if "notebook" in recipes else []
        specs += [{"name": "job defaults", "kind": "job", "sets": []}] if "job" in recipes else []
    for variant in args.variant:
        if variant.strip() in VARIANTS:
            specs.append({"name": variant.strip(), "kind": "job", "sets": list(VARIANTS[variant.strip()])})
        else:
            name, _, sets = variant.partition(":")
            words = sets.split()
            # "env:VAR=value" words set the child's environment (e.g. PYTORCH_CUDA_ALLOC_CONF, read when
            # CUDA's allocator starts), the others are job settings
            env = dict(w[len("env:"):].split("=", 1) for w in words if w.startswith("env:"))
            specs.append({"name": name.strip(), "kind": "job", "env": env,
                          "sets": [w for w in words if not w.startswith("env:")]})
    return specs


def run_child(spec: dict, args, index: int) -> dict:
    """One recipe in a fresh process (see the module docstring); its result comes back as JSON."""
    out = Path(f"/tmp/bench-work/result-{os.getpid()}-{index}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--child-out", str(out), "--shape", args.shape,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
           "--model-dir", str(args.model_dir)] + (["--cap-gb", str(args.cap_gb)] if args.cap_gb else [])
    env = {**os.environ, **spec.get("env", {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0 or not out.is_file():
        return {"recipe": spec["name"], "settings": {"sets": spec["sets"]}, "error": f"exit code {proc.returncode}"}
    return json.loads(out.read_text())


def child_main(args) -> None:
    from job.model import load_tokenizer

    spec = json.loads(args.child)
    if args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total)
    shape = SHAPES[args.shape]
    tokenizer = load_tokenizer(args.model_dir, str(args.model_dir))
    records = make_records(args.examples)
    total = args.steps + args.warmup
    work = Path("/tmp/bench-work") / spec["name"].replace(" ", "-").replace("/", "-")
    if spec["kind"] == "notebook":
        result = run_recipe(spec["name"], lambda: notebook_trainer(args.model_dir, tokenizer, records, total, work),
                            args.warmup, shape)
    else:
        result = run_recipe(spec["name"], lambda: job_trainer(args.model_dir, tokenizer, records, total, work,
                                                              tuple(spec["sets"])), args.warmup, shape)
    result["sets"] = spec["sets"]
    args.child_out.write_text(json.dumps(result))


def summarise(results: list[dict], args) -> None:
    ok = [r for r in results if not r.get("error")]
    device = ok[0]["device"] if ok else "?"
    notebook = [r["tokens_per_s"] for r in ok if r["recipe"] == "notebook"]
    base = statistics.median(notebook) if notebook else None
    cap = f", memory capped at {args.cap_gb:g} GiB" if args.cap_gb else ""
    print(f"\n{device}, shape {args.shape}, {args.steps} measured steps after {args.warmup}{cap}")
    print("each run:")
    print(f"{'recipe':<28}{'tok/s':>9}{'s/step':>8}{'tok/step':>10}{'peak GiB':>10}{'reserved':>10}{'MFU':>7}"
          f"{'x nb':>7}{'1st step s':>11}{'from start':>11}")
    for r in results:
        if r.get("error"):
            print(f"{r['recipe']:<28}{r['error']}\n    settings: {r['settings']}")
            continue
        ratio = f"{r['tokens_per_s'] / base:.1f}" if base else "-"
        print(f"{r['recipe']:<28}{r['tokens_per_s']:>9.0f}{r['s_per_step']:>8.2f}{r['tokens_per_step']:>10.0f}"
              f"{r['peak_gib']:>10.1f}{r.get('reserved_gib', float('nan')):>10.1f}{r['mfu']:>7.1%}{ratio:>7}"
              f"{r['first_step_s']:>11.1f}"
              f"{r.get('process_first_step_s', float('nan')):>11.1f}")
        print(f"    settings: {r['settings']}")
    print("by recipe (median, spread = min-max over runs):")
    for name in dict.fromkeys(r["recipe"] for r in ok):
        runs = [r for r in ok if r["recipe"] == name]
        speeds = [r["tokens_per_s"] for r in runs]
        firsts = ", ".join(f"{r['first_step_s']:.1f}" for r in runs)
        print(f"  {name:<26} {statistics.median(speeds):>9,.0f} tok/s  spread {min(speeds):,.0f}-{max(speeds):,.0f}"
              f"  ({len(runs)} runs)  first step s: {firsts}  peak GiB {max(r['peak_gib'] for r in runs):.1f}"
              f"  reserved GiB {max(r.get('reserved_gib', 0) for r in runs):.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--examples", type=int, default=12000)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: train the test tokenizer)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    parser.add_argument("--recipes", default="notebook,job", help="comma list of notebook, job")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the notebook and the job this many times")
    parser.add_argument("--variant", action="append", default=[],
                        help=f'one of {", ".join(VARIANTS)}, or "NAME: key=value key=value" (the job recipe '
                             "with extra settings)")
    parser.add_argument("--cap-gb", type=float, help="cap each recipe's GPU memory (an H100: 80, a 16 GiB card: 16)")
    parser.add_argument("--out", type=Path, help="results as JSON (rewritten after every recipe)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)

    make_model_in_subprocess(args.model_dir, args.shape, args.tokenizer)
    results = []
    for index, spec in enumerate(recipe_specs(args)):
        results.append(run_child(spec, args, index))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    summarise(results, args)


if __name__ == "__main__":
    main()
