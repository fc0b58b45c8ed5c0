"""`job predict` through the CLI: sentences as arguments, a text file, a CSV column, S3 URIs; JSON lines on
stdout and nothing else; bad input exits 2 naming the file, before any model is loaded."""

from __future__ import annotations

import json

from job.config import PromptConfig, StorageConfig
from job.prompts import parse_response
from tests.helpers import job_env, put_file, read_jsonl, run_job
from tests.test_merge import trained_run  # noqa: F401 - fixture

KEYS = {"input", "negation", "raw", "valid"}


def _check_lines(stdout: str, inputs: list[str]) -> list[dict]:
    lines = stdout.splitlines()
    records = [json.loads(line) for line in lines]  # every stdout line is JSON: logs went to stderr
    assert [r["input"] for r in records] == inputs
    for r in records:
        assert set(r) == KEYS
        parsed = parse_response(r["raw"], PromptConfig())
        assert r["valid"] is parsed.schema_valid and r["negation"] == parsed.output
    return records


def test_predict_arguments_and_text_file(trained_run, tmp_path):  # noqa: F811
    text = tmp_path / "sentences.txt"
    text.write_text("A child plays with a red ball.\n\n  Three men are cooking dinner.  \n", encoding="utf-8")
    result = run_job("predict", "--model", trained_run.model_dir, "--adapter", trained_run.run_dir / "adapter",
                     "--max-new-tokens", 12, "--batch-size", 2, "--input", text,
                     "It's a \"quoted\" sentence.", "Zoë rides a bike.", env=job_env(JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    _check_lines(result.stdout, ["It's a \"quoted\" sentence.", "Zoë rides a bike.",
                                 "A child plays with a red ball.", "Three men are cooking dinner."])
    assert "predict: 4 inputs" in result.stderr


def test_predict_csv_column_from_s3(trained_run, s3_bucket, tmp_path):  # noqa: F811
    """Model, adapter and input file all on S3 (moto); the input is one column of a CSV."""
    endpoint, bucket = s3_bucket
    from job.storage import open_store

    store = open_store(f"s3://{bucket}", StorageConfig(endpoint_url=endpoint))
    store.upload_dir(trained_run.model_dir, "base")
    store.upload_dir(trained_run.run_dir / "adapter", "run/adapter")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('id,premise\n1,"A woman, smiling, walks."\n2,Two birds fly.\n', encoding="utf-8")
    csv_uri = put_file(f"s3://{bucket}/x", endpoint, csv_file, "pairs.csv")
    result = run_job("predict", "--model", f"s3://{bucket}/base", "--adapter", f"s3://{bucket}/run/adapter",
                     "--input", csv_uri, "--column", "premise", "--max-new-tokens", 8,
                     env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    _check_lines(result.stdout, ["A woman, smiling, walks.", "Two birds fly."])


def test_predict_bad_input_exits_2_naming_the_file(trained_run, tmp_path):  # noqa: F811
    tiny_model_dir = trained_run.model_dir
    env = job_env(JOB_CACHE_DIR=tmp_path / "c")
    missing = tmp_path / "nope.txt"
    result = run_job("predict", "--model", tiny_model_dir, "--input", missing, env=env)
    assert result.returncode == 2 and f"--input {missing}: cannot read" in result.stderr

    csv_file = tmp_path / "data.csv"
    csv_file.write_text("a,b\n1,2\n", encoding="utf-8")
    result = run_job("predict", "--model", tiny_model_dir, "--input", csv_file, env=env)
    assert result.returncode == 2
    assert f"--input {csv_file}: no column 'sentence1'; the file has a, b" in result.stderr

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    result = run_job("predict", "--model", tiny_model_dir, "--input", empty, env=env)
    assert result.returncode == 2 and f"--input {empty}: no sentences" in result.stderr

    result = run_job("predict", "--model", tiny_model_dir, env=env)
    assert result.returncode == 2 and "nothing to predict" in result.stderr

    result = run_job("predict", "--model", tmp_path / "no-model", "A sentence.", env=env)
    assert result.returncode == 2 and "--model" in result.stderr and "no such folder" in result.stderr

    result = run_job("predict", "--model", tiny_model_dir, "--adapter", tmp_path, "A sentence.", env=env)
    assert result.returncode == 2 and "not a PEFT adapter folder" in result.stderr
    assert read_jsonl(result.stdout) == []
