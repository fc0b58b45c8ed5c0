"""Shared test helpers: run the real CLI in a real process, and read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parents[1]
SNLI_SAMPLE = ROOT / "tests" / "data" / "snli_sample.csv"


def job_env(endpoint_url=None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env["PYTHONUNBUFFERED"] = "1"
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_job(*args, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """`python -m job ARGS` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "job", *map(str, args)], capture_output=True, text=True,
                          env=env or job_env(), timeout=timeout, cwd=cwd or ROOT)


def s3_client(endpoint_url):
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


def put_file(root_uri: str, endpoint_url, local: Path, name: str) -> str:
    """Place a local file next to a store root (folder or bucket) and return its URI."""
    if root_uri.startswith("s3://"):
        bucket = root_uri[5:].split("/", 1)[0]
        s3_client(endpoint_url).upload_file(str(local), bucket, f"inputs/{name}")
        return f"s3://{bucket}/inputs/{name}"
    target = Path(root_uri).parent / "inputs" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(Path(local).read_bytes())
    return str(target)


def read_run_file(root_uri: str, endpoint_url, rel: str) -> str:
    if root_uri.startswith("s3://"):
        bucket, _, prefix = root_uri[5:].partition("/")
        key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
        return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    return (Path(root_uri) / rel).read_text(encoding="utf-8")


def run_file_exists(root_uri: str, endpoint_url, rel: str) -> bool:
    if root_uri.startswith("s3://"):
        bucket, _, prefix = root_uri[5:].partition("/")
        key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
        found = s3_client(endpoint_url).list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
        return any(obj["Key"] == key for obj in found)
    return (Path(root_uri) / rel).is_file()


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
