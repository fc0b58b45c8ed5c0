"""Evaluate stage: generate on data/eval.jsonl with the fine-tuned model (and the base model, for
comparison), parse every answer, and write report/ (report.json, report.md, predictions.jsonl,
loss_curve.png).

The fine-tuned model (evaluate.model, job/predict.py:inference_plan): merged/ in 16 bits when it fits the
GPU (always on the CPU), else the base in 4 bits with adapter/ applied, the model as trained; without a
merge stage, the base with adapter/ applied in 16 bits when it fits. The report says which and why. The
base model for comparison is loaded in the same precision. The two models are loaded one after the
other, never together. The generation batch is planned from the GPU memory left after loading, and
halved whenever CUDA runs out of memory (job/predict.py:generate). Generation: batched, left padding, greedy
unless evaluate.do_sample, stopping at EOS or evaluate.max_new_tokens (job/predict.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import job
from job.clock import utc_timestamp
from job.config import Config, section_digest
from job.dtypes import dtype_name, pick_dtype
from job.errors import InputError
from job.layout import ADAPTER, EVAL_DATA, MERGED, REPORT, STATS
from job.model import fetch_model
from job.peaks import reset_gpu_peak
from job.platform import free_gpu_memory
from job.predict import generate, inference_plan, load_inference_tokenizer, load_model
from job.report import (
    export_summary,
    merge_summary,
    parse_all,
    plot_loss,
    prediction_rows,
    render_markdown,
    score,
    train_summary,
)
from job.run_files import DataStats, check_adapter, download_run_folder, read_jsonl, read_run_json
from job.stages.merged import merged_folder
from job.storage import redact_uri


def run(cfg: Config, ctx) -> dict:
    """eval rows -> the fine-tuned model generates (then the base, for comparison) -> parse and score ->
    report/."""
    import torch

    e = cfg.evaluate
    records, available = eval_rows(cfg, ctx)
    prompts = [r["prompt"] for r in records]
    dtype, dtype_reason = pick_dtype("auto", "inference")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx.log.info("evaluate: %d of %d eval rows, %s, at most %d new tokens, batches of %d, %s (%s) on %s",
                 len(records), available, "sampling" if e.do_sample else "greedy", e.max_new_tokens,
                 e.batch_size, dtype_name(dtype), dtype_reason, device)

    model_dir = fetch_model(cfg.model.uri, cfg)
    base_tokenizer = load_inference_tokenizer(model_dir, cfg.model.uri)
    longest = max(len(ids) for ids in base_tokenizer(prompts)["input_ids"])
    four_bit, why = inference_plan(e.model, model_dir, longest, e.max_new_tokens)
    outputs, scores = {}, {}
    for name in ("finetuned", "base") if e.compare_base else ("finetuned",):
        if name == "finetuned":
            model, tokenizer, described = finetuned_model(cfg, ctx, model_dir, dtype, four_bit, why)
            ctx.log.info("evaluate: the fine-tuned model is %s", described)
        else:  # the base in the same precision as the fine-tuned model: the comparison is about the adapter
            model, tokenizer = load_model(model_dir, None, cfg, dtype, four_bit=four_bit), base_tokenizer
        ctx.log.info("evaluate: generating with the %s model", "fine-tuned" if name == "finetuned" else "base")
        with ctx.timer(f"generate_{name}"):
            generations, stats = generate(model, tokenizer, prompts, e.max_new_tokens, e.batch_size, e.do_sample,
                                          e.temperature, cfg.data.seed, progress=ctx.log)
        parsed = parse_all(generations, cfg.prompt)
        outputs[name] = (generations, parsed)
        scores[name] = score(records, generations, parsed, stats)
        scores[name].update(batch_size=stats.batch_size, oom_halvings=stats.oom_halvings)
        if stats.batch_note:
            scores[name]["batch_note"] = stats.batch_note
        if device == "cuda":
            scores[name]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        ctx.log.info("evaluate: %s: %s", name, {k: scores[name][k] for k in (
            "json_valid_rate", "schema_valid_rate", "copy_rate", "eos_stop_rate", "chrf", "tokens_per_s")})
        del model
        free_gpu_memory()
        if device == "cuda":
            reset_gpu_peak()  # each model's own peak; the stage's peak is kept

    rows = prediction_rows(records, outputs)
    report = build_report(cfg, ctx, records, scores, described, dtype, device, available)
    report["model_choice"] = {"setting": e.model, "four_bit": four_bit, "reason": why}
    files = write_report(ctx, report, rows)
    ctx.log.info("evaluate: wrote %s", ", ".join(files))
    return {"n_examples": report["n_examples"], "finetuned": scores["finetuned"], "base": scores.get("base"),
            "files": files, "stage_seconds": round(ctx.elapsed(), 1)}


def eval_rows(cfg: Config, ctx) -> tuple[list[dict], int]:
    """(the rows to evaluate, how many the run holds): data/eval.jsonl, at most evaluate.max_examples."""
    records = read_jsonl(ctx.store, EVAL_DATA, "format", keys=("prompt", "source", "target"), allow_empty=True)
    if not records:
        raise InputError(f"{EVAL_DATA} has no rows (data.eval_size is {cfg.data.eval_size}): nothing to evaluate. "
                         "Set data.eval_size above 0, or evaluate.enabled: false")
    if cfg.evaluate.max_examples is not None:
        return records[:cfg.evaluate.max_examples], len(records)  # eval rows are already a seeded random sample
    return records, len(records)


def finetuned_model(cfg: Config, ctx, model_dir: Path, dtype, four_bit: bool = False,
                    why: str = "") -> tuple[object, object, str]:
    """(model, tokenizer, what it is and why): merged/ when the merge ran and 16 bits were chosen
    (inference_plan), else the base with adapter/ applied (in 4 bits, as trained, when four_bit)."""
    merge_marker = ctx.upstream.get("merge")
    if merge_marker is not None and not four_bit:
        folder = merged_folder(ctx, merge_marker)
        return (load_model(folder, None, cfg, dtype), load_inference_tokenizer(folder, f"{MERGED}/"),
                f"{MERGED}/ (the merged model, {dtype_name(dtype)}; {why})")
    adapter = ctx.work_dir / ADAPTER
    shutil.rmtree(adapter, ignore_errors=True)
    download_run_folder(ctx.store, ADAPTER, adapter, "train")
    check_adapter(adapter, ctx.store.uri_of(ADAPTER))
    if four_bit:
        described = (f"the base model in 4 bits ({cfg.train.quant_type}) with {ADAPTER}/ applied, as trained "
                     f"({why})")
    else:
        described = f"the base model ({dtype_name(dtype)}) with {ADAPTER}/ applied (merge disabled; {why})"
    return (load_model(model_dir, adapter, cfg, dtype, four_bit=four_bit),
            load_inference_tokenizer(adapter, f"{ADAPTER}/"), described)


def build_report(cfg: Config, ctx, records, scores, described, dtype, device, available) -> dict:
    train = ctx.upstream.get("train", {})
    stats = read_run_json(ctx.store, STATS, "format", DataStats)
    e, t = cfg.evaluate, cfg.train
    return {
        "n_examples": len(records),
        "eval_rows_available": available,
        "finetuned": scores["finetuned"],
        "base": scores.get("base"),
        "finetuned_model": described,
        "train": train_summary(train.get("metrics", {})),
        "merge": merge_summary(ctx.upstream.get("merge")),
        "export": export_summary(ctx.upstream.get("export")),
        "data": stats,
        "generation": {"max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size, "do_sample": e.do_sample,
                       "temperature": e.temperature if e.do_sample else None,
                       "dtype": dtype_name(dtype), "device": device},
        "normalization": "strip, casefold, collapse whitespace (copy_rate, gold_match_rate)",
        "run_uri": redact_uri(cfg.run_uri),
        "config_digest": section_digest(cfg),
        "fingerprints": {**{name: m.get("fingerprint") for name, m in ctx.upstream.items()},
                         "evaluate": ctx.fingerprint},
        "settings": {"model.uri": redact_uri(cfg.model.uri), "data.uri": redact_uri(cfg.data.uri),
                     "train.load_in_4bit": t.load_in_4bit, "train.lora_r": t.lora_r, "train.lora_alpha": t.lora_alpha,
                     "train.lora_dropout": t.lora_dropout, "train.target_modules": t.target_modules,
                     "train.learning_rate": t.learning_rate, "train.epochs": t.epochs, "train.max_steps": t.max_steps,
                     "merge.enabled": cfg.merge.enabled, "merge.dtype": cfg.merge.dtype,
                     "evaluate.max_new_tokens": e.max_new_tokens, "evaluate.do_sample": e.do_sample,
                     "evaluate.model": e.model},
        "job_version": job.__version__,
        "created_at": utc_timestamp(),
    }


def write_report(ctx, report: dict, rows: list[dict]) -> list[str]:
    """report/ in storage; the run's report folder is replaced as a whole (stale files never linger)."""
    local = ctx.work_dir / REPORT
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    plot_loss(ctx.upstream.get("train", {}).get("metrics", {}).get("loss_curve", []), local / "loss_curve.png")
    (local / "predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (local / "report.md").write_text(render_markdown(report, rows), encoding="utf-8")
    (local / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n",
                                       encoding="utf-8")
    ctx.store.delete(REPORT)
    return [f"{REPORT}/{name}" for name in ctx.store.upload_dir(local, REPORT)]
