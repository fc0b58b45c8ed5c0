"""Property: generated rows, written in every format the job reads (CSV, TSV, JSON lines, .json, Parquet, gzip
and zstd, Parquet shards whose column types differ), give byte-identical data/*.jsonl, or exit 2 naming the
file and the line or row. Rows hold any Unicode (lone surrogates, escaped surrogates, invalid UTF-8 inside
Parquet strings), quotes, tabs, newlines, empty and huge fields.

The format stage runs in-process (the same code as `job format`: job.stages.format.run) for the many
generated examples; a few real `job run --stages format` processes check the CLI's exit codes and that no
traceback is printed. Hypothesis is seeded (derandomized) and bounded: tests/hypothesis_profiles.py;
HYPOTHESIS_PROFILE=thorough runs twenty times the examples.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.helpers import job_env, run_job
from tests.hypothesis_profiles import examples

COLUMNS = ["gold_label", "sentence1", "sentence2"]
LABEL = "2"
MAX_FIELD_CHARS = 20_000

# The characters readers trip on, mixed into arbitrary code points; lone surrogates now and then.
TROUBLE = st.sampled_from(['"', '""', "\t", "\n", "\r", "\r\n", ",", "\\", " ", "'", "\ufeff", "\x00", "\x1f",
                           "\u2028", "\U0001f600", "\u00e9", "NaN", "null", "2020-01-01", "1.0", "#", "\\u0041"])
SURROGATE = st.characters(categories=["Cs"])
TEXT = st.lists(st.one_of(st.characters(exclude_categories=["Cs"]), TROUBLE), min_size=1, max_size=10).map("".join)


def _field(pick: int, text: str, surrogate: str) -> str:
    """Mostly text; now and then empty, over the reader's field limit, or holding a lone surrogate (picked
    by a middle value of the range: Hypothesis favours its ends)."""
    return {17: "", 23: "x" * (MAX_FIELD_CHARS + 1), 31: text + surrogate}.get(pick, text)


FIELD = st.builds(_field, st.integers(0, 39), TEXT, SURROGATE)
LABELS = st.sampled_from(["2", "2", "2", "0", "neutral", ""])
ROWS = st.lists(st.tuples(LABELS, FIELD, FIELD, st.booleans()), min_size=2, max_size=6)


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def utf8(text: str) -> bytes:
    """The bytes a careless writer produces: a lone surrogate becomes the invalid UTF-8 it encodes to."""
    return text.encode("utf-8", "surrogatepass")


def zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def parquet(columns: dict[str, list]) -> bytes:
    """Strings stored as the bytes utf8() gives (Parquet writers do not all check): invalid UTF-8 included."""
    arrays = {}
    for name, values in columns.items():
        if all(isinstance(v, int) for v in values):
            arrays[name] = pa.array(values, pa.int64())
        else:
            arrays[name] = pa.array([utf8(str(v)) for v in values], pa.binary()).view(pa.string())
    sink = io.BytesIO()
    pq.write_table(pa.table(arrays), sink)
    return sink.getvalue()


def files_for(rows) -> dict[str, bytes]:
    """name -> bytes: the same rows in every format. `as_int` turns a numeric label into a JSON/Parquet
    integer for that row (mixed types within a JSON column, and across Parquet shards)."""
    labels = [r[0] for r in rows]
    frame = pd.DataFrame({"gold_label": labels, "sentence1": [r[1] for r in rows], "sentence2": [r[2] for r in rows]},
                         dtype=object)  # pandas' own string type refuses lone surrogates
    csv_text = io.StringIO()
    frame.to_csv(csv_text, index=False, lineterminator="\r\n")  # quotes a field holding "\r" (see below)
    tsv_text = io.StringIO()
    # As pandas writes TSV on Linux: fields with a quote, tab or "\n" quoted; a bare "\r" is not (it is not in
    # the line terminator), so readers (pandas and the csv module too) take it for a line break.
    frame.to_csv(tsv_text, sep="\t", index=False, lineterminator="\n")
    jsonl = "".join(json.dumps({"gold_label": int(label) if as_int and label.isdigit() else label,
                                "sentence1": s1, "sentence2": s2}, ensure_ascii=as_int) + "\n"
                    for label, s1, s2, as_int in rows)
    csv_bytes, tsv_bytes, jsonl_bytes = utf8(csv_text.getvalue()), utf8(tsv_text.getvalue()), utf8(jsonl)
    half = (len(rows) + 1) // 2
    first = [int(r[0]) if r[0].isdigit() and r[3] else r[0] for r in rows[:half]]
    return {
        "rows.csv": csv_bytes, "rows.csv.gz": gzip.compress(csv_bytes), "rows.tsv": tsv_bytes,
        "rows.tsv.zst": zstd(tsv_bytes), "rows.jsonl": jsonl_bytes, "rows.json.gz": gzip.compress(jsonl_bytes),
        "rows.parquet": parquet({"gold_label": labels, "sentence1": frame["sentence1"].tolist(),
                                 "sentence2": frame["sentence2"].tolist()}),
        # two shards of one dataset (the Hub's layout): the label an integer column in one where it can be
        "shard-0.parquet": parquet({"gold_label": first, "sentence1": [r[1] for r in rows[:half]],
                                    "sentence2": [r[2] for r in rows[:half]]}),
        "shard-1.parquet": parquet({"gold_label": labels[half:], "sentence1": [r[1] for r in rows[half:]],
                                    "sentence2": [r[2] for r in rows[half:]]}) if rows[half:] else None,
    }


def format_in_process(folder: Path, uri: str, shards: list[Path] | None = None):
    """("ok", train bytes, eval bytes) or ("exit 2", message): job.stages.format.run, or for shards the reader
    the Hub path calls (read_parquet over several files) followed by the same stage functions."""
    from job.config import load_config
    from job.errors import InputError
    from job.pipeline import Context
    from job.stages import format as fmt
    from job.storage import open_store

    cfg = load_config(None, (f"run_uri={folder / 'run'}", f"data.uri={uri}", "model.uri=/unused",
                             f"data.label={LABEL}", "data.eval_size=1"), environ={})
    try:
        (folder / "work").mkdir(exist_ok=True)
        if shards is None:
            store = open_store(str(folder / "run"))
            fmt.run(cfg, Context(store=store, work_dir=folder / "work", fingerprint="property"))
            return "ok", store.read_text("data/train.jsonl").encode(), store.read_text("data/eval.jsonl").encode()
        from job.readers import read_parquet

        frame = read_parquet(shards, uri, COLUMNS)
        records, _ = fmt.select_rows(frame, cfg, uri)
        train, evaluation = fmt.split(records, cfg, uri)
        return "ok", fmt.to_jsonl(train, cfg).encode(), fmt.to_jsonl(evaluation, cfg).encode()
    except InputError as exc:
        return "exit 2", str(exc)


@settings(max_examples=examples(40))
@given(rows=ROWS)
def test_every_reader_gives_the_same_data_or_names_the_file_and_row(rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    outcomes = {}
    files = files_for(rows)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    for name in files:
        if name.startswith("shard"):
            continue
        case = folder / name.replace(".", "_")
        case.mkdir()
        outcomes[name] = format_in_process(case, str(folder / name))
    shards = [folder / n for n in ("shard-0.parquet", "shard-1.parquet") if files[n] is not None]
    (folder / "shards").mkdir()
    outcomes["shards"] = format_in_process(folder / "shards", str(folder / "hub-dataset"), shards)

    broken = any(has_surrogate(f) for r in rows for f in r[1:3])
    event("lone surrogate" if broken else f"valid text: {outcomes['rows.csv'][0]}")  # --hypothesis-show-statistics
    if outcomes["rows.csv"][0] == "exit 2" and not broken:
        event("".join(c for c in outcomes["rows.csv"][1].split(": ", 1)[-1][:30] if not c.isdigit()))
    for name, outcome in outcomes.items():
        if outcome[0] == "exit 2":
            where = "hub-dataset" if name == "shards" else name
            assert where in outcome[1], (name, outcome[1])  # names the file
        if broken:
            assert outcome[0] == "exit 2", (name, "a lone surrogate was accepted")
            assert "line" in outcome[1] or "row" in outcome[1], (name, outcome[1])
    if not broken:
        # Valid text: every format reads the same rows, so every outcome is the same (the same bytes, or the
        # same refusal: too few rows, a field over the limit); only the TSV may hold a bare CR it cannot carry.
        bare_cr = any("\r" in field for row in rows for field in row[1:3])
        same = {name: outcome for name, outcome in outcomes.items() if not (bare_cr and name.startswith("rows.tsv"))}
        assert len({outcome[0] for outcome in same.values()}) == 1, outcomes
        oks = [outcome for outcome in outcomes.values() if outcome[0] == "ok"]
        assert all(outcome == oks[0] for outcome in oks), outcomes


# A few fixed rows through real `job` processes: exit codes and messages as users see them, no traceback.
TRICKY = [("2", 'He said "stop", then\tleft', "A\nB \"quoted\" \\ end"), ("2", "caf\u00e9 \U0001f600", '"""'),
          ("0", "other", "label"), ("2", "x,y", " spaced ")]


