"""Format stage: CSV rows -> prompt/completion records in data/train.jsonl and data/eval.jsonl.

Vectorised with pyarrow and pandas (the notebook's row-wise `apply` took about 42 s on the full SNLI train
split; see docs/benchmarks.md). Every way a CSV can be wrong ends in an InputError that names the
file and the row, line or column, and nothing is written before the data is known to be good.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from job.config import Config
from job.errors import InputError
from job.layout import EVAL_DATA, STATS, TRAIN_DATA
from job.pipeline import Context
from job.prompts import RESPONSE_END, build_prompt
from job.readers import check_field_lengths, read_rows  # every format; plain CSV comes back to read_csv


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


def read_csv(path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """Read the needed columns as text with pyarrow's strict, multi-threaded parser; fail with the
    file and the row, line or column for anything malformed (pandas' C parser silently fills short
    rows with empty strings, which would hide a broken file)."""
    raw = path.read_bytes()
    if (kind := binary_kind(raw)) is not None:
        raise InputError(f"{name} is {kind}, not a CSV")
    if raw.startswith(codecs.BOM_UTF8):  # spreadsheet tools write one
        raw = raw[len(codecs.BOM_UTF8):]
    if b"\r" in raw and b"\n" not in raw:
        # Old Mac line endings (a lone CR ends each line). Quoted newlines stay inside their field.
        raw = raw.replace(b"\r", b"\n")
    if not raw.strip():
        raise InputError(f"{name}: the file is empty; expected a CSV with a header row and data rows")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{name}: line {line} (byte {exc.start}) is not valid UTF-8 "
                         f"({raw[exc.start:exc.start + 4]!r}); re-save the file as UTF-8") from None

    try:
        header = next(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InputError(f"{name}: line 1: the header row is not valid CSV ({exc})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{name}: missing column(s) {', '.join(map(repr, missing))}; the file has "
                         f"{', '.join(map(repr, header))}{_near_misses(missing, header)}. Set data.label_column / "
                         "data.source_column / data.target_column to the right names")

    bad_rows = []
    table = None
    for block_size in (16 << 20, len(raw) + 1):  # a field over 16 MB needs one block for the whole file
        bad_rows.clear()
        try:
            table = pacsv.read_csv(
                io.BytesIO(raw),
                read_options=pacsv.ReadOptions(block_size=block_size),
                parse_options=pacsv.ParseOptions(newlines_in_values=True,
                                                 invalid_row_handler=lambda row: bad_rows.append(row) or "skip"),
                convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                     column_types={c: pa.string() for c in columns},
                                                     strings_can_be_null=False, quoted_strings_can_be_null=False))
            break
        except pa.ArrowInvalid as exc:
            if "straddling" in str(exc) and block_size != len(raw) + 1:
                continue
            raise InputError(f"{name}: malformed CSV: {exc}") from None
    if bad_rows:
        row = bad_rows[0]
        line = first_bad_line(text, row.expected_columns) or "?"
        kind = "fewer" if row.actual_columns < row.expected_columns else "more"
        raise InputError(f"{name}: line {line} has {kind} fields than the header ({row.actual_columns} instead of "
                         f"{row.expected_columns}): {row.text[:80]!r}; {len(bad_rows)} such row(s)")
    if table.num_rows == 0:
        raise InputError(f"{name}: has a header but no data rows")
    frame = table.to_pandas()[columns]
    check_field_lengths(frame, name, columns, hint="; usually an unclosed quote")
    return frame


# Files people hand over as "the CSV" that are something else: the first bytes tell which.
MAGIC = ((b"\x1f\x8b", "a gzip file (compressed): decompress it (gunzip)"),
         (b"\x28\xb5\x2f\xfd", "a zstd file (compressed): decompress it (zstd -d)"),
         (b"BZh", "a bzip2 file (compressed): decompress it (bunzip2)"),
         (b"\xfd7zXZ\x00", "an xz file (compressed): decompress it (unxz)"),
         (b"PAR1", "a Parquet file: export it as CSV"),
         (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel workbook (.xls): save it as CSV UTF-8"),
         (codecs.BOM_UTF32_LE, "UTF-32 text: re-save it as UTF-8"),
         (codecs.BOM_UTF32_BE, "UTF-32 text: re-save it as UTF-8"),
         (codecs.BOM_UTF16_LE, "UTF-16 text (what Excel's \"Unicode Text\" writes): re-save it as UTF-8"),
         (codecs.BOM_UTF16_BE, "UTF-16 text: re-save it as UTF-8"))


def binary_kind(raw: bytes) -> str | None:
    """What the file is when its first bytes say it is not CSV text, else None."""
    if raw.startswith(b"PK\x03\x04"):
        if b"xl/" in raw[:4096] or b"[Content_Types].xml" in raw[:4096]:
            return "an Excel workbook (.xlsx): save it as CSV UTF-8"
        return "a zip archive: unzip it and point data.uri at the CSV inside"
    return next((kind for magic, kind in MAGIC if raw.startswith(magic)), None)


def first_bad_line(text: str, expected: int) -> int | None:
    """The line (1-based, counted, quoted newlines included) where the first record whose field count
    differs from the header's starts. Only runs when pyarrow reported one (its row number is unknown
    when values may hold newlines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for fields in reader:
            if fields and len(fields) != expected and reader.line_num > 1:
                return start
            start = reader.line_num + 1
    except csv.Error:
        return start
    return None


def _near_misses(missing: list[str], header: list[str]) -> str:
    """'; did you mean ' sentence1'?' when a header name differs only in spaces or case."""
    hints = [h for m in missing for h in header if h != m and h.strip().lower() == m.strip().lower()]
    return f"; did you mean {' / '.join(map(repr, hints))}? (spaces and case count)" if hints else ""


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
