"""entrypoint.sh, run for real with bash against a fake `job` and a temporary /opt/ml tree.

The fake `job` (first on PATH) records its argv and environment, prints a few stderr lines, can fill
the run folder with artifacts, wait for SIGTERM, and exits with the code the test chooses. No
container and no model: each case takes well under a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "entrypoint.sh"

FAKE_JOB = textwrap.dedent(
    """\
    #!{python}
    import json, os, signal, sys, time
    from pathlib import Path

    env = os.environ
    if env.get("FAKE_JOB_DELEGATE"):
        # Hand the same arguments to the real CLI, with `config` instead of `run`: the resolved
        # configuration shows what the real job would have done with them.
        argv = ["config" if a == "run" else a for a in sys.argv[1:]]
        os.execv(sys.executable, [sys.executable, "-m", "job", *argv])

    Path(env["FAKE_JOB_RECORD"]).write_text(json.dumps({{
        "argv": sys.argv[1:],
        "env": dict(env),
        "pid": os.getpid(),
    }}))
    for line in env.get("FAKE_JOB_STDERR", "").split("|"):
        if line:
            print(line, file=sys.stderr, flush=True)
    if env.get("FAKE_JOB_ARTIFACTS"):
        run = Path(env["JOB_RUN_URI"])
        for name in ("adapter", "merged", "report"):
            (run / name).mkdir(parents=True, exist_ok=True)
            (run / name / f"{{name}}.txt").write_text(name)
    if env.get("FAKE_JOB_WAIT_TERM"):
        stopped = []
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
        Path(env["FAKE_JOB_WAIT_TERM"]).write_text("ready")
        deadline = time.monotonic() + 20
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.02)
        print("checkpoint saved", file=sys.stderr, flush=True)
        sys.exit(75 if stopped else 1)
    sys.exit(int(env.get("FAKE_JOB_EXIT", "0")))
    """
)


@pytest.fixture
def sandbox(tmp_path):
    """A fake `job` on PATH, an empty SM_ROOT and RunPod workspace, and a clean environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "job"
    fake.write_text(FAKE_JOB.format(python=sys.executable))
    fake.chmod(0o755)
    sm_root = tmp_path / "opt_ml"
    sm_root.mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "SM_ROOT": str(sm_root),
        "RUNPOD_WORKSPACE": str(tmp_path / "no-workspace"),
        "FAKE_JOB_RECORD": str(tmp_path / "record.json"),
    }

    class Sandbox:
        root = tmp_path
        sm = sm_root
        record_path = tmp_path / "record.json"

        def __init__(self):
            self.env = env

        def run(self, *args, **extra_env):
            result = subprocess.run(["bash", str(ENTRYPOINT), *args], env={**self.env, **extra_env},
                                    capture_output=True, text=True, timeout=60)
            return result

        def record(self):
            return json.loads(self.record_path.read_text())

        def hyperparameters(self, params: dict):
            path = self.sm / "input" / "config" / "hyperparameters.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(params))

        def channel(self, name: str, files: dict):
            folder = self.sm / "input" / "data" / name
            folder.mkdir(parents=True, exist_ok=True)
            for rel, text in files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_text(text)
            return folder

    return Sandbox()


def wait_until_ready(proc, ready: Path) -> None:
    """Until the fake job (or launcher) has installed its SIGTERM handler and said so in `ready`."""
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def job_env(record):
    return {k: v for k, v in record["env"].items() if k.startswith("JOB_") or k in ("HF_HOME",)}


# -- passthrough ---------------------------------------------------------------------------------