def test_real_job_processes_agree_across_formats_and_name_a_lone_surrogate(tmp_path):
    files = files_for([(*row, True) for row in TRICKY])
    env = job_env(None, JOB_CACHE_DIR=tmp_path / "cache")
    outputs = {}
    for name in ("rows.csv", "rows.tsv", "rows.jsonl"):
        (tmp_path / name).write_bytes(files[name])
        done = run_job("format", "--set", f"run_uri={tmp_path / name}-run", "--set", f"data.uri={tmp_path / name}",
                       "--set", "model.uri=/unused", "--set", f"data.label={LABEL}", "--set", "data.eval_size=1",
                       env=env)
        assert done.returncode == 0, done.stderr
        outputs[name] = [(tmp_path / f"{name}-run" / "data" / f).read_bytes() for f in ("train.jsonl", "eval.jsonl")]
    assert outputs["rows.csv"] == outputs["rows.tsv"] == outputs["rows.jsonl"]
    sources = {json.loads(line)["source"] for data in outputs["rows.csv"] for line in data.splitlines()}
    assert sources == {'He said "stop", then\tleft', "caf\u00e9 \U0001f600", "x,y"}

    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"gold_label": "2", "sentence1": "a", "sentence2": "b"}\n'
                   '{"gold_label": "2", "sentence1": "x\\ud800y", "sentence2": "b"}\n')
    failed = run_job("format", "--set", f"run_uri={tmp_path / 'bad-run'}", "--set", f"data.uri={bad}",
                     "--set", "model.uri=/unused", "--set", f"data.label={LABEL}", "--set", "data.eval_size=1", env=env)
    assert failed.returncode == 2, failed.stderr
    assert f"{bad}: line 2, column sentence1" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "bad-run" / "_stages" / "format.json").exists()


def test_pandas_tsv_reads_back_as_pandas_csv_and_pyarrow_do(tmp_path):
    """The TSV pandas writes (fields with a quote are quoted, inner quotes doubled) is read back to the
    original text, as pandas, the csv module and pyarrow read it; SNLI-style unquoted quotes stay text."""
    from job.readers import read_tsv

    frame = pd.DataFrame({"gold_label": ["2", "2"], "sentence1": ['A "quoted" word', '"Stop" sign'],
                          "sentence2": ["tab\there", "line\nbreak"]})
    path = tmp_path / "pandas.tsv"
    frame.to_csv(path, sep="\t")  # the index too, as people call it
    assert read_tsv(path, "pandas.tsv", COLUMNS).values.tolist() == frame.values.tolist()
    written = list(csv.reader(io.StringIO(path.read_text(), newline=""), delimiter="\t"))
    assert written[1][1:] == frame.values[0].tolist()  # as the csv module reads it
    snli = tmp_path / "snli.txt"
    snli.write_text('gold_label\tsentence1\tsentence2\n2\t"Stop" said the man\tA "b" c\n')
    assert read_tsv(snli, "snli.txt", COLUMNS).values.tolist() == [["2", '"Stop" said the man', 'A "b" c']]
