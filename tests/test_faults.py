"""Object-storage faults: the real CLI through tests/faultproxy.py in front of moto's S3 server.

- Transient faults (503 SlowDown, 500 InternalError, connection resets, truncated response bodies)
  at a few percent of requests each are absorbed by the retries: the run finishes and writes the very
  bytes a fault-free run writes (every object under run_uri; only timestamps, timings and
  TensorBoard's event file names differ, see `comparable`).
- A permanently failing endpoint (503 to everything; nothing listening) ends the run with exit 3,
  a message naming the URI, within the retry budget, and no stage marker.

The model here is the tiny Llama widened to hidden 256 (10 MB of fp32 weights), so that the base
model's download and the first merged shard go through S3 multipart transfers (5 MiB parts).
test_kill_anywhere.py uses the same fixtures and settings.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from tests.faultproxy import FaultProxy
from tests.helpers import SNLI_SAMPLE, job_env, run_job
from tests.s3server import make_bucket
from tests.session_cache import build_once

RUN = "run"  # every run writes to s3://<its own bucket>/run

SETTINGS = (
    "data.max_rows=80", "data.eval_size=4",
    "train.load_in_4bit=false", "train.max_steps=6", "train.checkpoint_every_steps=2", "train.keep_checkpoints=2",
    "train.micro_batch_size=2", "train.packing_length=256", "train.max_seq_length=256", "train.lora_r=8",
    "train.logging_steps=1",
    # fp32 keeps the merged weights at 10 MB: shard 1 (6 MB) goes up in two 5 MiB parts.
    "merge.check_prompts=1", "merge.dtype=fp32", "merge.max_shard_size=6MB",
    "evaluate.max_examples=2", "evaluate.batch_size=2", "evaluate.max_new_tokens=8", "evaluate.compare_base=false",
    "storage.multipart_chunk_mb=5",
)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, tiny_model_dir):  # noqa: F811
    from job.tiny_model import make_model

    def build(out):
        make_model(out, hidden=256, intermediate=1024, tokenizer_dir=tiny_model_dir)

    return build_once(tmp_path_factory, "small-model", build)[0]


# The inputs' bucket has one name on every worker's moto server: the run records data.uri and model.uri
# (config.yaml, the markers, report.md), so a reference run made on one worker (`reference_run`, built
# once per test run) compares byte for byte with the runs of another.
INPUTS_BUCKET = "fault-inputs"


@pytest.fixture(scope="session")
def inputs(moto_server, small_model_dir):
    """(data_uri, model_uri): the CSV and the model in a bucket of their own, put there directly."""
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    bucket = INPUTS_BUCKET
    # test_kill_anywhere.py's instance of this fixture may have made it on this worker: same files again.
    if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        make_bucket(moto_server, bucket)
    client.upload_file(str(SNLI_SAMPLE), bucket, "inputs/snli.csv")
    for path in sorted(Path(small_model_dir).iterdir()):
        client.upload_file(str(path), bucket, f"inputs/model/{path.name}")
    return f"s3://{bucket}/inputs/snli.csv", f"s3://{bucket}/inputs/model"


@pytest.fixture(scope="session")
def fault_proxy(moto_server):
    with FaultProxy(moto_server) as proxy:
        yield proxy


@pytest.fixture
def proxy(fault_proxy):
    fault_proxy.reset(seed=0)
    yield fault_proxy
    fault_proxy.reset()


def job_args(bucket: str, inputs) -> list[str]:
    data_uri, model_uri = inputs
    keys = (f"run_uri=s3://{bucket}/{RUN}", f"data.uri={data_uri}", f"model.uri={model_uri}", *SETTINGS)
    return ["run", *[arg for kv in keys for arg in ("--set", kv)]]


def snapshot(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object of a run (straight from moto, not through the proxy): relative key -> bytes."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{RUN}/"):
        for obj in page.get("Contents", []):
            objects[obj["Key"][len(RUN) + 1:]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return objects


# What may differ between two runs of the same config, and is taken out before comparing:
# - wall-clock timestamps, durations, speeds and memory peaks (in markers, LATEST, trainer_state.json,
#   report.json, report.md); TensorBoard's event files (their names hold the time, host and pid);
# - where the run and its local cache are: the bucket in run_uri (config.yaml, report.md, the config
#   digest), the cached base model's path (adapter_config.json, the adapter README), and
#   training_args.bin (a pickle holding the local output folder): it must exist, that is all;
# - the order of peft's target_modules (a set, ordered by string hashing);
# - what the train marker says about the last process only: resumed_from_step, checkpoints_uploaded;
#   in a checkpoint's trainer_state.json only the step, max_steps and the losses are compared (a
#   resumed run's log history also holds per-session entries).
# Everything else must be byte-identical: data, checkpoints' weights, optimizer, scheduler and RNG
# states, the adapter, the merged weights and tokenizer, predictions and scores (training on the CPU is
# deterministic: two fault-free runs of this config give the same bytes).
VOLATILE_KEY = re.compile(r"(_at|seconds|_per_s|per_second|per_example|runtime|_gb|time|config_digest)$"
                          r"|^(resumed_from_step|checkpoints_uploaded)$")
VOLATILE_MD_LINE = re.compile(r"seconds|tokens/s|s/example|config digest|created: |Peak memory")
MODEL_CACHE_PATH = re.compile(r"[^\s\"']*/models/[0-9a-f]{16}")


def _drop_volatile(value):
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if not VOLATILE_KEY.search(k)}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def comparable(objects: dict[str, bytes], bucket: str) -> dict[str, object]:
    """A run's objects with what legitimately varies between runs taken out (see above)."""
    result = {}
    for name, data in objects.items():
        base = name.rsplit("/", 1)[-1]
        if name.startswith("tensorboard/"):
            result["tensorboard/*"] = True
        elif base == "training_args.bin":
            result[name] = len(data) > 0
        elif base.endswith(".json") and not name.startswith(("data/", "merged/")) or base == "LATEST":
            text = MODEL_CACHE_PATH.sub("<model>", data.decode()).replace(f"s3://{bucket}/", "s3://<bucket>/")
            value = json.loads(text)
            if base == "adapter_config.json":
                value["target_modules"] = sorted(value["target_modules"])
            if base == "trainer_state.json":  # a resumed run's history has its own session entries
                value = {"global_step": value["global_step"], "max_steps": value["max_steps"],
                         "losses": [(e["step"], e["loss"]) for e in value["log_history"] if "loss" in e]}
            result[name] = _drop_volatile(value)
        elif base in ("README.md", "report.md", "config.yaml"):
            text = MODEL_CACHE_PATH.sub("<model>", data.decode()).replace(f"s3://{bucket}/", "s3://<bucket>/")
            result[name] = [line for line in text.splitlines() if not VOLATILE_MD_LINE.search(line)]
        else:
            result[name] = data
    return result


