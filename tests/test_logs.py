"""Logs for batch platforms: a real tiny-model `job run --stages format,train` with stderr captured (not a
terminal, as under kubectl logs or CloudWatch), once in text and once in JSON mode. One progress line per
logging step with its numbers, no carriage-return bars, no raw trainer dicts, no deprecation warnings
from the job's own calls; in JSON mode every stderr line is a JSON object and secrets are masked."""

import json
import re

import pytest

from tests.helpers import SNLI_SAMPLE, job_env, run_job

STEPS = 3
# Raised inside peft (PeftModel.__init__ reads model.is_gradient_checkpointing, deprecated by transformers
# 5.2x; peft 0.21.2 is the newest release): not our call, so it cannot be fixed here. It must still come
# through the job's logging (one timestamped WARNING line / one JSON object), never as raw stderr.
THIRD_PARTY_WARNINGS = ("`is_gradient_checkpointing` is deprecated",)
PROGRESS = re.compile(r"train: step (\d+)/(\d+) loss [\d.]+ lr \S+ grad_norm [\d.]+ \| [\d,]+ tokens/s \| "
                      r"elapsed \d+:\d\d, ETA (\d+:\d\d|\?) \| (no checkpoint yet|last checkpoint \d+, \d+:\d\d ago)$")


def train_args(root, model_dir):
    return ["run", "--stages", "format,train", "--set", f"run_uri={root}", "--set", f"data.uri={SNLI_SAMPLE}",
            "--set", f"model.uri={model_dir}", "--set", "data.eval_size=8", "--set", "train.load_in_4bit=false",
            "--set", f"train.max_steps={STEPS}", "--set", "train.checkpoint_every_steps=2",
            "--set", "train.logging_steps=1", "--set", "train.micro_batch_size=2",
            "--set", "train.packing_length=256", "--set", "train.max_seq_length=256",
            # the checkpoint of step 2 uploaded before step 3 runs, so step 3's line names it: with the
            # default background upload that was a race with a fast step (lost once in CI, 2026-12-07)
            "--set", "train.background_upload=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """{format: CompletedProcess} of one short training run per log format."""
    base = tmp_path_factory.mktemp("logs")
    results = {}
    for fmt in ("text", "json"):
        results[fmt] = run_job(*train_args(base / fmt / "run", tiny_model_dir),
                               env=job_env(JOB_CACHE_DIR=base / fmt / "cache", JOB_LOG_FORMAT=fmt))
        assert results[fmt].returncode == 0, results[fmt].stderr
    return results


def _no_noise(result):
    output = result.stdout + result.stderr
    assert "\r" not in output, "a progress bar was drawn into a log"
    assert "{'loss'" not in output and "'grad_norm'" not in output and "train_runtime" not in output
    assert "Traceback" not in output
    assert result.stdout == ""  # the Trainer's PrinterCallback printed every log dict to stdout


def _warning_lines(lines):
    return [line for line in lines if "Warning" in line and ("Deprecation" in line or "Future" in line)]


def test_text_logs_one_progress_line_per_step(runs):
    result = runs["text"]
    _no_noise(result)
    lines = result.stderr.splitlines()
    progress = [m for m in map(PROGRESS.search, lines) if m]
    assert [(int(m[1]), int(m[2])) for m in progress] == [(step, STEPS) for step in range(1, STEPS + 1)]
    assert progress[0][4] == "no checkpoint yet"
    assert progress[-1][4].startswith("last checkpoint 2, ")  # step 3 knows the upload of step 2
    # Every line is a log record (timestamp, level, logger): nothing printed around the handler.
    assert all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR|DEBUG) ", line) for line in lines), lines
    for line in _warning_lines(lines):
        assert " WARNING py.warnings: " in line and any(known in line for known in THIRD_PARTY_WARNINGS), line


def test_json_logs_are_json_with_progress_fields(runs):
    result = runs["json"]
    _no_noise(result)
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line parses
    assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    progress = [r for r in records if "step" in r]
    assert [(r["step"], r["total"]) for r in progress] == [(step, STEPS) for step in range(1, STEPS + 1)]
    for r in progress:
        assert r["logger"] == "job.train" and PROGRESS.search(r["message"])
        assert isinstance(r["loss"], float) and isinstance(r["lr"], float) and r["tokens_per_s"] > 0
        assert r["elapsed_s"] >= 0 and r["eta_s"] >= 0
    assert progress[0]["checkpoint_step"] is None and progress[-1]["checkpoint_step"] == 2
    assert progress[-1]["checkpoint_age_s"] >= 0
    for r in records:
        if "Warning" in r["message"]:
            assert r["logger"] == "py.warnings" and any(k in r["message"] for k in THIRD_PARTY_WARNINGS), r


def test_json_logs_mask_secrets(tmp_path):
    """A secret that reaches a message (here inside a bad data.uri) is masked in the JSON line too."""
    secret, env_secret = "JsonSecretValue-4711", "EnvSecretValue-0815"
    result = run_job("run", "--stages", "format", "--set", f"run_uri={tmp_path / 'run'}",
                     "--set", f"data.uri={tmp_path}/{secret}/{env_secret}.csv", "--set", "model.uri=unused",
                     "--set", f"storage.secret_access_key={secret}",
                     env=job_env(JOB_LOG_FORMAT="json", AWS_SECRET_ACCESS_KEY=env_secret))
    assert result.returncode == 2, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    error = [r for r in records if r["level"] == "ERROR"]
    assert len(error) == 1 and "data.uri" in error[0]["message"] and "***" in error[0]["message"]
    assert secret not in result.stderr + result.stdout and env_secret not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_unknown_log_format_exits_2_naming_the_variable():
    result = run_job("config", "--set", "run_uri=/tmp/x", "--set", "data.uri=a.csv", "--set", "model.uri=m",
                     env=job_env(JOB_LOG_FORMAT="xml"))
    assert result.returncode == 2
    assert "JOB_LOG_FORMAT" in result.stderr and "text, json" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args", [("run", "--bogus"), ("run", "--stages", "nope"), ("nosuchcmd",)],
                         ids=["unknown-option", "bad-stage", "unknown-command"])
def test_json_usage_errors_are_json_lines(args):
    """click prints usage errors itself; in JSON mode they are one JSON object like every other line,
    also when the error comes before the command group set logging up (an unknown command)."""
    result = run_job(*args, env=job_env(JOB_LOG_FORMAT="json"))
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0]["level"] == "ERROR" and "usage error" in lines[0]["message"]
    assert args[-1] in lines[0]["message"]


def test_progress_line_after_a_restart_and_without_numbers():
    """The wording a resumed run shows before its first new upload, and a line missing optional numbers."""
    from job.progress import duration, progress_text

    fields = {"step": 21, "total": 40, "loss": 1.25, "lr": None, "grad_norm": None, "tokens_per_s": None,
              "elapsed_s": 3725.0, "eta_s": None, "checkpoint_step": 20, "checkpoint_age_s": None}
    assert progress_text(fields) == ("train: step 21/40 loss 1.2500 | elapsed 1:02:05, ETA ? | "
                                     "last checkpoint 20, before this restart")
    assert duration(59.6) == "1:00" and duration(None) == "?"


def test_bars_that_libraries_draw_with_tqdm_stay_out_of_a_log_file_and_json(tmp_path):
    """transformers draws "Converting and de-quantizing GGUF tensors" with tqdm directly (no HF switch): with
    stderr a file, or JSON logs, no bar is written (tqdm honours TQDM_DISABLE, set by setup_logging)."""
    import subprocess
    import sys

    code = ("from job.logs import setup_logging; setup_logging(); from tqdm.auto import tqdm; "
            "list(tqdm(range(3), desc='Converting and de-quantizing GGUF tensors...'))")
    for fmt in ("text", "json"):
        log_file = tmp_path / f"{fmt}.log"
        with open(log_file, "w") as stderr:
            env = {k: v for k, v in job_env(JOB_LOG_FORMAT=fmt).items() if k != "TQDM_DISABLE"}
            subprocess.run([sys.executable, "-c", code], stderr=stderr, check=True, env=env)
        assert "de-quantizing" not in log_file.read_text(), log_file.read_text()


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "unexpected"])
def test_json_logs_carry_ctrl_c_and_an_unexpected_error_as_json(raised, monkeypatch, capsys):
    """Under JOB_LOG_FORMAT=json, Ctrl-C's message is a JSON line (it was plain text), and an unexpected
    error's traceback is in the documented `exception` field, the error in `message` (the traceback was
    inside `message`)."""
    import logging

    from job import cli
    from job.logs import setup_logging

    def boom(*args, **kwargs):
        raise raised("bug in a stage")

    monkeypatch.setenv("JOB_LOG_FORMAT", "json")
    monkeypatch.setattr(cli.cli, "main", boom)
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        setup_logging(environ={"JOB_LOG_FORMAT": "json"})
        code = cli._main([])
    finally:
        root.handlers[:] = saved
        monkeypatch.setattr("job.logs._format", "text")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    if raised is KeyboardInterrupt:
        assert code == 130 and lines[0]["message"].startswith("interrupted (Ctrl-C): exit 130")
    else:
        assert code == 1 and lines[0]["message"] == "unexpected error: RuntimeError: bug in a stage"
        assert lines[0]["exception"].startswith("Traceback") and "RuntimeError: bug in a stage" in lines[0]["exception"]