def test_passthrough_runs_job_with_the_same_arguments(sandbox):
    result = sandbox.run("run", "--config", "x.yaml", "--set", "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    record = sandbox.record()
    assert record["argv"] == ["run", "--config", "x.yaml", "--set", "train.max_steps=3"]
    assert job_env(record) == {}


def test_no_arguments_means_job_run(sandbox):
    assert sandbox.run().returncode == 0
    assert sandbox.record()["argv"] == ["run"]


def test_explicit_job_prefix_reaches_the_single_stage_commands(sandbox):
    # `IMAGE train` is SageMaker's; the train stage alone is `IMAGE job train`.
    assert sandbox.run("job", "train", "--config", "c.yaml").returncode == 0
    assert sandbox.record()["argv"] == ["train", "--config", "c.yaml"]


def test_passthrough_execs_so_the_job_replaces_the_shell(sandbox):
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "run"], env=sandbox.env)
    assert proc.wait(timeout=30) == 0
    assert sandbox.record()["pid"] == proc.pid


@pytest.mark.parametrize("code", [1, 2, 3, 4, 75])
def test_passthrough_exit_codes_unchanged(sandbox, code):
    assert sandbox.run("run", FAKE_JOB_EXIT=str(code)).returncode == code


def test_serve_is_refused_with_exit_2(sandbox):
    result = sandbox.run("serve")
    assert result.returncode == 2
    assert "training jobs only" in result.stderr
    assert not sandbox.record_path.exists()


# -- RunPod --------------------------------------------------------------------------------------


def test_runpod_workspace_becomes_the_cache(sandbox):
    workspace = sandbox.root / "workspace"
    workspace.mkdir()
    assert sandbox.run("run", RUNPOD_WORKSPACE=str(workspace), JOB_RUN_URI="s3://b/r").returncode == 0
    env = job_env(sandbox.record())
    assert env == {
        "JOB_CACHE_DIR": f"{workspace}/.cache/qlora-job",
        "HF_HOME": f"{workspace}/.cache/huggingface",
        "JOB_RUN_URI": "s3://b/r",
    }


@pytest.mark.parametrize("chosen", ["HF_HOME", "JOB_CACHE_DIR", "JOB_MODEL__CACHE_DIR"])
def test_runpod_workspace_leaves_a_chosen_cache_alone(sandbox, chosen):
    workspace = sandbox.root / "workspace"
    workspace.mkdir()
    assert sandbox.run("run", RUNPOD_WORKSPACE=str(workspace), **{chosen: "/elsewhere"}).returncode == 0
    assert job_env(sandbox.record()) == {chosen: "/elsewhere"}


# -- SageMaker -----------------------------------------------------------------------------------


def test_sagemaker_train_maps_channels_and_checkpoints(sandbox):
    sandbox.hyperparameters({"train.learning_rate": "0.0001", "train.max_steps": "5"})
    data = sandbox.channel("data", {"snli.csv": "a,b\n"})
    model = sandbox.channel("model", {"config.json": "{}"})
    config = sandbox.channel("config", {"job.yaml": "train: {}\n"})

    result = sandbox.run("train")
    assert result.returncode == 0, result.stderr
    record = sandbox.record()
    assert record["argv"] == ["run", "--config", str(config / "job.yaml")]
    assert job_env(record) == {
        # The job reads the hyperparameters itself, as the config layer DESIGN.md defines.
        "JOB_SAGEMAKER_HYPERPARAMETERS": str(sandbox.sm / "input/config/hyperparameters.json"),
        "JOB_DATA__URI": str(data / "snli.csv"),
        "JOB_MODEL__URI": str(model),
        "JOB_RUN_URI": str(sandbox.sm / "checkpoints/run"),
    }


def test_sagemaker_hyperparameters_and_env_override_the_defaults(sandbox):
    sandbox.hyperparameters({"data.uri": "s3://bucket/other.csv", "run_uri": "s3://bucket/runs/a"})
    sandbox.channel("data", {"snli.csv": "a,b\n"})
    model_channel = sandbox.channel("model", {"llama/config.json": "{}"})

    result = sandbox.run("train", "--set", "train.max_steps=2", JOB_MODEL__URI="s3://bucket/model",
                         FAKE_JOB_ARTIFACTS="")
    assert result.returncode == 0, result.stderr
    record = sandbox.record()
    assert record["argv"] == ["run", "--set", "train.max_steps=2"]
    env = job_env(record)
    assert env["JOB_MODEL__URI"] == "s3://bucket/model"
    assert "JOB_DATA__URI" not in env and "JOB_RUN_URI" not in env
    assert "run_uri is s3://bucket/runs/a: the adapter, merged model and report stay there" in result.stderr
    assert not (sandbox.sm / "model").exists() or not any((sandbox.sm / "model").iterdir())
    assert model_channel.exists()


