"""The format stage through the real CLI, against a folder and against moto's S3 server."""

import gzip
import json

import pytest

from job.config import PromptConfig
from job.prompts import RESPONSE_END, build_prompt
from tests.helpers import SNLI_SAMPLE, job_env, put_file, read_jsonl, read_run_file, run_file_exists, run_job

P = PromptConfig()


def format_args(run_uri, data_uri, *extra):
    return ["format", "--set", f"run_uri={run_uri}", "--set", f"data.uri={data_uri}",
            "--set", "model.uri=/nonexistent-model", "--set", "data.eval_size=50", *extra]


def test_format_real_snli_rows(store_root, tmp_path):
    root, endpoint = store_root
    csv = tmp_path / "snli.csv"
    # The sample is genuine SNLI (quotes, apostrophes); SNLI has no non-ASCII text, so add one row.
    csv.write_text(SNLI_SAMPLE.read_text(encoding="utf-8")
                   + 'contradiction,"Zoë\'s café serves crème brûlée, ""naturally"".",Zoë owns no café.,,\n',
                   encoding="utf-8")
    data_uri = put_file(root, endpoint, csv, "snli.csv")
    result = run_job(*format_args(root, data_uri), env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr

    train = read_jsonl(read_run_file(root, endpoint, "data/train.jsonl"))
    evaluation = read_jsonl(read_run_file(root, endpoint, "data/eval.jsonl"))
    stats = json.loads(read_run_file(root, endpoint, "data/stats.json"))
    assert len(evaluation) == 50
    assert stats["train_rows"] == len(train) and stats["eval_rows"] == 50
    assert stats["rows_read"] == 1241
    assert stats["rows_kept"] + sum(stats["dropped"].values()) == stats["rows_read"]
    assert stats["rows_kept"] == len(train) + 50
    assert {r["row"] for r in train}.isdisjoint({r["row"] for r in evaluation})

    for record in train + evaluation:
        assert record["prompt"] == build_prompt(record["source"], P)
        assert record["completion"].endswith(RESPONSE_END)
        answer = json.loads(record["completion"][: -len(RESPONSE_END)])
        assert answer == {"original_sentence": record["source"], "negation": record["target"]}
    sources = {r["source"] for r in train + evaluation}
    assert 'Zoë\'s café serves crème brûlée, "naturally".' in sources
    assert any("'" in s for s in sources) and any('"' in s for s in sources)

    marker = json.loads(read_run_file(root, endpoint, "_stages/format.json"))
    assert marker["metrics"]["train_rows"] == len(train)

    # Same settings again: skipped. Other settings: refused, naming the key; --force redoes it.
    again = run_job(*format_args(root, data_uri), env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache"))
    assert again.returncode == 0 and "done already" in again.stderr
    plan = run_job("plan", *format_args(root, data_uri)[1:], "--set", "data.seed=7",
                   env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache"))
    assert plan.returncode == 0 and "format    stale" in plan.stdout and "data.seed: 42 -> 7" in plan.stdout
    stale = run_job(*format_args(root, data_uri, "--set", "data.seed=7"),
                    env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache"))
    assert stale.returncode == 2 and "data.seed: 42 -> 7" in stale.stderr and "--force format" in stale.stderr
    forced = run_job(*format_args(root, data_uri, "--set", "data.seed=7", "--force", "format"),
                     env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache"))
    assert forced.returncode == 0, forced.stderr
    assert read_jsonl(read_run_file(root, endpoint, "data/eval.jsonl")) != evaluation


HEADER = "gold_label,sentence1,sentence2,captionID,pairID\n"
GOOD = "contradiction,A dog runs.,No dog runs.,,\n"

BAD_CSVS = {
    "empty": (b"", "the file is empty"),
    "header_only": (HEADER.encode(), "has a header but no data rows"),
    "missing_columns": (b"label,premise,hypothesis\ncontradiction,a,b\n",
                        "missing column(s) 'gold_label', 'sentence1', 'sentence2'; the file has 'label', 'premise', "
                        "'hypothesis'"),
    # A blank first line is an empty header: said in words, not as an empty list.
    "blank_header_line": (("\n" + HEADER + GOOD).encode(), "missing column(s) 'gold_label', 'sentence1', "
                          "'sentence2'; the file has no columns."),
    # Names are quoted: ' sentence1' (a leading space) is visibly not 'sentence1'.
    "spaced_column": (b"gold_label, sentence1,sentence2\ncontradiction,a,b\n",
                      "missing column(s) 'sentence1'; the file has 'gold_label', ' sentence1', 'sentence2'; "
                      "did you mean ' sentence1'?"),
    # The short row is reported at its own line (5), not at line 2 that starts with the same text.
    "ragged_after_quoted_newline": ((HEADER + GOOD + 'contradiction,"two\nlines",x,,\n'
                                     + "contradiction,A dog runs.\n").encode(),
                                    "line 5 has fewer fields than the header (2 instead of 5)"),
    # Not CSV text at all: told what it is, not "re-save as UTF-8".
    "gzip": (gzip.compress((HEADER + GOOD).encode()), "is a gzip file (compressed)"),
    "zstd": (b"\x28\xb5\x2f\xfd" + b"\x00" * 20, "is a zstd file (compressed)"),
    "parquet": (b"PAR1" + b"\x00" * 20 + b"PAR1", "is a Parquet file"),
    "xlsx": (b"PK\x03\x04" + b"\x00" * 26 + b"[Content_Types].xml", "is an Excel workbook (.xlsx)"),
    "zip": (b"PK\x03\x04" + b"\x00" * 26 + b"snli.csv", "is a zip archive"),
    "utf16": ((HEADER + GOOD).encode("utf-16"), "is UTF-16 text"),
    "not_utf8": ((HEADER + GOOD * 3).encode() + "contradiction,Caf\u00e9,x,,\n".encode("latin-1"),
                 "line 5 (byte"),
    "no_label_rows": ((HEADER + "neutral,a,b,,\nentailment,c,d,,\n").encode(),
                      "no row has gold_label == 'contradiction'; values seen: 'neutral' (1), 'entailment' (1)"),
    "ragged_long": ((HEADER + GOOD + "contradiction,a,b,c,d,e,f\n").encode(),
                    "line 3 has more fields than the header (7 instead of 5)"),
    "ragged_short": ((HEADER + GOOD + "contradiction,only two\n").encode(),
                     "line 3 has fewer fields than the header (2 instead of 5)"),
    "huge_field": ((HEADER + GOOD + 'contradiction,"' + "x" * 50_000_000 + '",y,,\n').encode(),
                   "row 2, column sentence1: a field of 50,000,000 characters"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_exit_2_with_message_and_no_marker(case, tmp_path):
    content, expected = BAD_CSVS[case]
    csv = tmp_path / f"{case}.csv"
    csv.write_bytes(content)
    run = tmp_path / "run"
    result = run_job(*format_args(run, csv), env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert str(csv) in result.stderr and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "_stages" / "format.json").exists()
    assert not (run / "data" / "train.jsonl").exists()


def test_missing_data_file_and_too_few_rows(tmp_path):
    run = tmp_path / "run"
    result = run_job(*format_args(run, tmp_path / "absent.csv"), env=job_env(JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 2 and "no such file" in result.stderr and "absent.csv" in result.stderr
    csv = tmp_path / "small.csv"
    csv.write_text(HEADER + GOOD * 3 + "contradiction,  ,blank source,,\n")
    result = run_job(*format_args(tmp_path / "run2", csv), env=job_env(JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 2 and "only 1 usable rows, but data.eval_size is 50" in result.stderr


def test_missing_s3_object_is_bad_input_like_a_missing_file(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    result = run_job(*format_args(f"s3://{bucket}/run", f"s3://{bucket}/nope.csv"),
                     env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 2, result.stderr
    assert f"s3://{bucket}/nope.csv" in result.stderr
    assert not run_file_exists(f"s3://{bucket}/run", endpoint, "_stages/format.json")


def test_old_mac_line_endings_give_the_same_records(tmp_path):
    """Lone CR line endings (classic Mac OS, some exporters) parse like LF; a quoted newline stays in its field."""
    text = SNLI_SAMPLE.read_text(encoding="utf-8").replace("\r\n", "\n")
    lf, cr = tmp_path / "lf.csv", tmp_path / "cr.csv"
    lf.write_text(text, encoding="utf-8", newline="")
    cr.write_text(text.replace("\n", "\r"), encoding="utf-8", newline="")
    env = job_env(JOB_CACHE_DIR=tmp_path / "cache")
    for csv in (lf, cr):
        result = run_job(*format_args(tmp_path / csv.stem, csv), env=env)
        assert result.returncode == 0, result.stderr
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "cr" / "data" / name).read_bytes() == (tmp_path / "lf" / "data" / name).read_bytes()
