"""Data-parallel training on the CPU: two real processes started by torchrun, gloo backend, the tiny
model, moto's S3 server with bucket versioning (so every write to an object is counted).

- a whole run: rank 0 alone writes (one version of each checkpoint file, of each marker), both
  ranks end with identical LoRA weights (digests gathered into the marker), the data is sharded;
- SIGTERM to rank 1 only: both ranks save one checkpoint together and end with exit 75 (through
  JOB_EXIT_CODE_FILE, since torchrun itself reports any failure as 1); SIGKILL of the whole launch
  after a later checkpoint; a third launch resumes and finishes with the loss curve of the
  uninterrupted run.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SNLI_SAMPLE, job_env, put_file, read_run_file, s3_client
from tests.s3server import make_bucket

MAX_STEPS = 36


def torchrun_args(root, data_uri, model_dir):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "job", "run", "--stages", "format,train",
            "--set", f"run_uri={root}", "--set", f"data.uri={data_uri}", "--set", f"model.uri={model_dir}",
            "--set", "data.eval_size=20", "--set", "train.load_in_4bit=false",
            "--set", f"train.max_steps={MAX_STEPS}", "--set", "train.checkpoint_every_steps=3",
            "--set", "train.keep_checkpoints=2", "--set", "train.logging_steps=1",
            # Uploads in the training thread: LATEST moves with the step, so a kill lands where the test saw it.
            "--set", "train.background_upload=false",
            "--set", "train.micro_batch_size=2", "--set", "train.packing_length=256",
            "--set", "train.max_seq_length=256"]


@pytest.fixture
def versioned_run(moto_server, tiny_model_dir, tmp_path):  # noqa: F811
    bucket = make_bucket(moto_server)
    s3 = s3_client(moto_server)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    root = f"s3://{bucket}/runs/ddp"
    data_uri = put_file(root, moto_server, SNLI_SAMPLE, "snli.csv")
    env = job_env(moto_server, JOB_CACHE_DIR=tmp_path / "cache", JOB_EXIT_CODE_FILE=tmp_path / "exit_code",
                  OMP_NUM_THREADS=1)
    return {"root": root, "endpoint": moto_server, "bucket": bucket, "s3": s3, "env": env,
            "args": torchrun_args(root, data_uri, tiny_model_dir), "exit_code_file": tmp_path / "exit_code"}


def launch(run) -> subprocess.Popen:
    Path(run["exit_code_file"]).unlink(missing_ok=True)
    return subprocess.Popen(run["args"], cwd=ROOT, env=run["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def versions(run, prefix) -> dict[str, int]:
    """Object key (relative to the run) -> how many times it was written (deleted ones included)."""
    counts: dict[str, int] = {}
    pages = run["s3"].get_paginator("list_object_versions").paginate(Bucket=run["bucket"], Prefix=f"runs/ddp/{prefix}")
    for page in pages:
        for item in page.get("Versions", []):
            key = item["Key"].removeprefix("runs/ddp/")
            counts[key] = counts.get(key, 0) + 1
    return counts


def marker(run, stage):
    return json.loads(read_run_file(run["root"], run["endpoint"], f"_stages/{stage}.json"))


def wait_for_checkpoint(proc, after_step: int) -> int:
    """Read the launch's log until rank 0 reports a checkpoint past `after_step` uploaded (it logs
    that right after writing checkpoints/LATEST): the run's own progress decides, not a sleep."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        found = re.search(r"checkpoint (\d+) uploaded", line)
        if found and int(found.group(1)) > after_step:
            return int(found.group(1))
    raise AssertionError(f"the launch ended before a checkpoint after step {after_step}:\n{''.join(seen)}")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the job processes torchrun started (its children, read from /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid:
            env = dict(item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item)
            if "RANK" in env:
                ranks[int(env["RANK"])] = int(entry.name)
    return ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory, moto_server, tiny_model_dir):  # noqa: F811
    """An uninterrupted two-process run (also the whole-run test's subject)."""
    tmp = tmp_path_factory.mktemp("ddp-reference")
    bucket = make_bucket(moto_server)
    s3 = s3_client(moto_server)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    root = f"s3://{bucket}/runs/ddp"
    run = {"root": root, "endpoint": moto_server, "bucket": bucket, "s3": s3,
           "env": job_env(moto_server, JOB_CACHE_DIR=tmp / "cache", JOB_EXIT_CODE_FILE=tmp / "exit_code",
                          OMP_NUM_THREADS=1),
           "args": torchrun_args(root, put_file(root, moto_server, SNLI_SAMPLE, "snli.csv"), tiny_model_dir),
           "exit_code_file": tmp / "exit_code"}
    proc = launch(run)
    out = finish(proc)
    assert proc.returncode == 0, out
    return run, out


