"""Issue #16, classes 1, 7 and 8 (and the argument/stdin half of 3): bad values are refused when the
config loads, all at once, before any stage runs; only documented JOB_* variables are read; empty or
unknown --stages run nothing; text that is not UTF-8 is named, never a traceback. Every case is a real
`job` process (mostly `job config` and `job plan`, which load no model)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import ROOT, SNLI_SAMPLE, job_env, run_job, s3_client

REQUIRED = ("--set", "run_uri=/tmp/qlora-config-checks/run", "--set", "data.uri=/tmp/x.csv",
            "--set", "model.uri=/tmp/model")


def _config(*sets: str, env=None) -> subprocess.CompletedProcess:
    args = ["config", *REQUIRED]
    for item in sets:
        args += ["--set", item]
    return run_job(*args, env=env)


def _clean_failure(result, code=2) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    return output


# (--set values, fragments the message must contain). Each row is a value that used to pass `job config`
# and fail (or silently do nothing) inside a stage, after the expensive work before it.
BAD_VALUES = [
    (["train.learning_rate=-1e-4"], ["train.learning_rate", "positive"]),
    (["train.learning_rate=0"], ["train.learning_rate"]),
    (["train.lr_scheduler=cosinus"], ["train.lr_scheduler", "cosinus", "cosine_with_restarts"]),
    (["train.lr_scheduler=reduce_lr_on_plateau"], ["train.lr_scheduler", "needs evaluation"]),
    (["train.optimizer=adam_w"], ["train.optimizer", "adam_w", "adamw_torch"]),
    (["train.target_modules=[]"], ["train.target_modules", "non-empty"]),
    (["train.target_modules=[q_proj, '']"], ["train.target_modules"]),
    (["train.target_modules='q_proj['"], ["train.target_modules", "regular expression"]),
    (["train.warmup_steps=-5"], ["train.warmup_steps", ">= 0"]),
    (["train.logging_steps=0"], ["train.logging_steps", "positive"]),
    (["train.checkpoint_every_steps=-1"], ["train.checkpoint_every_steps"]),
    (["train.checkpoint_every_minutes=-0.5"], ["train.checkpoint_every_minutes"]),
    (["merge.max_shard_size=abc"], ["merge.max_shard_size", "'abc'", "2GB"]),
    (["merge.max_shard_size=2.5GB"], ["merge.max_shard_size"]),
    (["merge.max_shard_size=0"], ["merge.max_shard_size"]),
    (["data.max_rows=-3"], ["data.max_rows", "positive"]),
    (["data.max_rows=0"], ["data.max_rows"]),
    (["data.seed=-1"], ["data.seed", "4294967295"]),
    (["train.seed=4294967296"], ["train.seed", "4294967295"]),
    (["data.label_column=sentence1"], ["data.label_column", "data.source_column", "data.label: null"]),
    (["data.label_column=sentence2"], ["data.label_column", "data.target_column"]),
    (["train.epochs=0"], ["train.epochs", "train.max_steps is -1"]),
    (["train.max_steps=0"], ["train.max_steps", "-1"]),
    (["train.max_steps=-2"], ["train.max_steps"]),
    (["data.eval_size=0"], ["data.eval_size", "evaluate.enabled: false"]),
    (["train.packing_length=256", "train.max_seq_length=512"],
     ["train.packing_length (256)", "train.max_seq_length (512)"]),
    (["train.lora_alpha=0"], ["train.lora_alpha", "positive"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay"]),
    (["train.max_grad_norm=-1"], ["train.max_grad_norm"]),
    (["train.dataloader_workers=-1"], ["train.dataloader_workers"]),
    (["merge.check_prompts=0"], ["merge.check_prompts"]),
    (["merge.tolerance=-0.1"], ["merge.tolerance"]),
    (["train.learning_rate=.nan"], ["train.learning_rate"]),
    (["evaluate.temperature=.nan"], ["evaluate.temperature", "finite"]),
    (["train.distributed_timeout_minutes=.inf"], ["train.distributed_timeout_minutes", "finite"]),
]


# Keys whose rule reads another key: rows that set either never share a `job config` run.
RELATED = {"train.epochs": {"train.max_steps"}, "train.max_steps": {"train.epochs"},
           "data.label_column": {"data.label", "data.source_column", "data.target_column"},
           "data.eval_size": {"evaluate.enabled"}, "train.packing_length": {"train.packing"}}


def _batch_of_rows(rows) -> list[int]:
    """Which `job config` run checks each row: rows go together when they set no common or related key,
    so the table costs a few processes instead of one each (every problem is reported at once anyway)."""
    batches, where = [], []
    for sets, _ in rows:
        keys = {item.split("=", 1)[0] for item in sets}
        keys |= set().union(*(RELATED.get(k, set()) for k in keys))
        index = next((i for i, taken in enumerate(batches) if not taken & keys), len(batches))
        if index == len(batches):
            batches.append(set())
        batches[index] |= keys
        where.append(index)
    return where


_BATCH = _batch_of_rows(BAD_VALUES)
_OUTPUTS: dict = {}


@pytest.mark.parametrize("row", range(len(BAD_VALUES)), ids=[" ".join(s) for s, _ in BAD_VALUES])
def test_bad_value_refused_at_load(row):
    batch = _BATCH[row]
    if batch not in _OUTPUTS:
        sets = [item for i, (row_sets, _) in enumerate(BAD_VALUES) if _BATCH[i] == batch for item in row_sets]
        _OUTPUTS[batch] = _clean_failure(_config(*sets))
    output = _OUTPUTS[batch]
    problems = [line for line in output.splitlines() if line.startswith("  - ")]
    fragments = BAD_VALUES[row][1]
    assert any(all(f in line for f in fragments) for line in problems), (fragments, output)


# Values next to the edges that must still be accepted.
GOOD_VALUES = [
    "train.max_steps=-1", "train.max_steps=1", "train.epochs=0.5", "train.warmup_steps=0",
    "train.checkpoint_every_steps=0", "train.checkpoint_every_minutes=0", "train.weight_decay=0",
    "train.max_grad_norm=0", "data.seed=0", "data.seed=4294967295", "data.max_rows=1",
    "merge.max_shard_size=500MB", "merge.max_shard_size=4GiB", "merge.max_shard_size=2000000000",
    "train.optimizer=paged_adamw_8bit", "train.lr_scheduler=constant_with_warmup",
    "train.target_modules=[q_proj, v_proj]", "train.packing_length=512",
]


def test_edge_values_accepted():
    result = _config(*GOOD_VALUES, "data.label=null", "data.label_column=sentence1")
    assert result.returncode == 0, result.stderr
    # and so is eval_size 0 when evaluation is off, and a short packing length without packing
    result = _config("data.eval_size=0", "evaluate.enabled=false", "train.packing=false", "train.packing_length=64")
    assert result.returncode == 0, result.stderr


def test_every_problem_reported_at_once_and_the_run_is_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("kept")
    result = run_job("run", "--set", f"run_uri={run}", "--set", f"data.uri={SNLI_SAMPLE}",
                     "--set", "model.uri=/tmp/model", "--set", "train.learning_rate=-1",
                     "--set", "train.logging_steps=0", "--set", "merge.max_shard_size=abc",
                     "--set", "data.seed=-1", env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    output = _clean_failure(result)
    for key in ("train.learning_rate", "train.logging_steps", "merge.max_shard_size", "data.seed"):
        assert key in output, output
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # no lease, no config.yaml, no marker


def test_literal_lists_match_transformers():
    """config.py keeps transformers' scheduler and optimizer names as literals (importing them costs
    seconds on every `job config`): they must still be the installed transformers' names."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from transformers.utils.hub import convert_file_size_to_int

    from job.config import OPTIMIZERS, SCHEDULERS, UNSUPPORTED_SCHEDULERS, shard_size_bytes

    assert set(SCHEDULERS) | set(UNSUPPORTED_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}
    for size in ("2GB", "500MB", "4GiB", "10KiB", "3KB", "2Gb", "123"):
        assert shard_size_bytes(size) == convert_file_size_to_int(int(size) if size.isdigit() else size), size


