"""The CLI as users see it: config printing, errors with exit code 2, plan, help."""

import yaml

from tests.helpers import job_env, run_job


def test_config_prints_resolved_yaml_with_secrets_redacted(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("run_uri: s3://bucket/run\ndata:\n  uri: s3://bucket/snli.csv\nmodel:\n  uri: /models/llama\n"
                      "storage:\n  endpoint_url: https://minio:minio-secret-pw@minio.local:9000\n")
    result = run_job("config", "--config", config, "--set", "train.lora_r=16",
                     env=job_env(JOB_TRAIN__LEARNING_RATE="1e-4", JOB_STORAGE__SECRET_ACCESS_KEY="SeCrEtKeY123"))
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["lora_r"] == 16 and resolved["train"]["learning_rate"] == 1e-4
    assert resolved["storage"]["secret_access_key"] == "***"
    assert "minio-secret-pw" not in result.stdout and "SeCrEtKeY123" not in result.stdout
    assert resolved["storage"]["endpoint_url"] == "https://***@minio.local:9000"


def test_bad_config_exits_2_listing_every_problem(tmp_path):
    result = run_job("run", "--set", "train.lora_r=abc", "--set", "nope.x=1", env=job_env())
    assert result.returncode == 2
    for text in ("train.lora_r: expected an integer", "nope.x: unknown key", "run_uri: required",
                 "data.uri: required", "model.uri: required"):
        assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_on_a_new_run(tmp_path):
    result = run_job("plan", "--set", f"run_uri={tmp_path / 'run'}", "--set", "data.uri=x.csv",
                     "--set", "model.uri=/m", env=job_env(JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("format") and "pending" in lines[0] and "not run yet" in lines[0]
    assert [line.split()[0] for line in lines[:5]] == ["format", "train", "merge", "export", "evaluate"]
    # then the memory plan, which needs the model's config.json: /m does not exist, so it waits for the download
    assert lines[5:] == ["memory plan: after the model is downloaded (/m is not on this machine yet)"]


def test_help_and_unknown_stage():
    assert run_job("--help").returncode == 0
    bad = run_job("run", "--stages", "format,cook", "--set", "run_uri=/r")
    assert bad.returncode == 2 and "cook" in bad.stderr
