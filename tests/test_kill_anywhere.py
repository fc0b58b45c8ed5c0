"""Kill anywhere: SIGKILL a real `job run` at 27 points chosen by request and byte counts at the fault
proxy (never by sleeps), rerun after each, and check that every rerun goes on and that the run ends
byte-identical to an uninterrupted one (tests/test_faults.py's `reference_run`).

The points are chained: the run killed at point 1 is rerun and killed at point 2, and so on, so each
point costs one short process. Two chains:

- format and train, from an empty run: config.yaml, the format marker, data/*.jsonl, the model download,
  a checkpoint's file mid-body, mid-way through a checkpoint's files, between those and LATEST, right
  after LATEST, a resumed checkpoint, the adapter, the train marker;
- merge and evaluate, from a run whose format and train are done (copied from the reference run):
  a merged shard mid-part (multipart), before CompleteMultipartUpload, a single-PUT shard mid-body,
  the index, the merge marker, report files, the evaluate marker.

After every kill, the storage invariants hold: a stage marker only next to complete outputs (equal to
the reference's), LATEST only next to a complete checkpoint. Each chain ends with a clean rerun whose
objects must equal the reference run's (so no partial object was ever read as complete: it would
have changed a byte, or crashed the rerun).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass

import boto3

from tests.helpers import ROOT, job_env
from tests.s3server import make_bucket
from tests.test_faults import (  # noqa: F401 - fixtures
    RUN,
    comparable,
    fault_proxy,
    inputs,
    job_args,
    proxy,
    reference_run,
    small_model_dir,
    snapshot,
)

MB = 1024 * 1024


@dataclass
class Point:
    """Kill at the `nth` request (PUT unless `method`) whose key matches `key` ("before" it reaches S3,
    or "after" S3 stored it but before the job hears back), or after `after_bytes` of its body."""

    name: str
    key: str
    nth: int | None = None
    after_bytes: int | None = None
    when: str = "before"
    method: str = "PUT"


FORMAT_AND_TRAIN = [
    Point("config.yaml, before it is written", r"/config\.yaml$", nth=1),
    Point("config.yaml, mid-body", r"/config\.yaml$", after_bytes=900),
    Point("format.started marker, before", r"/_stages/format\.started\.json$", nth=1),
    Point("data/train.jsonl, mid-body", r"/data/train\.jsonl$", after_bytes=30_000),
    Point("data/eval.jsonl, stored but unanswered", r"/data/eval\.jsonl$", nth=1, when="after"),
    Point("format marker, mid-body", r"/_stages/format\.json$", after_bytes=600),
    Point("format marker, stored but unanswered", r"/_stages/format\.json$", nth=1, when="after"),
    # train.started is written at train's first write (the first checkpoint), after the model download.
    Point("model download, second ranged GET", r"inputs/model/model\.safetensors$", nth=2, method="GET"),
    Point("train.started marker, before", r"/_stages/train\.started\.json$", nth=1),
    Point("checkpoint-2 optimizer.pt, mid-body", r"/checkpoints/checkpoint-2/optimizer\.pt$", after_bytes=300_000),
    Point("checkpoint-2, after 6 of its 10 files", r"/checkpoints/checkpoint-2/", nth=7),
    Point("checkpoints/LATEST, before (files uploaded)", r"/checkpoints/LATEST$", nth=1),
    Point("checkpoints/LATEST, stored but unanswered", r"/checkpoints/LATEST$", nth=1, when="after"),
    Point("resumed run's checkpoint-4 adapter, mid-body",
          r"/checkpoints/checkpoint-4/adapter_model\.safetensors$", after_bytes=200_000),
    Point("adapter weights, mid-body", r"/adapter/adapter_model\.safetensors$", after_bytes=100_000),
    Point("adapter, after 3 of its files", r"/adapter/", nth=3, when="after"),
    Point("train marker, before", r"/_stages/train\.json$", nth=1),
]
MERGE_AND_EVALUATE = [
    Point("merge.started marker, before", r"/_stages/merge\.started\.json$", nth=1),
    Point("merged shard 1 (multipart), mid-part 2", r"/merged/model-00001-of-00002\.safetensors$",
          after_bytes=5 * MB + MB // 2),
    Point("merged shard 1, before CompleteMultipartUpload", r"/merged/model-00001-of-00002\.safetensors$",
          nth=2, method="POST"),
    Point("merged shard 2 (one PUT), mid-body", r"/merged/model-00002-of-00002\.safetensors$", after_bytes=2 * MB),
    Point("merged index, before", r"/merged/model\.safetensors\.index\.json$", nth=1),
    Point("merge marker, mid-body", r"/_stages/merge\.json$", after_bytes=500),
    Point("evaluate.started marker, before", r"/_stages/evaluate\.started\.json$", nth=1),
    Point("report.json, mid-body", r"/report/report\.json$", after_bytes=1000),
    Point("predictions.jsonl, stored but unanswered", r"/report/predictions\.jsonl$", nth=1, when="after"),
    Point("evaluate marker, before", r"/_stages/evaluate\.json$", nth=1),
]
STAGE_OUTPUTS = {"format": ("data/",), "train": ("adapter/",), "merge": ("merged/",), "evaluate": ("report/",)}


def kill_at(point: Point, proxy, args, env) -> None:  # noqa: F811
    proxy.reset()
    trigger = proxy.kill_at(point.name, 0, point.key, method=point.method, nth=point.nth,
                            after_bytes=point.after_bytes, when=point.when)
    proc = subprocess.Popen([sys.executable, "-m", "job", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trigger.pid = proc.pid  # armed before the start; no request can come this early, the pid is set in time
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == -9 and proxy.fired == [point.name], \
        f"{point.name}: not killed there (exit {proc.returncode}, fired {proxy.fired}):\n{err[-3000:]}"


def check_invariants(objects: dict[str, bytes], bucket: str, reference, where: str) -> None:
    """What a reader may rely on after any kill: markers and LATEST only point at complete outputs."""
    want = comparable(reference.objects, reference.bucket)
    got = comparable({k: v for k, v in objects.items() if not k.startswith("checkpoints/")}, bucket)
    for stage, outputs in STAGE_OUTPUTS.items():
        if f"_stages/{stage}.json" not in objects:
            continue
        names = [n for n in want if n.startswith(outputs)]
        bad = [n for n in names if got.get(n) != want[n]]
        assert not bad, f"after the kill at {where}: {stage} marker present but outputs incomplete: {bad}"
    if "checkpoints/LATEST" in objects:
        from safetensors.torch import load

        latest = json.loads(objects["checkpoints/LATEST"])
        folder = f"checkpoints/{latest['checkpoint']}/"
        missing = [f for f in latest["files"] if folder + f not in objects]
        assert not missing, f"after the kill at {where}: LATEST points at {folder} lacking {missing}"
        load(objects[folder + "adapter_model.safetensors"])  # a cut-off safetensors file does not load
        import torch

        torch.load(io.BytesIO(objects[folder + "optimizer.pt"]), weights_only=True)


def run_chain(points: list[Point], proxy, moto_server, bucket, inputs, reference, env):  # noqa: F811
    args = job_args(bucket, inputs)
    for point in points:
        kill_at(point, proxy, args, env)
        check_invariants(snapshot(moto_server, bucket), bucket, reference, point.name)
    proxy.reset()
    result = subprocess.run([sys.executable, "-m", "job", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    objects = snapshot(moto_server, bucket)
    got, want = comparable(objects, bucket), comparable(reference.objects, reference.bucket)
    assert sorted(got) == sorted(want)
    assert [n for n in want if got[n] != want[n]] == [], "the run differs from an uninterrupted one"
    report = json.loads(objects["report/report.json"])
    for name in ("json_valid_rate", "schema_valid_rate", "original_match_rate", "copy_rate", "eos_stop_rate",
                 "chrf"):
        assert name in report["finetuned"]
    assert report["n_examples"] == 2 and report["train"]["steps"] == 6 and "max_logit_diff" in report["merge"]
    return objects


def test_kill_anywhere_in_format_and_train(moto_server, inputs, proxy, reference_run, tmp_path):  # noqa: F811
    bucket = make_bucket(moto_server)
    env = job_env(proxy.url, JOB_CACHE_DIR=tmp_path / "cache")
    objects = run_chain(FORMAT_AND_TRAIN, proxy, moto_server, bucket, inputs, reference_run, env)
    from transformers import AutoModelForCausalLM

    local = tmp_path / "merged"
    for name, data in objects.items():
        if name.startswith("merged/"):
            (local / name[len("merged/"):]).parent.mkdir(parents=True, exist_ok=True)
            (local / name[len("merged/"):]).write_bytes(data)
    AutoModelForCausalLM.from_pretrained(local)  # the merged model loads


def test_kill_anywhere_in_merge_and_evaluate(moto_server, inputs, proxy, reference_run, tmp_path):  # noqa: F811
    bucket = make_bucket(moto_server)
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    later = ("merged/", "report/", "_stages/merge", "_stages/evaluate")
    for name, data in reference_run.objects.items():  # format and train done, as an earlier run left them
        if not name.startswith(later):
            client.put_object(Bucket=bucket, Key=f"{RUN}/{name}", Body=data)
    env = job_env(proxy.url, JOB_CACHE_DIR=tmp_path / "cache")
    run_chain(MERGE_AND_EVALUATE, proxy, moto_server, bucket, inputs, reference_run, env)