@pytest.fixture(scope="session")
def reference_run(moto_server, inputs, tmp_path_factory):
    """A fault-free run straight to moto: the objects every faulty or killed run must reproduce. Made once
    per test run (tests/session_cache.py: test_faults.py and test_kill_anywhere.py may run on different
    workers, and each module has its own instance of a session fixture), kept as files; the inputs are the
    same bytes under the same URIs on every worker (INPUTS_BUCKET, small_model_dir)."""

    def build(folder):
        bucket = make_bucket(moto_server)
        env = job_env(moto_server, JOB_CACHE_DIR=tmp_path_factory.mktemp("reference-cache"))
        result = run_job(*job_args(bucket, inputs), env=env)
        assert result.returncode == 0, result.stderr
        for name, data in snapshot(moto_server, bucket).items():
            (folder / "objects" / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / "objects" / name).write_bytes(data)
        return {"bucket": bucket}

    folder, info = build_once(tmp_path_factory, "fault-reference-run", build)
    objects = {p.relative_to(folder / "objects").as_posix(): p.read_bytes()
               for p in sorted((folder / "objects").rglob("*")) if p.is_file()}
    return Reference(info["bucket"], objects)


@dataclass
class Reference:
    bucket: str
    objects: dict[str, bytes]


def assert_same_run(objects: dict[str, bytes], bucket: str, reference: Reference) -> None:
    got, want = comparable(objects, bucket), comparable(reference.objects, reference.bucket)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"objects differ from the fault-free run: {differ}"


