"""data.uri in every format and compression gives byte-identical data/train.jsonl for the same rows, on a
folder and on moto's S3; a Hub dataset (Parquet, integer labels) on the fake hub too; each format's bad
input exits 2 naming the file and line, row or column, with no format marker. Format-only runs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fakehub import FakeHub
from tests.helpers import SNLI_SAMPLE, job_env, put_file, read_run_file, run_file_exists, run_job

SETS = ("data.eval_size=20", "model.uri=/unused-by-format")
LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
S3_SUBSET = ("snli.csv", "snli.csv.gz", "snli.tsv.zst", "snli.jsonl", "snli.parquet")


def compress(data: bytes, codec: str) -> bytes:
    if codec == "gzip":
        return gzip.compress(data)
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """The SNLI sample as every supported file: name -> local file (same rows, same text)."""
    folder = tmp_path_factory.mktemp("formats")
    frame = pd.read_csv(SNLI_SAMPLE, dtype=str, keep_default_na=False)
    csv_bytes = SNLI_SAMPLE.read_bytes()
    tsv = frame.to_csv(sep="\t", index=False, quoting=3).encode()  # quoting=3: none, as SNLI's .txt files
    jsonl = frame.to_json(orient="records", lines=True, force_ascii=False).encode()
    parquet = folder / "snli.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), parquet)
    files = {"snli.csv": csv_bytes, "snli.csv.gz": compress(csv_bytes, "gzip"),
             "snli.csv.zst": compress(csv_bytes, "zstd"), "snli.tsv": tsv, "snli.tsv.zst": compress(tsv, "zstd"),
             "snli.jsonl": jsonl, "snli.json": jsonl,
             "snli.jsonl.gz": compress(jsonl, "gzip"), "snli.parquet": parquet.read_bytes(),
             "snli-parquet.data": parquet.read_bytes()}  # no known extension: data.format=parquet says what it is
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def format_run(root: str, data_uri: str, env: dict, *extra: str):
    sets = (f"run_uri={root}", f"data.uri={data_uri}", *SETS, *extra)
    return run_job("run", "--stages", "format", *[a for kv in sets for a in ("--set", kv)], env=env)


def test_every_format_gives_the_same_train_jsonl(store_root, variants, tmp_path):
    root, endpoint = store_root
    env = job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache")
    outputs = {}
    # Every variant on a folder; on S3 (the same download path for all) one of each format, both codecs.
    chosen = variants if endpoint is None else {n: variants[n] for n in S3_SUBSET}
    for i, (name, local) in enumerate(chosen.items()):
        run_root = f"{root}/{i}"
        data_uri = put_file(root, endpoint, local, name)
        extra = ("data.format=parquet",) if name.endswith(".data") else ()
        result = format_run(run_root, data_uri, env, *extra)
        assert result.returncode == 0, (name, result.stderr)
        outputs[name] = (read_run_file(run_root, endpoint, "data/train.jsonl"),
                         read_run_file(run_root, endpoint, "data/eval.jsonl"))
    reference = outputs["snli.csv"]
    assert reference[0].count("\n") > 50
    assert {name for name, out in outputs.items() if out != reference} == set()


def test_hub_dataset_with_integer_labels(tmp_path):
    """The Hub's SNLI layout: plain_text/{train,test}-*.parquet, premise/hypothesis/label with 2 = contradiction."""
    frame = pd.read_csv(SNLI_SAMPLE, dtype=str, keep_default_na=False)
    hub_frame = pd.DataFrame({"premise": frame["sentence1"], "hypothesis": frame["sentence2"],
                              "label": frame["gold_label"].map(LABELS).fillna(-1).astype("int64")})

    def parquet_bytes(df):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        return sink.getvalue().to_pybytes()

    # Two train shards that disagree on the label's type (int64, then string: pyarrow cannot concatenate
    # them, as text they agree), and MultiNLI-style validation_matched / _mismatched splits that
    # data.split=validation must not read.
    half = len(hub_frame) // 2
    hub = FakeHub()
    hub.add_repo("datasets", "org/snli", {"main": {
        "plain_text/train-00000-of-00002.parquet": parquet_bytes(hub_frame.iloc[:half]),
        "plain_text/train-00001-of-00002.parquet": parquet_bytes(hub_frame.iloc[half:].astype({"label": str})),
        "plain_text/test-00000-of-00001.parquet": parquet_bytes(hub_frame.head(30)),
        "plain_text/validation_matched-00000-of-00001.parquet": parquet_bytes(hub_frame.head(30)),
        "plain_text/validation_mismatched-00000-of-00001.parquet": parquet_bytes(hub_frame.head(30)),
        "README.md": b"# snli"}})
    hub.start()
    try:
        env = job_env(None, JOB_CACHE_DIR=tmp_path / "cache", HF_ENDPOINT=hub.url)
        columns = ("data.label_column=label", "data.label=2", "data.source_column=premise",
                   "data.target_column=hypothesis")
        result = format_run(str(tmp_path / "hub-run"), "hf://datasets/org/snli", env, *columns)
        assert result.returncode == 0, result.stderr
        assert not [r for r in hub.requests if "test-0000" in r]  # only the split asked for is fetched
        missing = format_run(str(tmp_path / "hub-split"), "hf://datasets/org/snli", env, *columns,
                             "data.split=validation")
        assert missing.returncode == 2 and "no Parquet files for split 'validation'" in missing.stderr
        assert not [r for r in hub.requests if "validation_" in r and "/resolve/" in r]
    finally:
        hub.stop()
    csv_run = format_run(str(tmp_path / "csv-run"), str(SNLI_SAMPLE), env)
    assert csv_run.returncode == 0, csv_run.stderr
    for rel in ("data/train.jsonl", "data/eval.jsonl"):
        assert (tmp_path / "hub-run" / rel).read_bytes() == (tmp_path / "csv-run" / rel).read_bytes()