# ---------------------------------------------------------------------------------------------- class 7


def test_foreign_job_variables_are_ignored():
    env = job_env(JOB_NAME="nightly/qlora", JOB_URL="https://ci.example/job/qlora/", JOB_BASE_NAME="qlora",
                  JOB_DISPLAY_URL="https://ci.example/x", JOB_SHUTDOWN_TIMEOUT="540")
    result = run_job("-v", "config", *REQUIRED, env=env)
    assert result.returncode == 0, result.stderr
    assert "JOB_NAME" in result.stderr and "ignored" in result.stderr  # the debug note
    assert "JOB_NAME" not in result.stdout


@pytest.mark.parametrize("name, fragments", [
    ("JOB_TRAN__LR", ["tran.lr", "JOB_TRAN__LR", "unknown key"]),
    ("JOB_TRAIN__LEARNIG_RATE", ["train.learnig_rate", "JOB_TRAIN__LEARNIG_RATE", "learning_rate"]),
])
def test_misspelt_section_variable_is_an_error(name, fragments):
    output = _clean_failure(run_job("config", *REQUIRED, env=job_env(**{name: "1e-4"})))
    for fragment in fragments:
        assert fragment in output, output


def test_run_uri_from_environment_still_read():
    result = run_job("config", "--set", "data.uri=/tmp/x.csv", "--set", "model.uri=/tmp/m",
                     env=job_env(JOB_RUN_URI="/tmp/from-env"))
    assert result.returncode == 0, result.stderr
    assert "run_uri: /tmp/from-env" in result.stdout


