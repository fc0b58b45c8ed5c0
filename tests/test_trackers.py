"""train.report_to: MLflow (a local file store) and wandb (offline, never prompting) record the run; a
tracker whose server is down only warns. Each test trains the tiny model for a few steps (format+train)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import SNLI_SAMPLE, job_env, run_job
from tests.model_fixtures import tiny_model_dir  # noqa: F401 - fixture

SMALL = ("data.eval_size=8", "data.max_rows=60", "train.load_in_4bit=false", "train.max_steps=3",
         "train.checkpoint_every_steps=2", "train.logging_steps=1", "train.micro_batch_size=4",
         "train.packing_length=512", "train.lora_r=8")


def train(root: Path, model_dir, report_to: str, env: dict):
    sets = (f"run_uri={root}", f"data.uri={SNLI_SAMPLE}", f"model.uri={model_dir}", f"train.report_to={report_to}",
            *SMALL)
    return run_job("run", "--stages", "format,train", *[a for kv in sets for a in ("--set", kv)], env=env)


def clean_env(tmp_path: Path, **extra) -> dict:
    env = job_env(None, JOB_CACHE_DIR=tmp_path / "cache", **extra)
    for name in [k for k in env if k.startswith(("WANDB_", "MLFLOW_"))]:
        if name not in extra:
            del env[name]
    return env


def test_mlflow_and_wandb_offline_record_the_run(tiny_model_dir, tmp_path):  # noqa: F811
    mlruns, wandb_dir = tmp_path / "mlruns", tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    env = clean_env(tmp_path, MLFLOW_TRACKING_URI=f"file:{mlruns}", MLFLOW_ALLOW_FILE_STORE="true",
                    WANDB_DIR=wandb_dir)
    root = tmp_path / "run"
    result = train(root, tiny_model_dir, "[tensorboard, mlflow, wandb]", env)
    assert result.returncode == 0, result.stderr
    assert "logging offline" in result.stderr  # no WANDB_API_KEY, no WANDB_MODE: offline, said, no prompt

    run_id = json.loads((root / "checkpoints" / "trackers.json").read_text())["mlflow_run_id"]
    run_dir = next(mlruns.glob(f"*/{run_id}"))
    assert (run_dir / "params" / "learning_rate").read_text() == "0.0002"
    losses = (run_dir / "metrics" / "loss").read_text().split("\n")
    assert len([line for line in losses if line.strip()]) == 3  # logging_steps=1, 3 steps

    offline_runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))
    assert "qlora-" in offline_runs[0].name  # the run id derived from run_uri + fingerprint (resume continues it)
    assert any((root / "tensorboard").rglob("events.out.tfevents*"))


def test_a_tracker_that_fails_only_warns(tiny_model_dir, tmp_path):  # noqa: F811
    env = clean_env(tmp_path, MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                    MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    root = tmp_path / "run"
    result = train(root, tiny_model_dir, "mlflow", env)
    assert result.returncode == 0, result.stderr
    assert "tracker mlflow failed" in result.stderr and "training goes on without it" in result.stderr
    assert json.loads((root / "_stages" / "train.json").read_text())["metrics"]["steps"] == 3
    assert not (root / "tensorboard").exists()  # report_to without tensorboard: no event files


def test_report_to_is_checked_and_operational(tmp_path):
    base = ["--set", f"run_uri={tmp_path}", "--set", "data.uri=x.csv", "--set", "model.uri=m"]
    bad = run_job("config", *base, "--set", "train.report_to=[none, comet]")
    assert bad.returncode == 2 and "train.report_to: must be one of none, tensorboard, mlflow, wandb" in bad.stderr
    from job.stages import OPERATIONAL_TRAIN_KEYS

    assert "train.report_to" in OPERATIONAL_TRAIN_KEYS  # adding a tracker keeps a run resumable
