"""Config precedence and validation: every problem listed at once, each naming its key."""

import json

import pytest

from job.config import load_config, to_dict, to_yaml
from job.errors import ConfigError

REQUIRED = ("run_uri=/tmp/run", "data.uri=/tmp/x.csv", "model.uri=/tmp/model")


def write_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_required(tmp_path):
    cfg = load_config(None, REQUIRED, environ={})
    assert cfg.run_uri == "/tmp/run"
    assert cfg.train.lora_r == 64 and cfg.train.lora_alpha == 16 and cfg.train.lora_dropout == 0.1
    assert cfg.data.label == "contradiction" and cfg.data.eval_size == 500


def test_precedence_file_env_hyperparameters_set(tmp_path):
    path = write_yaml(tmp_path, "run_uri: /from/file\ntrain:\n  learning_rate: 0.001\n  lora_r: 8\n"
                      "  lora_alpha: 4\ndata:\n  uri: /data.csv\nmodel:\n  uri: /model\n")
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"train.lora_r": "16", "train.lora_alpha": "32", "sagemaker_program": "x"}))
    environ = {"JOB_TRAIN__LORA_ALPHA": "48", "JOB_RUN_URI": "s3://bucket/env", "JOB_TRAIN__MAX_STEPS": "7"}
    cfg = load_config(path, ("train.max_steps=9",), environ=environ, hyperparameters=str(hp))
    assert cfg.train.learning_rate == 0.001          # file
    assert cfg.train.lora_r == 16                    # hyperparameters over file
    assert cfg.train.lora_alpha == 48                # env over hyperparameters
    assert cfg.run_uri == "s3://bucket/env"          # env over file
    assert cfg.train.max_steps == 9                  # --set over env
    assert cfg.data.uri == "/data.csv"


def test_scalar_parsing_from_strings():
    cfg = load_config(None, REQUIRED + ("train.learning_rate=1e-4", "data.label=null", "train.packing=false",
                                        "train.target_modules=[q_proj, v_proj]", "train.micro_batch_size=4"),
                      environ={})
    assert cfg.train.learning_rate == 1e-4
    assert cfg.data.label is None
    assert cfg.train.packing is False
    assert cfg.train.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.micro_batch_size == 4


def test_every_problem_reported_at_once(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lora_r: many\n  learnig_rate: 1\n  packing: 3\nbogus:\n  a: 1\n"
                      "merge: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ("evaluate.nope=1", "train.compute_dtype=int8"), environ={"JOB_DATA__EVAL_SIZE": "x"})
    text = str(err.value)
    for expected in ("train.lora_r: expected an integer, got 'many'", "train.learnig_rate: unknown key",
                     "did you mean learning_rate", "train.packing: expected true or false",
                     "bogus: unknown key", "merge: is a section", "evaluate.nope: unknown key",
                     "train.compute_dtype: must be one of", "data.eval_size: expected an integer",
                     "environment variable JOB_DATA__EVAL_SIZE", "run_uri: required", "data.uri: required",
                     "model.uri: required"):
        assert expected in text, expected


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "train: [unclosed"), REQUIRED, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"), REQUIRED, environ={})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, REQUIRED + ("train.lora_r",), environ={})


def test_secrets_redacted():
    cfg = load_config(None, REQUIRED + ("storage.secret_access_key=wJalrXUtnFEMIK7MDENG",
                                        "storage.endpoint_url=https://user:hunter22@minio.local:9000"),
                      environ={})
    text = to_yaml(cfg)
    assert "wJalrXUtnFEMIK7MDENG" not in text and "hunter22" not in text
    assert to_dict(cfg)["storage"]["secret_access_key"] == "***"
    assert "https://***@minio.local:9000" in text
    assert cfg.storage.secret_access_key == "wJalrXUtnFEMIK7MDENG"  # the value itself stays usable
