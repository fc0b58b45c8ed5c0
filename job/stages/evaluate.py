"""Evaluate stage: generate on data/eval.jsonl with the fine-tuned model (and the base model, for
comparison), parse every answer, and write report/ (report.json, report.md, predictions.jsonl,
loss_curve.png).

The fine-tuned model is merged/ when the merge stage ran, else the base with adapter/ applied. The two
models are loaded one after the other, never together. Generation: batched, left padding, greedy
unless evaluate.do_sample, stopping at EOS or evaluate.max_new_tokens (job/predict.py).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import job
from job.config import Config, section_digest
from job.errors import ConfigError, InputError
from job.model import check_model_folder, fetch_model
from job.predict import generate, inference_dtype, load_inference_tokenizer, load_model
from job.run_files import check_adapter, read_json_object, read_jsonl
from job.report import export_summary, merge_summary, parse_all, plot_loss, prediction_rows, render_markdown, score, train_summary
from job.stages import storage_options
from job.storage import redact_uri

EVAL_DATA, STATS = "data/eval.jsonl", "data/stats.json"
REPORT = "report"


def run(cfg: Config, ctx) -> dict:
    import torch

    t_start = time.monotonic()
    e = cfg.evaluate
    records = read_jsonl(ctx.store, EVAL_DATA, "format", keys=("prompt", "source", "target"), allow_empty=True)
    if not records:
        raise InputError(f"{EVAL_DATA} has no rows (data.eval_size is {cfg.data.eval_size}): nothing to evaluate. "
                         "Set data.eval_size above 0, or evaluate.enabled: false")
    available = len(records)
    if e.max_examples is not None and e.max_examples < 1:
        raise ConfigError(f"evaluate.max_examples: must be positive or null (all rows), got {e.max_examples}")
    if e.do_sample and e.temperature <= 0:
        raise ConfigError(f"evaluate.temperature: must be above 0 when sampling, got {e.temperature}")
    if e.max_examples is not None:
        records = records[:e.max_examples]  # eval rows are already a seeded random sample
    prompts = [r["prompt"] for r in records]
    dtype = inference_dtype()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx.log.info("evaluate: %d of %d eval rows, %s, at most %d new tokens, batches of %d, %s on %s",
                 len(records), available, "sampling" if e.do_sample else "greedy", e.max_new_tokens,
                 e.batch_size, str(dtype).removeprefix("torch."), device)

    model_dir = fetch_model(cfg.model.uri, cfg, storage_options(cfg))
    merge_marker = ctx.upstream.get("merge")
    if merge_marker is not None:
        folder = merged_folder(ctx, merge_marker)
        model, tokenizer = load_model(folder, None, cfg, dtype), load_inference_tokenizer(folder, "merged/")
        described = "merged/ (the merged model)"
    else:
        adapter = ctx.work_dir / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        ctx.store.download_dir("adapter", adapter)
        check_adapter(adapter, ctx.store.uri_of("adapter"))
        model = load_model(model_dir, adapter, cfg, dtype)
        tokenizer = load_inference_tokenizer(adapter, "adapter/")
        described = "the base model with adapter/ applied (merge disabled)"

    outputs, scores = {}, {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the merge stage may have run in this process
    for name in ("finetuned", "base"):
        if name == "base":
            if not e.compare_base:
                break
            model = load_model(model_dir, None, cfg, dtype)
            tokenizer = load_inference_tokenizer(model_dir, cfg.model.uri)
        ctx.log.info("evaluate: generating with the %s model", "fine-tuned" if name == "finetuned" else "base")
        generations, stats = generate(model, tokenizer, prompts, e.max_new_tokens, e.batch_size, e.do_sample,
                                      e.temperature, cfg.data.seed, progress=ctx.log)
        parsed = parse_all(generations, cfg.prompt)
        outputs[name] = (generations, parsed)
        scores[name] = score(records, generations, parsed, stats)
        if device == "cuda":
            scores[name]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        ctx.log.info("evaluate: %s: %s", name, {k: scores[name][k] for k in (
            "json_valid_rate", "schema_valid_rate", "copy_rate", "eos_stop_rate", "chrf", "tokens_per_s")})
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    rows = prediction_rows(records, outputs)
    report = build_report(cfg, ctx, records, scores, described, dtype, device, available)
    files = write_report(ctx, report, rows)
    ctx.log.info("evaluate: wrote %s", ", ".join(files))
    return {"n_examples": report["n_examples"], "finetuned": scores["finetuned"], "base": scores.get("base"),
            "files": files, "stage_seconds": round(time.monotonic() - t_start, 1)}


def merged_folder(ctx, merge_marker: dict) -> Path:
    """merged/ on local disk: the merge stage's own folder when it ran here for this very result (no
    13 GB download for a 7B), else a fresh download from the run."""
    local = ctx.work_dir.parent / "merge"
    stamp = local / "merged.fingerprint"
    if stamp.is_file() and stamp.read_text().strip() == merge_marker["fingerprint"] and (local / "merged").is_dir():
        return local / "merged"
    target = ctx.work_dir / "merged"
    shutil.rmtree(target, ignore_errors=True)
    ctx.log.info("%s: downloading merged/ from the run (the merge ran elsewhere or earlier)", ctx.log.name.rpartition(".")[2])
    ctx.store.download_dir("merged", target)
    # A merged/ changed after the merge (a truncated shard, a missing file) ends in exit 2, not a traceback.
    check_model_folder(target, redact_uri(ctx.store.uri_of("merged")), what="merged/",
                       remedy="rerun with --force merge to write it again (and redo the stages after it)")
    return target


def build_report(cfg: Config, ctx, records, scores, described, dtype, device, available) -> dict:
    train = ctx.upstream.get("train", {})
    stats = read_json_object(ctx.store, STATS, "format") if ctx.store.exists(STATS) else None
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
                       "dtype": str(dtype).removeprefix("torch."), "device": device},
        "normalization": "strip, casefold, collapse whitespace (copy_rate, gold_match_rate)",
        "run_uri": redact_uri(cfg.run_uri),
        "config_digest": section_digest(cfg),
        "fingerprints": {**{name: m.get("fingerprint") for name, m in ctx.upstream.items()}, "evaluate": ctx.fingerprint},
        "settings": {"model.uri": redact_uri(cfg.model.uri), "data.uri": redact_uri(cfg.data.uri),
                     "train.load_in_4bit": t.load_in_4bit, "train.lora_r": t.lora_r, "train.lora_alpha": t.lora_alpha,
                     "train.lora_dropout": t.lora_dropout, "train.target_modules": t.target_modules,
                     "train.learning_rate": t.learning_rate, "train.epochs": t.epochs, "train.max_steps": t.max_steps,
                     "merge.enabled": cfg.merge.enabled, "merge.dtype": cfg.merge.dtype,
                     "evaluate.max_new_tokens": e.max_new_tokens, "evaluate.do_sample": e.do_sample},
        "job_version": job.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