BAD = [
    ("bad.jsonl", b'{"sentence1": "a", "sentence2": "b", "gold_label": "contradiction"}\n{"sentence1": "c",\n',
     (), "bad.jsonl: line 2 is not valid JSON"),
    ("array.json", b'[{"sentence1": "a"},\n{"sentence1": "b"}]\n', (), "one object a line"),
    ("nested.jsonl", b'{"sentence1": {"x": 1}, "sentence2": "b", "gold_label": "contradiction"}\n'
     b'{"sentence1": "a", "sentence2": "b", "gold_label": "contradiction"}\n', (), "column sentence1"),
    ("cols.jsonl", b'{"premise": "a", "hypothesis": "b", "gold_label": "contradiction"}\n', (),
     "missing column(s) 'sentence1', 'sentence2'"),
    ("short.tsv", b"gold_label\tsentence1\tsentence2\ncontradiction\ta\tb\ncontradiction\tc\n", (),
     "short.tsv: line 3 has 2 tab-separated fields"),
    ("broken.csv.gz", b"\x1f\x8b\x08\x00not really gzip", (), "not a valid gzip file"),
    ("broken.parquet", b"PAR1 this is not parquet", (), "not a readable Parquet file"),
    ("empty.jsonl", b"\n", (), "the file is empty"),
    ("data.xlsx", b"PK\x03\x04", (), "cannot tell the format from the name"),
    ("latin1.tsv", b"gold_label\tsentence1\tsentence2\ncontradiction\tcaf\xe9\tb\n", (), "line 2 (byte"),
    # An escaped lone surrogate: json.loads accepts it, no UTF-8 file can hold it.
    ("surrogate.jsonl", b'{"sentence1": "a", "sentence2": "b", "gold_label": "contradiction"}\n'
     b'{"sentence1": "x\\ud800", "sentence2": "b", "gold_label": "contradiction"}\n', (),
     "surrogate.jsonl: line 2, column sentence1: '\\ud800' is half of a UTF-16 surrogate pair"),
    # Compressed or Parquet bytes under a text name: named for what they are, not "re-save as UTF-8".
    ("packed.jsonl", b"\x1f\x8b\x08\x00\x00\x00", (), "packed.jsonl is a gzip file (compressed): end its name in .gz"),
    ("table.tsv", b"PAR1\x00\x00PAR1", (), "table.tsv is a Parquet file: end its name in .parquet"),
    ("zst.json", b"\x28\xb5\x2f\xfd\x00\x00", (), "zst.json is a zstd file"),
    # "2020-01-01" is text, not a timestamp pyarrow inferred (which the reader then refused).
    ("date.jsonl", b'{"sentence1": "2020-01-01", "sentence2": "b", "gold_label": "contradiction"}\n', (), None),
]


@pytest.mark.parametrize("name, data, extra, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_in_each_format_is_named(tmp_path, name, data, extra, expected):
    """In-process (the reader the format stage calls); the CLI's exit code and marker are checked below."""
    from job.config import load_config
    from job.errors import InputError
    from job.readers import read_rows

    path = tmp_path / name
    path.write_bytes(data)
    cfg = load_config(None, (f"run_uri={tmp_path / 'run'}", f"data.uri={path}", "model.uri=/m", *extra), environ={})
    if expected is None:  # read as it stands
        frame = read_rows(cfg, tmp_path, ["gold_label", "sentence1", "sentence2"])
        assert frame["sentence1"].tolist() == ["2020-01-01"]
        return
    with pytest.raises(InputError) as failure:
        read_rows(cfg, tmp_path, ["gold_label", "sentence1", "sentence2"])
    assert expected in str(failure.value)


@pytest.mark.parametrize("case", [0, 4], ids=["jsonl", "tsv"])
def test_bad_input_exits_2_without_a_marker(tmp_path, case):
    name, data, extra, expected = BAD[case]
    path = tmp_path / name
    path.write_bytes(data)
    root = tmp_path / "run"
    result = format_run(str(root), str(path), job_env(None, JOB_CACHE_DIR=tmp_path / "cache"), *extra)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not run_file_exists(str(root), None, "_stages/format.json")


def test_mixed_types_in_a_json_column_read_as_text(tmp_path):
    rows = [{"sentence1": f"s{i}", "sentence2": f"t{i}", "gold_label": 2 if i % 2 else "2"} for i in range(30)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "run"
    result = format_run(str(root), str(path), job_env(None, JOB_CACHE_DIR=tmp_path / "cache"), "data.label=2",
                        "data.eval_size=5")
    assert result.returncode == 0, result.stderr
    assert json.loads((root / "data" / "stats.json").read_text())["rows_kept"] == 30


def test_the_hub_example_runs_offline_on_the_bundled_parquet(tmp_path):
    from tests.helpers import ROOT

    result = run_job("run", "--config", ROOT / "examples" / "snli-hub.yaml", "--stages", "format",
                     "--set", f"run_uri={tmp_path / 'run'}", "--set", "data.uri=examples/data/snli_hub_layout.parquet",
                     "--set", "data.eval_size=100", env=job_env(None, JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert (stats["rows_read"], stats["train_rows"], stats["eval_rows"]) == (1000, 900, 100)