def test_transient_faults_are_absorbed(moto_server, inputs, proxy, reference_run, tmp_path):
    """About 5 % of requests each: 503 SlowDown, 500 InternalError, reset; 10 % of GET bodies cut short."""
    bucket = make_bucket(moto_server)
    proxy.set_faults(slowdown=0.05, internal=0.05, reset=0.05, truncate=0.10)
    # A fresh cache: the CSV and the model (multipart, ranged GETs) are downloaded through the faults too.
    env = job_env(proxy.url, JOB_CACHE_DIR=tmp_path / "cache")
    result = run_job(*job_args(bucket, inputs), env=env)
    assert result.returncode == 0, result.stderr
    print(f"{len(proxy.records)} requests, faults injected: {dict(proxy.faults)}")
    assert all(proxy.faults[kind] > 0 for kind in ("slowdown", "internal", "reset", "truncate")), proxy.faults
    assert any(r.key.endswith("inputs/model/model.safetensors") and r.method == "GET" for r in proxy.records)
    assert_same_run(snapshot(moto_server, bucket), bucket, reference_run)


def test_endpoint_answering_503_to_everything_exits_3(moto_server, inputs, proxy, tmp_path):
    bucket = make_bucket(moto_server)
    proxy.set_faults(slowdown=1.0)
    t0 = time.monotonic()
    result = run_job(*job_args(bucket, inputs), env=job_env(proxy.url, JOB_CACHE_DIR=tmp_path / "cache"), timeout=300)
    seconds = time.monotonic() - t0
    print(f"gave up after {seconds:.1f} s and {len(proxy.records)} requests", file=sys.stderr)
    assert result.returncode == 3, result.stderr
    assert f"s3://{bucket}/{RUN}" in result.stderr and "SlowDown" in result.stderr
    assert not any(r.method == "PUT" and r.key.startswith(f"{RUN}/_stages/") and r.outcome == "ok"
                   for r in proxy.records)
    assert snapshot(moto_server, bucket) == {}


def test_endpoint_refusing_connections_exits_3(inputs, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    t0 = time.monotonic()
    # 3 attempts: the message and the exit code are the point here; the retry bound is the test above's.
    result = run_job(*job_args("some-bucket", inputs), "--set", "storage.max_attempts=3",
                     env=job_env(dead, JOB_CACHE_DIR=tmp_path / "cache"), timeout=300)
    print(f"gave up after {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert result.returncode == 3, result.stderr
    assert "s3://some-bucket/run" in result.stderr and dead in result.stderr


def test_lease_reads_cut_short_are_read_again(moto_server, inputs, proxy, tmp_path):
    """Half of the GETs of _lease.json (acquire, renew, release) arrive cut short: a format-only run still
    finishes and leaves no lease (its reads were retried like every other download, not given up)."""
    bucket = make_bucket(moto_server)
    proxy.set_faults(keys=r"_lease\.json$", truncate=0.5)
    result = run_job(*job_args(bucket, inputs), "--stages", "format",
                     env=job_env(proxy.url, JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "_lease.json" not in snapshot(moto_server, bucket)
    cut = [r for r in proxy.records if r.method == "GET" and r.key.endswith("_lease.json") and r.outcome == "truncate"]
    assert cut, "no lease read was cut short"