# ---------------------------------------------------------------------------------------------- class 8


@pytest.mark.parametrize("stages, fragment", [("", "no stage named"), (",", "no stage named"),
                                              (" , ,", "no stage named"), ("format,trian", "trian")])
def test_empty_or_unknown_stage_list_runs_nothing(tmp_path, stages, fragment):
    run = tmp_path / "run"
    result = run_job("run", "--stages", stages, "--set", f"run_uri={run}", "--set", f"data.uri={SNLI_SAMPLE}",
                     "--set", "model.uri=/tmp/model", env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    output = _clean_failure(result)
    assert "--stages" in output and fragment in output, output
    assert not run.exists()  # no lease taken, no config.yaml written


# ---------------------------------------------------------------------------------------------- class 3


def _run_bytes(args: list[bytes], stdin: bytes | None = None, env=None) -> subprocess.CompletedProcess:
    """`job` with raw bytes in argv (a str argv cannot hold bytes that are not UTF-8)."""
    return subprocess.run([sys.executable.encode(), b"-m", b"job", *args], input=stdin, capture_output=True,
                          env=env or job_env(), cwd=ROOT, timeout=120)


def _decoded(result) -> str:
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert "Traceback" not in output, output
    return output


def test_set_value_not_utf8():
    result = _run_bytes([b"config", *(a.encode() for a in REQUIRED), b"--set", b"data.label=contra\xffdiction"])
    assert result.returncode == 2
    assert "--set data.label: not valid UTF-8 (byte 0xff" in _decoded(result)


def test_secret_set_value_not_utf8_names_the_key_only():
    result = _run_bytes([b"config", *(a.encode() for a in REQUIRED),
                         b"--set", b"storage.secret_access_key=hunter2\xfesecret"])
    output = _decoded(result)
    assert result.returncode == 2
    assert "--set storage.secret_access_key: not valid UTF-8" in output and "hunter2" not in output


def test_environment_value_not_utf8():
    env = {k.encode(): v.encode() for k, v in job_env().items()}
    env[b"JOB_DATA__LABEL"] = b"contra\xe9"  # Latin-1
    result = subprocess.run([sys.executable, "-m", "job", "config", *REQUIRED], capture_output=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "environment variable JOB_DATA__LABEL: not valid UTF-8 (byte 0xe9" in _decoded(result)


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"data:\n  label: contradiction\n  label_column: gold\xe9label\n")
    output = _clean_failure(run_job("config", "--config", path, *REQUIRED))
    assert f"--config {path}: line 3 is not valid UTF-8 (byte 0xe9)" in output


@pytest.mark.parametrize("args, stdin, fragment", [
    ([b"A man plays.", b"Two dogs\xff run."], None, "SENTENCE argument 2: not valid UTF-8 (byte 0xff"),
    ([b"--input", b"-"], b"A man plays.\nA cat.\nTwo dogs\xff run.\n", "stdin line 3: not UTF-8 text (byte 0xff"),
    ([b"--model", b"/tmp/no\xffmodel", b"A man plays."], None, "--model: not valid UTF-8 (byte 0xff"),
])
def test_predict_input_not_utf8(args, stdin, fragment):
    if b"--model" not in args:
        args = [b"--model", b"/tmp/no-such-model", *args]
    result = _run_bytes([b"predict", *args], stdin=stdin)
    assert result.returncode == 2
    assert fragment in _decoded(result)


def test_predict_input_file_not_utf8(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_bytes(b"A man plays.\nTwo dogs\xff run.\n")
    output = _clean_failure(run_job("predict", "--model", "/tmp/no-such-model", "--input", path))
    assert f"--input {path} line 2: not UTF-8 text (byte 0xff" in output


# ---------------------------------------------------------------------------------------------- Ctrl-C


class _SilentEndpoint:
    """A TCP server that accepts connections and never answers: an S3 request to it blocks."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connected = threading.Event()
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.connected.set()

    def close(self):
        for conn in self.conns:
            conn.close()
        self.sock.close()


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ctrl_c_exits_130_and_keeps_nothing_half_done(tmp_path):
    """A real SIGINT while the format stage waits on storage: exit 130, no traceback, no format marker,
    the lease released."""
    endpoint = _SilentEndpoint()
    run = tmp_path / "run"
    env = job_env(endpoint.url, JOB_CACHE_DIR=tmp_path / "cache", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", "--stages", "format", "--set", f"run_uri={run}",
                             "--set", "data.uri=s3://bucket/snli.csv", "--set", "model.uri=/tmp/model"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert endpoint.connected.wait(60), "the job never reached the storage request"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        endpoint.close()
    output = stdout + stderr
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    assert "interrupted" in output, output
    files = _tree(run)
    assert "_stages/format.json" not in files and "_lease.json" not in files, files


# ---------------------------------------------------------------------------------------------- model-dependent


def test_target_modules_checked_after_the_model_loads(tmp_path, tiny_model_dir):  # noqa: F811
    """Names that need the model are checked right after it loads, before the first step: exit 2 naming the
    key, what it looked for and the model's linear layers; format stays done, train writes no marker."""
    run = tmp_path / "run"
    result = run_job("run", "--stages", "format,train", "--set", f"run_uri={run}", "--set", f"data.uri={SNLI_SAMPLE}",
                     "--set", f"model.uri={tiny_model_dir}", "--set", "data.eval_size=10",
                     "--set", "train.load_in_4bit=false", "--set", "train.max_steps=2",
                     "--set", "train.target_modules=[q_proj, v_prj]", env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    output = _clean_failure(result)
    assert "train.target_modules: 'v_prj' match no module" in output, output  # q_proj matches: not named
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in output, output
    files = _tree(run)
    assert "_stages/format.json" in files and "_stages/train.json" not in files, sorted(files)
    assert not any(name.startswith("checkpoints/") for name in files), sorted(files)


# ---------------------------------------------------------------------------------------------- full cache disk


def _full_disk_failure(result, cache: Path) -> str:
    output = _clean_failure(result, code=3)
    assert "no space left in" in output and str(cache) in output, output
    assert "JOB_CACHE_DIR" in output, output
    return output


def test_full_cache_disk_during_csv_download_exits_3(tmp_path, s3_bucket, small_cache):
    endpoint, bucket = s3_bucket
    rows = SNLI_SAMPLE.read_bytes().split(b"\n", 1)
    s3_client(endpoint).put_object(Bucket=bucket, Key="big.csv", Body=rows[0] + b"\n" + rows[1] * 5)  # ~840 KB
    run = tmp_path / "run"
    result = run_job("run", "--stages", "format", "--set", f"run_uri={run}", "--set", f"data.uri=s3://{bucket}/big.csv",
                     "--set", "model.uri=/tmp/model", env=job_env(endpoint, JOB_CACHE_DIR=small_cache))
    _full_disk_failure(result, small_cache)
    assert "_stages/format.json" not in _tree(run)


def test_full_cache_disk_during_model_download_exits_3(s3_bucket, small_cache, tiny_model_dir):  # noqa: F811
    """The base model's download (job predict fetches it exactly as the train stage does)."""
    endpoint, bucket = s3_bucket
    client = s3_client(endpoint)
    for path in tiny_model_dir.iterdir():  # 0.8 MB of weights: more than the cache holds
        client.upload_file(str(path), bucket, f"model/{path.name}")
    result = run_job("predict", "--model", f"s3://{bucket}/model", "A man plays a guitar.",
                     env=job_env(endpoint, JOB_CACHE_DIR=small_cache))
    _full_disk_failure(result, small_cache)
    assert not any(small_cache.rglob("*.safetensors")), "a partial download was left behind"


@pytest.mark.parametrize("targets, named", [("[norm]", "norm (LlamaRMSNorm)"), ("[q_proj, mlp]", "mlp (LlamaMLP)")])
def test_target_modules_that_are_not_linear_layers_are_named(tiny_model_dir, targets, named):  # noqa: F811
    """`norm` and `mlp` exist in a Llama but are not layers LoRA can wrap: exit 2 (InputError) naming them and
    listing the linear layers, instead of PEFT's ValueError while the adapter is built."""
    from transformers import AutoModelForCausalLM

    from job.config import load_config
    from job.errors import InputError
    from job.stages.train_checks import check_target_modules

    cfg = load_config(None, ("run_uri=/r", "data.uri=/d.csv", "model.uri=/m", f"train.target_modules={targets}"),
                      environ={})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(InputError) as failure:
        check_target_modules(model, cfg.train.target_modules, "tiny")
    assert named in str(failure.value) and "its linear layers are q_proj, k_proj" in str(failure.value)