def test_sagemaker_model_channel_with_one_model_folder_inside(sandbox):
    model = sandbox.channel("model", {"llama/config.json": "{}", "llama/model.safetensors": ""})
    assert sandbox.run("train").returncode == 0
    assert job_env(sandbox.record())["JOB_MODEL__URI"] == str(model / "llama")


def test_sagemaker_success_copies_artifacts_to_model_dir(sandbox):
    result = sandbox.run("train", FAKE_JOB_ARTIFACTS="1")
    assert result.returncode == 0, result.stderr
    model_dir = sandbox.sm / "model"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*.txt")) == [
        "adapter/adapter.txt", "merged/merged.txt", "report/report.txt"]
    assert (model_dir / "merged" / "merged.txt").read_text() == "merged"
    assert not (sandbox.sm / "output" / "failure").exists()


@pytest.mark.parametrize("code, meaning", [(1, ""), (2, " (bad configuration or input)"),
                                           (3, " (storage or access failure)"),
                                           (4, " (another job holds this run's lease)"),
                                           (75, " (stopped by SIGTERM after a checkpoint; safe to restart)")])
def test_sagemaker_failure_writes_reason_and_keeps_exit_code(sandbox, code, meaning):
    result = sandbox.run("train", FAKE_JOB_EXIT=str(code), FAKE_JOB_ARTIFACTS="1",
                         FAKE_JOB_STDERR="loading config|ERROR data.uri: no such file s3://b/x.csv")
    assert result.returncode == code
    failure = (sandbox.sm / "output" / "failure").read_text()
    assert failure == (f"job run exited with code {code}{meaning}\n"
                       "loading config\nERROR data.uri: no such file s3://b/x.csv\n")
    # The job's stderr still reaches the container's stderr (CloudWatch) as it happens.
    assert "ERROR data.uri: no such file" in result.stderr
    assert not (sandbox.sm / "model" / "adapter").exists()


def test_sagemaker_failure_reason_keeps_the_end_of_a_long_log(sandbox):
    lines = [f"line {i:04d} " + "x" * 60 for i in range(200)] + ["FATAL the real error"]
    result = sandbox.run("train", FAKE_JOB_EXIT="1", FAKE_JOB_STDERR="|".join(lines))
    assert result.returncode == 1
    failure = (sandbox.sm / "output" / "failure").read_text()
    assert len(failure) <= 1024
    assert failure.startswith("job run exited with code 1\nline ")
    assert failure.endswith("FATAL the real error\n")
    assert all(line.startswith(("job run", "line ", "FATAL")) and (line.startswith(("job", "FATAL"))
               or len(line) == 70) for line in failure.splitlines())


def test_sagemaker_data_channel_needs_exactly_one_csv(sandbox):
    sandbox.channel("data", {"a.csv": "", "b.csv": ""})
    result = sandbox.run("train")
    assert result.returncode == 2
    assert not sandbox.record_path.exists()
    failure = (sandbox.sm / "output" / "failure").read_text()
    assert "expected exactly one *.csv file, found 2" in failure


def test_sagemaker_sigterm_reaches_the_job_and_75_comes_back(sandbox):
    ready = sandbox.root / "ready"
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "train"],
                            env={**sandbox.env, "FAKE_JOB_WAIT_TERM": str(ready)},
                            stderr=subprocess.PIPE, text=True)
    wait_until_ready(proc, ready)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 75
    assert "checkpoint saved" in proc.stderr.read()
    assert (sandbox.sm / "output" / "failure").read_text().startswith("job run exited with code 75")


