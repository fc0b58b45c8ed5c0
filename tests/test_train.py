"""The train stage: completion, SIGKILL + resume, SIGTERM -> checkpoint -> exit 75 -> resume,
once against a folder and once against moto's S3 server; and the label check on real SNLI rows."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, SNLI_SAMPLE, job_env, read_run_file, run_file_exists, run_job

MAX_STEPS = 30


def train_args(root, data_uri, model_dir, *extra):
    return ["run", "--stages", "format,train", "--set", f"run_uri={root}", "--set", f"data.uri={data_uri}",
            "--set", f"model.uri={model_dir}", "--set", "data.eval_size=20", "--set", "train.load_in_4bit=false",
            "--set", f"train.max_steps={MAX_STEPS}", "--set", "train.checkpoint_every_steps=3",
            "--set", "train.logging_steps=1", "--set", "train.micro_batch_size=2",
            "--set", "train.packing_length=256", "--set", "train.max_seq_length=256", *extra]


def start_job(args, env):
    return subprocess.Popen([sys.executable, "-m", "job", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_latest(root, endpoint, proc, timeout=300):
    """Block until checkpoints/LATEST exists (decided by the run's own progress, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_file_exists(root, endpoint, "checkpoints/LATEST"):
            return json.loads(read_run_file(root, endpoint, "checkpoints/LATEST"))
        if proc.poll() is not None:
            raise AssertionError(f"job ended before its first checkpoint:\n{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


def marker(root, endpoint, stage):
    return json.loads(read_run_file(root, endpoint, f"_stages/{stage}.json"))


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """The loss curve of an uninterrupted run: a resumed run must reproduce it."""
    base = tmp_path_factory.mktemp("reference")
    result = run_job(*train_args(base / "run", SNLI_SAMPLE, tiny_model_dir), env=job_env(JOB_CACHE_DIR=base / "c"))
    assert result.returncode == 0, result.stderr
    losses = json.loads((base / "run" / "_stages" / "train.json").read_text())["metrics"]["loss_curve"]
    return {e["step"]: e["loss"] for e in losses}


def test_train_to_completion(run_setup, reference_losses):
    root, endpoint, data_uri, env, model_dir = run_setup
    # with the LoRA dropout recomputed (job/lora_dropout.py): the losses below must still equal the
    # reference run's, which stored it as peft does
    result = run_job(*train_args(root, data_uri, model_dir, "--set", "train.recompute_lora_dropout=true"), env=env)
    assert result.returncode == 0, result.stderr
    m = marker(root, endpoint, "train")["metrics"]
    assert m["recompute_lora_dropout"] == {"used": True, "layers": 14, "reason": "train.recompute_lora_dropout: true"}
    assert m["steps"] == MAX_STEPS and m["resumed_from_step"] is None
    assert m["tokens_seen"] > 0 and m["tokens_per_s"] > 0
    assert m["label_check"]["examples"] > 0 and m["label_check"]["packed"] is True
    # the kernels chosen and why: on the CPU, sdpa and no Liger (varlen and Liger need CUDA)
    assert m["attention"] == {"implementation": "sdpa", "reason": "auto: sdpa, because no CUDA device "
                              "(varlen_attn runs on NVIDIA GPUs only)"}
    assert m["liger"]["used"] is False and "no CUDA device" in m["liger"]["reason"]
    assert m["fused_lora"]["used"] is False and "no CUDA device" in m["fused_lora"]["reason"]
    assert [e["step"] for e in m["loss_curve"]] == list(range(1, MAX_STEPS + 1))
    assert m["loss_curve"][-1]["loss"] < m["loss_curve"][0]["loss"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert run_file_exists(root, endpoint, f"adapter/{name}")
    latest = json.loads(read_run_file(root, endpoint, "checkpoints/LATEST"))
    assert latest["step"] == MAX_STEPS
    # keep_checkpoints=2: only the newest two remain in storage
    assert m["checkpoints_uploaded"][-2:] == [27, 30]
    assert not run_file_exists(root, endpoint, "checkpoints/checkpoint-24/trainer_state.json")
    assert run_file_exists(root, endpoint, "checkpoints/checkpoint-27/trainer_state.json")
    # Deterministic on CPU: the same losses as the reference run.
    for entry in m["loss_curve"]:
        assert entry["loss"] == pytest.approx(reference_losses[entry["step"]], rel=1e-5)


# On a folder only: on S3, tests/test_kill_anywhere.py kills the run at every checkpoint file (mid-body,
# between files, around LATEST) and requires a rerun to end byte-identical to an uninterrupted run.
@pytest.mark.parametrize("store_root", ["local"], indirect=True)
def test_sigkill_after_first_checkpoint_then_resume(run_setup, reference_losses):
    root, endpoint, data_uri, env, model_dir = run_setup
    proc = start_job(train_args(root, data_uri, model_dir), env)
    wait_for_latest(root, endpoint, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    latest = json.loads(read_run_file(root, endpoint, "checkpoints/LATEST"))
    assert 3 <= latest["step"] < MAX_STEPS
    assert not run_file_exists(root, endpoint, "_stages/train.json")

    result = run_job(*train_args(root, data_uri, model_dir), env=env)
    assert result.returncode == 0, result.stderr
    assert "done already" in result.stderr  # format was not redone
    m = marker(root, endpoint, "train")["metrics"]
    assert m["resumed_from_step"] == latest["step"]
    assert m["steps"] == MAX_STEPS
    steps = [e["step"] for e in m["loss_curve"]]
    assert steps == list(range(1, MAX_STEPS + 1))  # the history before the kill is kept, no step twice
    # Optimizer, scheduler, RNG and data position continued: the losses equal an uninterrupted run's.
    for entry in m["loss_curve"]:
        assert entry["loss"] == pytest.approx(reference_losses[entry["step"]], rel=1e-5), entry


def test_sigterm_checkpoints_exits_75_and_resumes(run_setup, reference_losses):
    root, endpoint, data_uri, env, model_dir = run_setup
    # with the fused LoRA function (job/fused_lora.py, the default on CUDA): the losses below must still
    # equal the reference run's, which used peft's forward
    fused = "train.fused_lora=true"
    proc = start_job(train_args(root, data_uri, model_dir, "--set", fused), env)
    first = wait_for_latest(root, endpoint, proc)  # training is under way
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", err).group(1))
    assert first["step"] <= stopped_at < MAX_STEPS
    assert re.search(r"checkpoint uploaded [0-9.]+ s after the signal", err)
    latest = json.loads(read_run_file(root, endpoint, "checkpoints/LATEST"))
    assert latest["step"] == stopped_at  # the checkpoint holds every finished step
    assert not run_file_exists(root, endpoint, "_stages/train.json")

    result = run_job(*train_args(root, data_uri, model_dir, "--set", fused), env=env)
    assert result.returncode == 0, result.stderr
    m = marker(root, endpoint, "train")["metrics"]
    assert m["fused_lora"] == {"used": True, "reason": "train.fused_lora: true", "layers": 14}
    assert m["resumed_from_step"] == stopped_at  # no step lost
    assert [e["step"] for e in m["loss_curve"]] == list(range(1, MAX_STEPS + 1))
    for entry in m["loss_curve"]:
        assert entry["loss"] == pytest.approx(reference_losses[entry["step"]], rel=1e-5), entry
