"""train.report_to: MLflow (a local file store) and wandb (offline, never prompting) record the run and
continue the same tracker run after SIGTERM and a resume; a tracker whose server is down only warns. Each
test trains the tiny model for a few steps (format+train)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import ROOT, SNLI_SAMPLE, job_env, run_job

SMALL = ("data.eval_size=8", "data.max_rows=60", "train.load_in_4bit=false", "train.max_steps=3",
         "train.checkpoint_every_steps=2", "train.logging_steps=1", "train.micro_batch_size=4",
         "train.packing_length=512", "train.lora_r=8")


def run_args(root: Path, model_dir, report_to: str, *extra: str) -> list[str]:
    sets = (f"run_uri={root}", f"data.uri={SNLI_SAMPLE}", f"model.uri={model_dir}", f"train.report_to={report_to}",
            *SMALL, *extra)
    return ["run", "--stages", "format,train", *[a for kv in sets for a in ("--set", kv)]]


def train(root: Path, model_dir, report_to: str, env: dict):
    return run_job(*run_args(root, model_dir, report_to), env=env)


def clean_env(tmp_path: Path, **extra) -> dict:
    env = job_env(None, JOB_CACHE_DIR=tmp_path / "cache", **extra)
    for name in [k for k in env if k.startswith(("WANDB_", "MLFLOW_"))]:
        if name not in extra:
            del env[name]
    return env


def test_mlflow_and_wandb_offline_record_the_run_and_continue_it_after_sigterm(tiny_model_dir, tmp_path):  # noqa: F811
    mlruns, wandb_dir = tmp_path / "mlruns", tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    env = clean_env(tmp_path, MLFLOW_TRACKING_URI=f"file:{mlruns}", MLFLOW_ALLOW_FILE_STORE="true",
                    WANDB_DIR=wandb_dir)
    root = tmp_path / "run"
    sets = run_args(root, tiny_model_dir, "[tensorboard, mlflow, wandb]", "train.max_steps=8")
    proc = subprocess.Popen([sys.executable, "-m", "job", *sets], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # SIGTERM once the first checkpoint is uploaded (the run's own progress)
    while not (root / "checkpoints" / "LATEST").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "logging offline" in err  # no WANDB_API_KEY, no WANDB_MODE: offline, said, no prompt
    run_id = json.loads((root / "checkpoints" / "trackers.json").read_text())["mlflow_run_id"]

    result = run_job(*sets, env=env)  # resumes from the checkpoint
    assert result.returncode == 0, result.stderr
    assert json.loads((root / "checkpoints" / "trackers.json").read_text())["mlflow_run_id"] == run_id
    runs = [p for p in mlruns.glob("*/*") if p.is_dir() and (p / "meta.yaml").is_file()]
    assert [p.name for p in runs] == [run_id]  # one MLflow run, continued
    assert (runs[0] / "params" / "learning_rate").read_text() == "0.0002"
    steps = {int(line.split()[2]) for line in (runs[0] / "metrics" / "loss").read_text().splitlines() if line.strip()}
    assert steps == set(range(1, 9))  # logging_steps=1: both sessions' steps in the one run

    offline_runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(any(r.glob("*.wandb")) for r in offline_runs)
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-(.+)", r.name).group(1) for r in offline_runs}
    assert len(ids) == 1 and ids.pop().startswith("qlora-")  # the same wandb run id both times (resume)
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