def test_sagemaker_layers_resolve_in_the_real_config_loader(sandbox):
    """The same tree through the real `job config`: what the job itself makes of the entrypoint's work."""
    pytest.importorskip("job.config")
    yaml = pytest.importorskip("yaml")
    sandbox.hyperparameters({"train.learning_rate": "0.0001", "data.label": "null"})
    data = sandbox.channel("data", {"snli.csv": "a,b\n"})
    model = sandbox.channel("model", {"config.json": "{}"})

    result = sandbox.run("train", FAKE_JOB_DELEGATE="1", PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["run_uri"] == str(sandbox.sm / "checkpoints/run")
    assert resolved["data"]["uri"] == str(data / "snli.csv")
    assert resolved["data"]["label"] is None
    assert resolved["model"]["uri"] == str(model)
    assert float(resolved["train"]["learning_rate"]) == pytest.approx(1e-4)


# -- multi-GPU (JOB_NPROC) -----------------------------------------------------------------------

FAKE_LAUNCHER = textwrap.dedent(
    """\
    #!{python}
    # `python3 -m job.launch ARGS` (torchrun ARGS, with one line instead of its traceback: job/launch.py)
    # records its argv and environment, then plays a launcher whose job exits FAKE_JOB_EXIT: the job
    # writes that code to JOB_EXIT_CODE_FILE, the launcher itself says 1 for any failure, as the real
    # one. Any other python3 command runs the real interpreter.
    import json, os, signal, sys, time
    from pathlib import Path

    if sys.argv[1:3] != ["-m", "job.launch"]:
        os.execv({python!r}, [{python!r}, *sys.argv[1:]])
    env = os.environ
    Path(env["FAKE_LAUNCHER_RECORD"]).write_text(json.dumps({{"argv": sys.argv[3:], "env": dict(env)}}))
    code = int(env.get("FAKE_JOB_EXIT", "0"))
    if env.get("FAKE_JOB_WAIT_TERM"):
        stopped = []
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
        Path(env["FAKE_JOB_WAIT_TERM"]).write_text("ready")
        deadline = time.monotonic() + 20
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.02)
        code = 75 if stopped else 1
    Path(env["JOB_EXIT_CODE_FILE"]).write_text(f"{{code}}\\n")
    sys.exit(0 if code == 0 else 1)
    """
)


@pytest.fixture
def gpus(sandbox):
    """A fake launcher (a `python3` that plays `python3 -m job.launch`) and a fake nvidia-smi that
    lists FAKE_GPUS GPUs."""
    bin_dir = sandbox.root / "bin"
    (bin_dir / "python3").write_text(FAKE_LAUNCHER.format(python=sys.executable))
    (bin_dir / "nvidia-smi").write_text(
        '#!/bin/sh\ni=0\nwhile [ "$i" -lt "${FAKE_GPUS:-0}" ]; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; '
        'i=$((i+1)); done\n')
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).chmod(0o755)
    sandbox.env["FAKE_LAUNCHER_RECORD"] = str(sandbox.root / "launcher.json")
    sandbox.launcher_record = lambda: json.loads((sandbox.root / "launcher.json").read_text())
    return sandbox


def test_nproc_auto_runs_torchrun_over_every_gpu(gpus):
    result = gpus.run("run", "--config", "x.yaml", JOB_NPROC="auto", FAKE_GPUS="4")
    assert result.returncode == 0, result.stderr
    record = gpus.launcher_record()
    assert record["argv"] == ["--nproc-per-node", "4", "--shutdown-timeout", "540", "--standalone",
                              "-m", "job", "run", "--config", "x.yaml"]
    assert record["env"]["JOB_EXIT_CODE_FILE"]
    assert not gpus.record_path.exists()  # the plain job was not started


