"""Format stage: data rows (job/readers.py: CSV, TSV, JSON lines, Parquet) -> prompt/completion records in
data/train.jsonl and data/eval.jsonl.

Vectorised with pyarrow and pandas (the notebook's row-wise `apply` took about 42 s on the full SNLI train
split; see docs/benchmarks.md). Every way a CSV can be wrong ends in an InputError that names the
file and the row, line or column, and nothing is written before the data is known to be good.
"""

from __future__ import annotations

import json

import pandas as pd

from job.config import Config
from job.errors import InputError
from job.layout import EVAL_DATA, STATS, TRAIN_DATA
from job.pipeline import Context
from job.prompts import RESPONSE_END, build_prompt
from job.readers import read_rows


def run(cfg: Config, ctx: Context) -> dict:
    name = cfg.data.uri
    frame = read_rows(cfg, ctx.work_dir, [cfg.data.label_column, cfg.data.source_column, cfg.data.target_column]
                      if cfg.data.label is not None else [cfg.data.source_column, cfg.data.target_column])
    records, stats = select_rows(frame, cfg, name)
    train, evaluation = split(records, cfg, name)
    train_text, eval_text = to_jsonl(train, cfg), to_jsonl(evaluation, cfg)
    stats.update(train_rows=len(train), eval_rows=len(evaluation))

    ctx.store.write_text(TRAIN_DATA, train_text)
    ctx.store.write_text(EVAL_DATA, eval_text)
    ctx.store.write_text(STATS, json.dumps(stats, indent=2) + "\n")
    ctx.log.info("format: %d rows read, %d kept (%d train, %d eval); dropped %s",
                 stats["rows_read"], stats["rows_kept"], len(train), len(evaluation), stats["dropped"])
    return stats


def select_rows(frame: pd.DataFrame, cfg: Config, name: str) -> tuple[pd.DataFrame, dict]:
    """Keep rows with the label, strip, drop blanks and exact duplicates; count each reason."""
    d = cfg.data
    stats = {"source": name, "rows_read": len(frame), "dropped": {}}
    frame = frame.assign(row=range(1, len(frame) + 1))
    if d.label is not None:
        keep = frame[d.label_column].str.strip() == d.label
        if not keep.any():
            seen = frame[d.label_column].value_counts().head(10)
            labels = ", ".join(f"{k!r} ({v})" for k, v in seen.items())
            raise InputError(f"{name}: no row has {d.label_column} == {d.label!r}; values seen: {labels}. "
                             "Set data.label (or null to keep every row)")
        stats["dropped"]["other_label"] = int((~keep).sum())
        frame = frame[keep]

    records = pd.DataFrame({"source": frame[d.source_column].str.strip(),
                            "target": frame[d.target_column].str.strip(), "row": frame["row"]})
    blank = (records["source"] == "") | (records["target"] == "")
    stats["dropped"]["blank"] = int(blank.sum())
    records = records[~blank]
    duplicate = records.duplicated(subset=["source", "target"])
    stats["dropped"]["duplicate"] = int(duplicate.sum())
    records = records[~duplicate]
    if records.empty:
        raise InputError(f"{name}: no usable rows left after dropping {stats['dropped']}")
    if d.max_rows is not None and len(records) > d.max_rows:
        stats["dropped"]["over_max_rows"] = len(records) - d.max_rows
        records = records.sample(n=d.max_rows, random_state=d.seed).sort_values("row")
    stats["rows_kept"] = len(records)
    return records, stats


def split(records: pd.DataFrame, cfg: Config, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded random eval set; the rest, in file order, is for training."""
    n_eval = cfg.data.eval_size
    if n_eval >= len(records):
        raise InputError(f"{name}: only {len(records)} usable rows, but data.eval_size is {n_eval}; "
                         "lower data.eval_size or supply more rows")
    evaluation = records.sample(n=n_eval, random_state=cfg.data.seed).sort_values("row")
    return records.drop(evaluation.index), evaluation


def to_jsonl(records: pd.DataFrame, cfg: Config) -> str:
    """prompt/completion records; the completion is json.dumps output, built column-wise."""
    p = cfg.prompt
    # The template around the input is constant: build it once and concatenate whole columns.
    marker = "\u0000INPUT\u0000"
    before, after = build_prompt(marker, p).split(marker)
    out = pd.DataFrame({
        "prompt": before + records["source"] + after,
        "completion": [json.dumps({p.original_key: s, p.output_key: t}, ensure_ascii=False) + RESPONSE_END
                       for s, t in zip(records["source"].tolist(), records["target"].tolist())],
        "source": records["source"],
        "target": records["target"],
        "row": records["row"],
    })
    if out.empty:
        return ""
    return out.to_json(orient="records", lines=True, force_ascii=False)
