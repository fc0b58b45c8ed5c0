"""The evaluation report: metrics from parsed generations, report.json, report.md, predictions.jsonl and
the loss curve. Pure functions of their inputs (no model, no storage) so each piece is testable alone.

Metric definitions (each a rate over every evaluated example; an unparseable answer counts as a miss):
  json_valid_rate      the answer holds a JSON object that parses strictly (code fences, trailing text ok)
  schema_valid_rate    ... with both keys, each a string
  original_match_rate  the echoed sentence equals the input exactly (surrounding whitespace ignored)
  copy_rate            the answer gives the input back instead of a negation: its "negation" equals the
                       input, or, when no "negation" could be read at all, the raw answer contains the
                       input verbatim other than as an "original_sentence" value (both after
                       normalization). The second half keeps a model that never writes JSON but repeats
                       its input in prose from scoring a perfect 0.
  gold_match_rate      the "negation" equals the gold sentence after normalization
  eos_stop_rate        generation ended with EOS before evaluate.max_new_tokens
  chrf                 sacrebleu corpus chrF (0-100) of the "negation" against the gold sentence; an
                       answer without one counts as the empty string
Normalization: surrounding whitespace stripped, case folded, runs of whitespace collapsed to one space.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from job.config import PromptConfig
from job.prompts import ParsedResponse, parse_response

NORMALIZATION = "strip, casefold, collapse whitespace"
RATE_KEYS = ("json_valid_rate", "schema_valid_rate", "original_match_rate", "copy_rate", "gold_match_rate",
             "eos_stop_rate")
TABLE = [("json_valid_rate", "valid JSON", "{:.1%}"), ("schema_valid_rate", "schema valid", "{:.1%}"),
         ("original_match_rate", "echoed input exactly", "{:.1%}"),
         ("copy_rate", "copied the input (lower is better)", "{:.1%}"),
         ("gold_match_rate", "equals the gold sentence", "{:.1%}"), ("eos_stop_rate", "stopped at EOS", "{:.1%}"),
         ("chrf", "chrF vs gold", "{:.1f}"), ("mean_new_tokens", "new tokens per answer", "{:.1f}"),
         ("seconds_per_example", "seconds per example", "{:.3f}"), ("tokens_per_s", "tokens/s", "{:.1f}")]
EXAMPLES_IN_MD = 10


def normalize(text: Optional[str]) -> str:
    return re.sub(r"\s+", " ", (text or "").strip().casefold())


def is_copy(parsed: ParsedResponse, source: str) -> bool:
    """The answer repeats the input instead of negating it (see copy_rate above)."""
    text = normalize(source)
    if parsed.output is not None:
        return normalize(parsed.output) == text
    if not text:
        return False
    # Echoing the input as "original_sentence" is what the task asks for, even in a truncated answer.
    echo = re.compile(r"""original_sentence["']?\s*:\s*["']?""" + re.escape(text))
    return text in echo.sub("", normalize(parsed.raw))


def parse_all(generations: list, prompt_cfg: PromptConfig) -> list[ParsedResponse]:
    return [parse_response(g.text, prompt_cfg) for g in generations]


def score(records: list[dict], generations: list, parsed: list[ParsedResponse], stats) -> dict:
    """The metrics of one model on the eval records (`generations` from job.predict.generate)."""
    import sacrebleu

    n = len(records)
    if n == 0:
        raise ValueError("no examples to score")
    counts = dict.fromkeys(RATE_KEYS, 0)
    for record, g, p in zip(records, generations, parsed):
        source, gold = record["source"], record["target"]
        counts["json_valid_rate"] += p.json_valid
        counts["schema_valid_rate"] += p.schema_valid
        counts["original_match_rate"] += p.original is not None and p.original.strip() == source.strip()
        counts["copy_rate"] += is_copy(p, source)
        counts["gold_match_rate"] += p.output is not None and normalize(p.output) == normalize(gold)
        counts["eos_stop_rate"] += g.eos_stop
    chrf = sacrebleu.corpus_chrf([p.output or "" for p in parsed], [[r["target"] for r in records]]).score
    new_tokens = sum(g.new_tokens for g in generations)
    return {
        **{key: round(value / n, 4) for key, value in counts.items()},
        "chrf": round(chrf, 2),
        "recovered_python_dict_rate": round(sum(p.recovered for p in parsed) / n, 4),
        "mean_new_tokens": round(new_tokens / n, 2),
        "generation_seconds": round(stats.seconds, 3),
        "seconds_per_example": round(stats.seconds / n, 4),
        "tokens_per_s": round(new_tokens / stats.seconds, 1) if stats.seconds > 0 else None,
        "new_tokens": new_tokens,
        "batches": stats.batches,
    }


def prediction_rows(records: list[dict], outputs: dict) -> list[dict]:
    """One row per eval record: input, gold, and for each model its raw answer and what was parsed.
    `outputs`: {"finetuned": (generations, parsed), "base": (generations, parsed) or absent}."""
    rows = []
    for i, record in enumerate(records):
        row = {"row": record.get("row"), "input": record["source"], "gold": record["target"]}
        for name in ("finetuned", "base"):
            if name not in outputs:
                continue
            g, p = outputs[name][0][i], outputs[name][1][i]
            row[name] = {"raw": g.text, "negation": p.output, "original": p.original, "json_valid": p.json_valid,
                         "schema_valid": p.schema_valid, "eos_stop": g.eos_stop, "new_tokens": g.new_tokens}
        rows.append(row)
    return rows


def train_summary(train_metrics: dict) -> dict:
    m = train_metrics or {}
    return {"steps": m.get("steps"), "tokens": m.get("tokens_seen"), "tokens_per_s": m.get("tokens_per_s"),
            "peak_gpu_memory_gb": m.get("peak_gpu_memory_gb"), "final_loss": m.get("final_loss"),
            "train_seconds": m.get("train_seconds"), "examples": m.get("examples"),
            "dropped_too_long": m.get("dropped_too_long"), "resumed_from_step": m.get("resumed_from_step"),
            "load_in_4bit": m.get("load_in_4bit"), "compute_dtype": m.get("compute_dtype"),
            "model_revision": m.get("model_revision")}  # the commit an hf:// base model resolved to


MERGE_KEYS = ("max_logit_diff", "tolerance", "tolerance_source", "logit_scale", "adapter_effect", "top1_agreement",
              "logits_check", "logits_check_reason", "tensors_checked", "max_error_ulps", "method",
              "dtype", "device", "merged_layers", "shards", "peak_rss_gb", "peak_gpu_memory_gb", "merge_seconds",
              "stage_seconds")


def merge_summary(merge_marker: Optional[dict]) -> dict:
    if merge_marker is None:
        return {"enabled": False, "max_logit_diff": None,
                "note": "merge.enabled: false; the fine-tuned model is the base model with the adapter applied"}
    m = merge_marker.get("metrics", {})
    return {"enabled": True, **{k: m.get(k) for k in MERGE_KEYS}}


def export_summary(export_marker: Optional[dict]) -> Optional[dict]:
    """The GGUF export's read-back check per file (None when the export is disabled)."""
    if export_marker is None:
        return None
    m = export_marker.get("metrics", {})
    return {"files": {t: {k: f.get(k) for k in ("file", "bytes", "write_seconds", "peak_rss_gb", "check")}
                      for t, f in (m.get("files") or {}).items()},
            **{k: m.get(k) for k in ("modelfile", "arch", "tokenizer_model", "tokenizer_pre", "add_bos_token",
                                     "tied_embeddings", "check_examples")}}


def _export_markdown(e: Optional[dict]) -> list[str]:
    if not e:
        return []
    out = ["", "## GGUF export", "",
           f"{_fmt(e['arch'])} architecture, tokenizer {_fmt(e['tokenizer_model'])}"
           + (f" (pre {e['tokenizer_pre']})" if e.get("tokenizer_pre") else "")
           + f", Ollama file `{_fmt(e['modelfile'])}`. Each file read back with transformers on "
           f"{_fmt(e['check_examples'])} eval examples against merged/:", "",
           "| file | MB | top-token agreement (min) | max logit diff | same tokens | same chat template "
           "| peak RSS GB |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in e["files"].values():
        c = f.get("check") or {}
        out.append(f"| `{f['file']}` | {f['bytes'] / 1e6:.1f} | {_fmt(c.get('argmax_agreement'), '{:.2%}')} "
                   f"({_fmt(c.get('min_agreement'))}) | {_fmt(c.get('max_logit_diff'), '{:.3g}')} | "
                   f"{_fmt(c.get('same_tokens'))} | {_fmt(c.get('same_chat_template'))} | {_fmt(f['peak_rss_gb'])} |")
    return out


# ----------------------------------------------------------------------------------------------
# report.md


def render_markdown(report: dict, rows: list[dict]) -> str:
    base = report.get("base")
    out = ["# Evaluation report", ""]
    out += [f"- run: `{report['run_uri']}`", f"- created: {report['created_at']}, job {report['job_version']}",
            f"- config digest: `{report['config_digest']}` (stage fingerprints: "
            + ", ".join(f"{k} `{v}`" for k, v in report["fingerprints"].items()) + ")",
            f"- evaluated model: {report['finetuned_model']}", ""]
    out += ["## Settings", "", "| key | value |", "| --- | --- |"]
    out += [f"| `{k}` | {_cell(v)} |" for k, v in report["settings"].items()]

    d = report.get("data") or {}
    out += ["", "## Data", "",
            f"{_fmt(d.get('rows_read'))} CSV rows read, {_fmt(d.get('rows_kept'))} kept "
            f"({_fmt(d.get('train_rows'))} train, {_fmt(d.get('eval_rows'))} eval); dropped: "
            f"{_cell(d.get('dropped'))}. Evaluated: {report['n_examples']} eval rows."]

    t = report["train"]
    out += ["", "## Training", "",
            f"{_fmt(t['steps'])} steps, {_fmt(t['tokens'])} tokens at {_fmt(t['tokens_per_s'])} tokens/s "
            f"in {_fmt(t['train_seconds'])} s; final loss {_fmt(t['final_loss'], '{:.4f}')}; peak GPU memory "
            f"{_fmt(t['peak_gpu_memory_gb'])} GiB; 4-bit base: {_fmt(t['load_in_4bit'])}, compute "
            f"{_fmt(t['compute_dtype'])}."
            + (f" Base model commit `{t['model_revision']}` (Hugging Face Hub)." if t.get("model_revision") else "")]
    out += ["", "![training loss](loss_curve.png)"]

    m = report["merge"]
    out += ["", "## Merge check", ""]
    if m["enabled"]:
        if m.get("tensors_checked") is not None:
            out += [f"Every tensor ({m['tensors_checked']}) read back: base + adapter within "
                    f"{_fmt(m['max_error_ulps'], '{:.2f}')} units in the last place of {_fmt(m['dtype'])}.", ""]
    if m["enabled"] and m.get("max_logit_diff") is None and m.get("logits_check_reason"):
        out += [f"Merged in {_fmt(m['dtype'])} ({_fmt(m['merged_layers'])} LoRA layers, {_fmt(m['shards'])} "
                f"safetensors shards). Logits check skipped: {m['logits_check_reason']}. Peak memory: "
                f"{_fmt(m['peak_rss_gb'])} GB resident."]
    elif m["enabled"]:
        out += [f"Merged in {_fmt(m['dtype'])} on {_fmt(m['device'])} ({_fmt(m['merged_layers'])} LoRA layers, "
                f"{_fmt(m['shards'])} safetensors shards). Max logit difference merged vs base+adapter: "
                f"**{_fmt(m['max_logit_diff'], '{:.4g}')}** (tolerance {_fmt(m['tolerance'], '{:.4g}')}, "
                f"{_fmt(m['tolerance_source'])}; logit scale {_fmt(m['logit_scale'], '{:.3g}')}); "
                f"the adapter itself moves logits by up to {_fmt(m['adapter_effect'], '{:.3g}')}; top-1 "
                f"agreement {_fmt(m['top1_agreement'], '{:.1%}')}. Peak memory: {_fmt(m['peak_rss_gb'])} GB "
                f"resident, GPU {_fmt(m['peak_gpu_memory_gb'])} GiB."]
    else:
        out += [m["note"] + "."]
    out += _export_markdown(report.get("export"))

    g = report["generation"]
    out += ["", "## Metrics", "",
            f"{report['n_examples']} examples; "
            f"{'sampling at temperature ' + str(g['temperature']) if g['do_sample'] else 'greedy'}, "
            f"at most {g['max_new_tokens']} new tokens, batches of {g['batch_size']}, "
            f"{g['dtype']} on {g['device']}.", ""]
    header = "| metric | base | fine-tuned |" if base else "| metric | fine-tuned |"
    out += [header, "| --- | --- | --- |" if base else "| --- | --- |"]
    for key, label, fmt in TABLE:
        cells = ([_fmt(base.get(key), fmt)] if base else []) + [_fmt(report["finetuned"].get(key), fmt)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", f"Rates are over all {report['n_examples']} examples; an answer that does not parse counts as a "
            f"miss. Normalization for copy and gold matches: {NORMALIZATION}. chrF: sacrebleu corpus chrF "
            "of the negation against the gold sentence (no negation: empty string)."]

    out += ["", f"## Examples (first {min(EXAMPLES_IN_MD, len(rows))})", ""]
    for i, row in enumerate(rows[:EXAMPLES_IN_MD], start=1):
        out += [f"**{i}.** input: {_cell(row['input'])}  ", f"gold: {_cell(row['gold'])}  "]
        for name, label in (("base", "base"), ("finetuned", "fine-tuned")):
            if name in row:
                r = row[name]
                shown = r["negation"] if r["schema_valid"] else f"(not valid: `{_cell(_clip(r['raw']))}`)"
                out.append(f"{label}: {_cell(shown)}  ")
        out.append("")
    out += ["Every example, with raw outputs: `predictions.jsonl`.", ""]
    return "\n".join(out)


def _fmt(value, fmt: str = "{}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and fmt == "{}":
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and fmt == "{}":
        return f"{value:,}"
    return fmt.format(value)


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + "..."


# ----------------------------------------------------------------------------------------------
# plot


def plot_loss(loss_curve: list[dict], path) -> None:
    """The training loss by step as a PNG (a note in the frame when no loss was logged)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a container
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in loss_curve or []]
    losses = [e["loss"] for e in loss_curve or []]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        ax.plot(steps, losses, marker="." if len(steps) < 60 else None, linewidth=1.2)
    else:
        ax.text(0.5, 0.5, "no training loss was logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