def test_nproc_auto_counts_cuda_visible_devices_and_one_gpu_is_the_plain_job(gpus):
    assert gpus.run("run", JOB_NPROC="auto", FAKE_GPUS="8", CUDA_VISIBLE_DEVICES="2,5").returncode == 0
    assert gpus.launcher_record()["argv"][:2] == ["--nproc-per-node", "2"]
    (gpus.root / "launcher.json").unlink()
    assert gpus.run("run", JOB_NPROC="auto", FAKE_GPUS="1").returncode == 0
    assert gpus.record()["argv"] == ["run"] and not (gpus.root / "launcher.json").exists()


@pytest.mark.parametrize("code", [2, 3, 4, 75])
def test_nproc_exit_code_is_the_jobs_not_torchruns(gpus, code):
    assert gpus.run("run", JOB_NPROC="2", FAKE_JOB_EXIT=str(code)).returncode == code


def test_nproc_must_be_auto_or_a_number(gpus):
    result = gpus.run("run", JOB_NPROC="lots")
    assert result.returncode == 2 and "JOB_NPROC must be auto or a positive number" in result.stderr


def test_nproc_multi_node_uses_the_rendezvous_variables(gpus):
    result = gpus.run("run", JOB_NPROC="8", PET_NNODES="2", PET_NODE_RANK="1", PET_MASTER_ADDR="node-0",
                      PET_MASTER_PORT="29500", JOB_SHUTDOWN_TIMEOUT="300")
    assert result.returncode == 0, result.stderr
    record = gpus.launcher_record()
    assert record["argv"] == ["--nproc-per-node", "8", "--shutdown-timeout", "300", "-m", "job", "run"]
    assert record["env"]["PET_NODE_RANK"] == "1"  # torchrun reads PET_* itself
    assert record["env"]["PET_RDZV_CONF"] == "timeout=1800"  # the entry point's rendezvous wait, unless set


@pytest.mark.parametrize("nproc_env, expected", [
    ({"PET_NPROC_PER_NODE": "2"}, "2"),  # a PyTorchJob without JOB_NPROC: the operator's nprocPerNode
    ({"PET_NPROC_PER_NODE": "auto", "FAKE_GPUS": "4"}, "4"),  # its "auto" counts GPUs, not CPU cores
    ({"PET_NPROC_PER_NODE": "8", "JOB_NPROC": "auto", "FAKE_GPUS": "2"}, "2"),  # JOB_NPROC wins
])
def test_multi_node_processes_per_node(gpus, nproc_env, expected):
    result = gpus.run("run", PET_NNODES="2", PET_NODE_RANK="0", PET_MASTER_ADDR="qlora-job-master-0",
                      PET_MASTER_PORT="29500", PET_RDZV_CONF="timeout=60", **nproc_env)
    assert result.returncode == 0, result.stderr
    record = gpus.launcher_record()
    assert record["argv"][:2] == ["--nproc-per-node", expected]
    assert record["env"]["PET_RDZV_CONF"] == "timeout=60"


def test_sagemaker_multi_instance_from_resourceconfig(gpus):
    config = gpus.sm / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-2", "hosts": ["algo-2", "algo-1"], "network_interface_name": "eth0"}))
    gpus.channel("data", {"snli.csv": "a,b\n"})
    result = gpus.run("train", JOB_NPROC="auto", FAKE_GPUS="8")
    assert result.returncode == 0, result.stderr
    record = gpus.launcher_record()
    assert record["argv"][:4] == ["--nproc-per-node", "8", "--shutdown-timeout", "540"]
    assert "--standalone" not in record["argv"] and record["argv"][4:7] == ["-m", "job", "run"]
    env = record["env"]
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"]) == \
        ("2", "1", "algo-1", "29500")


def test_nproc_sigterm_reaches_torchrun_and_75_comes_back(gpus):
    ready = gpus.root / "ready"
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "run"],
                            env={**gpus.env, "JOB_NPROC": "2", "FAKE_JOB_WAIT_TERM": str(ready)},
                            stderr=subprocess.PIPE, text=True)
    wait_until_ready(proc, ready)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 75
