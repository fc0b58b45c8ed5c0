"""Format stage speed on the full SNLI train size: the job's vectorised path vs the notebook's row-wise apply.

    python bench/format_speed.py [--rows 550152] [--csv ../shared/data/snli/train.csv] [--repeat 3]

Both sides start from the same CSV bytes on local disk and end with the JSON-lines text in memory
(storage and the pipeline are left out: this measures the formatting itself). Prints the median of
--repeat runs of each, in one process, so the two are compared under the same conditions.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from job.config import load_config
from job.readers import read_csv
from job.stages.format import select_rows, split, to_jsonl

ROOT = Path(__file__).resolve().parents[1]


def make_csv(source: Path, rows: int, out: Path) -> Path:
    """Repeat the sample's rows up to `rows` data rows (row content is what matters, not uniqueness)."""
    header, body = source.read_text(encoding="utf-8").split("\n", 1)
    lines = body.rstrip("\n").split("\n")
    lines = (lines * math.ceil(rows / len(lines)))[:rows]
    out.write_text(header + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return out


COLUMNS = ["gold_label", "sentence1", "sentence2"]


def job_format(path: Path, cfg) -> str:
    if path.suffix == ".parquet":  # the same rows as Parquet: job/readers.py instead of the CSV parser
        from job.readers import read_parquet

        frame = read_parquet([path], str(path), COLUMNS)
    else:
        frame = read_csv(path, str(path), COLUMNS)
    records, _ = select_rows(frame, cfg, str(path))
    train, evaluation = split(records, cfg, str(path))
    return to_jsonl(train, cfg) + to_jsonl(evaluation, cfg)


def notebook_format(path: Path) -> str:
    """What the Colab notebook did: read, filter, then build each example with a row-wise apply."""
    df = pd.read_csv(path)
    df = df[df["gold_label"] == "contradiction"]

    def format_instruction(row):
        return (f"### Instruction:\nGenerate the negation of the sentence.\n\n### Input:\n{row['sentence1']}\n\n"
                f"### Response:\n{{'orignal_sentence': '{row['sentence1']}', 'negation': '{row['sentence2']}'}}")

    df["text"] = df.apply(format_instruction, axis=1)
    train = df.sample(frac=1.0, random_state=42)
    return train[["text"]].to_json(orient="records", lines=True)


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=550_152)
    parser.add_argument("--csv", type=Path, default=ROOT.parent / "shared" / "data" / "snli" / "train.csv")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(None, ("run_uri=/tmp/bench", "data.uri=x.csv", "model.uri=/m"), environ={})
    with tempfile.TemporaryDirectory() as tmp:
        path = make_csv(args.csv, args.rows, Path(tmp) / "snli_full.csv")
        job_s = timed(lambda: job_format(path, cfg), args.repeat)
        parquet = Path(tmp) / "snli_full.parquet"
        pd.read_csv(path, dtype=str, keep_default_na=False).to_parquet(parquet, index=False)
        parquet_s = timed(lambda: job_format(parquet, cfg), args.repeat)
        notebook_s = timed(lambda: notebook_format(path), args.repeat)
    print(f"rows: {args.rows:,}  (median of {args.repeat})")
    print(f"job format stage (vectorised):   {job_s:6.2f} s")
    print(f"job format stage, Parquet input: {parquet_s:6.2f} s")
    print(f"notebook row-wise apply:         {notebook_s:6.2f} s")
    print(f"speed-up:                        {notebook_s / job_s:6.1f}x")


if __name__ == "__main__":
    main()