def test_two_processes_one_writer_identical_replicas(reference):
    run, out = reference
    assert Path(run["exit_code_file"]).read_text().strip() == "0"
    m = marker(run, "train")["metrics"]
    assert m["steps"] == MAX_STEPS and m["processes"] == 2
    assert len(m["replica_digests"]) == 2 and len(set(m["replica_digests"])) == 1, m["replica_digests"]
    # Data sharded: each step saw two micro-batches per rank's share, so more tokens than one process
    # with the same micro-batch could hold (2 x 256 per step).
    assert m["tokens_seen"] > MAX_STEPS * 2 * 256
    written = versions(run, "")
    # Exactly one process wrote: every object once, LATEST once per checkpoint, each marker once.
    assert written["_stages/train.json"] == 1 and written["_stages/format.json"] == 1
    assert written["config.yaml"] == 1
    assert written["checkpoints/LATEST"] == len(m["checkpoints_uploaded"]) == MAX_STEPS // 3
    checkpoint_files = {k: n for k, n in written.items() if k.startswith("checkpoints/checkpoint-")}
    assert checkpoint_files and set(checkpoint_files.values()) == {1}, checkpoint_files
    # Both ranks' RNG states went into the uploaded checkpoint (a resume restores each rank's).
    assert {"checkpoints/checkpoint-36/rng_state_0.pth", "checkpoints/checkpoint-36/rng_state_1.pth"} <= set(written)
    assert written["adapter/adapter_model.safetensors"] == 1


def test_sigterm_on_one_rank_then_sigkill_then_resume(versioned_run, reference):
    run = versioned_run
    reference_run, _ = reference
    expected = {e["step"]: e["loss"] for e in marker(reference_run, "train")["metrics"]["loss_curve"]}

    # 1. SIGTERM to rank 1 alone, once a checkpoint exists: both ranks stop at the same step.
    proc = launch(run)
    wait_for_checkpoint(proc, after_step=0)
    pids = worker_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode != 0  # torchrun: some worker failed
    assert Path(run["exit_code_file"]).read_text().strip() == "75", out
    assert "exitcode  : 75" in out or "exitcode: 75" in out or "exit code 75" in out.lower(), out
    stopped_at = json.loads(read_run_file(run["root"], run["endpoint"], "checkpoints/LATEST"))["step"]
    assert stopped_at < MAX_STEPS
    with pytest.raises(Exception):
        read_run_file(run["root"], run["endpoint"], "_stages/train.json")  # no marker for a stopped stage

    # 2. Resume, then SIGKILL the launcher and both workers after the next checkpoint.
    proc = launch(run)
    killed_after = wait_for_checkpoint(proc, after_step=stopped_at)
    workers = worker_pids(proc.pid)  # torchrun starts each worker in its own session: kill them by pid
    for pid in [proc.pid, *workers.values()]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(Exception):
        read_run_file(run["root"], run["endpoint"], "_stages/train.json")  # killed before the end

    # 3. Resume again: finishes, from a checkpoint at or after the one seen before the kill.
    proc = launch(run)
    out = finish(proc)
    assert proc.returncode == 0, out
    m = marker(run, "train")["metrics"]
    assert m["resumed_from_step"] >= killed_after and m["steps"] == MAX_STEPS, out[-3000:]
    assert len(set(m["replica_digests"])) == 1
    resumed = {e["step"]: e["loss"] for e in m["loss_curve"] if e["step"] > m["resumed_from_step"]}
    assert resumed and all(resumed[s] == pytest.approx(expected[s], rel=1e-4) for s in resumed), (resumed, expected)


# Units of job/distributed.py that a CPU machine can check without a process group.


def test_nccl_group_is_bound_to_the_process_gpu():
    import datetime

    import torch

    from job.distributed import Ranks, group_options

    gpu = group_options(Ranks(rank=5, local_rank=1, world_size=8), 30, cuda=True)
    assert gpu == {"backend": "nccl", "timeout": datetime.timedelta(minutes=30), "device_id": torch.device("cuda", 1)}
    assert group_options(Ranks(rank=1, local_rank=1, world_size=2), 30, cuda=False) == {
        "backend": "gloo", "timeout": datetime.timedelta(minutes=30)}


def test_lost_peer_is_recognised_in_gloo_and_store_errors_only():
    import torch.distributed as dist

    from job.distributed import Ranks, lost_peer, peer_lost_error
    from job.errors import EXIT_PEER_LOST

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                        "by peer [10.1.2.3]:30645. This is typically caused by a remote process crash.")
    assert lost_peer(gloo) == "10.1.2.3:30645"
    wrapped = ValueError("step failed")
    wrapped.__cause__ = gloo
    assert lost_peer(wrapped) == "10.1.2.3:30645"  # found where the error was raised from
    read = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:589] Read error "
                        "[127.0.0.1]:4508: Connection reset by peer")
    assert lost_peer(read) == "127.0.0.1:4508"
    assert "(Read error [127.0.0.1]:4508: Connection reset by peer)" in str(peer_lost_error(Ranks(), "x", read))
    store = dist.DistStoreError("Timed out after 901 seconds waiting for clients. 1/2 clients joined.")
    assert lost_peer(store) == "(address not reported)"
    for other in (RuntimeError("read timed out"), ValueError("gloo timed out"), RuntimeError("CUDA out of memory")):
        assert lost_peer(other) is None, other  # a storage timeout or any other error is not a lost peer
    error = peer_lost_error(Ranks(rank=2, local_rank=0, world_size=4), "10.1.2.3:30645", gloo)
    assert error.exit_code == EXIT_PEER_LOST == 69
    message = str(error)
    assert "\n" not in message and "pair.cc" not in message
    assert message.startswith("rank 2/4 (local 0): lost contact with peer 10.1.2.3:30645 (Connection closed by peer")
