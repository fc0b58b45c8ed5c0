"""Secrets never leak: the real CLI runs with distinctive fake credentials in every place a user might
put them, and nothing it prints or writes may contain one (raw, URL-encoded or base64).

Places: the AWS_* and Hugging Face token variables; the config's secret fields (storage.access_key_id,
storage.secret_access_key, storage.session_token) in a --config file, in JOB_STORAGE__* variables, in
SageMaker's hyperparameters.json and with --set (each layer its own value); the password in a
storage.endpoint_url with user:password@ (botocore accepts it and ignores the userinfo: S3 signs with
the keys, so the run works). Scanned: stdout, stderr, every object under run_uri (config.yaml, markers,
data, checkpoints with trainer_state.json and the pickled training_args.bin, adapter, merged model,
report, TensorBoard event files), the cache folder (the downloaded model and the run's work folder) and
TMPDIR. Also the failure paths: bad configuration (exit 2), storage failures (exit 3), a usage error,
and an unexpected exception whose message carries the secrets (exit 1, traceback logged).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.helpers import ROOT, SNLI_SAMPLE, job_env, put_file, run_job, s3_client

ENV_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKELEAKCHECK1234",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYLEAKCHECK1",  # 40 characters, like a real one
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEnvSessionTokenLeakCheck+/0123456789==",
    "AWS_SECURITY_TOKEN": "LegacySecurityTokenLeakCheck98765",
    "HF_TOKEN": "hf_LeakCheckTokenAbCdEfGhIjKlMnOpQrStUv",
    "HUGGING_FACE_HUB_TOKEN": "hf_LeakCheckHubTokenZyXwVuTsRqPoNmLk",
}
FIELDS = ("access_key_id", "secret_access_key", "session_token")
# Each layer gets its own values: the lower layers' are overridden, and must not appear either.
FILE_SECRETS = {"access_key_id": "AKIAFILELEAKCHECK0001", "secret_access_key": "fileSecretLeakCheck/abc+def#ghi",
                "session_token": "fileSessionTokenLeakCheck0001"}
HYPER_SECRETS = {f: f"hyper-{f}-LeakCheck-0123" for f in FIELDS}  # 0123: YAML would read a number
JOBENV_SECRETS = {f: f"jobenv-{f}-LeakCheck-77" for f in FIELDS}
SET_SECRETS = {"access_key_id": "AKIASETLEAKCHECK0002", "secret_access_key": "setSecretLeakCheck/QwErTy+UiOp/AsDfGhJk",
               "session_token": "setSessionTokenLeakCheck0002"}
URL_PASSWORD = "pa55word-leak"
ALL = {**{f"env {k}": v for k, v in ENV_SECRETS.items()},
       **{f"{layer} storage.{k}": v
          for layer, values in (("config file", FILE_SECRETS), ("hyperparameters", HYPER_SECRETS),
                                ("JOB_ env", JOBENV_SECRETS), ("--set", SET_SECRETS))
          for k, v in values.items()},
       "endpoint_url password": URL_PASSWORD}

SMALL = ("data.eval_size=8", "data.max_rows=120", "train.load_in_4bit=false", "train.max_steps=4",
         "train.checkpoint_every_steps=2", "train.logging_steps=1", "train.micro_batch_size=4",
         "train.packing_length=512", "train.lora_r=8", "merge.check_prompts=1", "evaluate.max_examples=2",
         "evaluate.max_new_tokens=8", "evaluate.batch_size=2")


def forms(value: str) -> set[bytes]:
    """The secret as it could end up in a file: raw, URL-encoded, base64."""
    return {value.encode(), quote(value, safe="").encode(), base64.b64encode(value.encode())}


def leaks(blobs: dict[str, bytes]) -> list[str]:
    """'<secret> in <where>' for every secret (in any form) found in any blob."""
    found = []
    for where, data in blobs.items():
        for name, value in ALL.items():
            if any(form in data for form in forms(value)):
                found.append(f"{name} in {where}")
    return found


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()} if Path(folder).exists() else {}


def objects_under(endpoint: str, uri: str) -> dict[str, bytes]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client, out = s3_client(endpoint), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[f"s3://{bucket}/{obj['Key']}"] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


@pytest.fixture
def secret_setup(tmp_path):
    """The config file, hyperparameters.json and environment that put the secrets everywhere."""
    config = tmp_path / "job.yaml"
    config.write_text("storage:\n" + "".join(f"  {k}: '{v}'\n" for k, v in FILE_SECRETS.items()))
    hyper = tmp_path / "hyperparameters.json"
    hyper.write_text(json.dumps({f"storage.{k}": v for k, v in HYPER_SECRETS.items()}))
    (tmp_path / "tmp").mkdir()
    env = {**ENV_SECRETS, **{f"JOB_STORAGE__{k.upper()}": v for k, v in JOBENV_SECRETS.items()},
           "JOB_SAGEMAKER_HYPERPARAMETERS": hyper, "JOB_CACHE_DIR": tmp_path / "cache", "TMPDIR": tmp_path / "tmp"}
    sets = [a for k, v in SET_SECRETS.items() for a in ("--set", f"storage.{k}={v}")]
    return config, env, sets


def endpoint_with_password(endpoint: str) -> str:
    return endpoint.replace("http://", f"http://leakuser:{URL_PASSWORD}@")


# On S3 only: a run on a folder writes the same files through the same code, and the S3 run also has the
# model download and its cache to scan.
@pytest.mark.parametrize("store_root", ["s3"], indirect=True)
def test_a_whole_run_leaks_no_secret(store_root, secret_setup, tiny_model_dir, tmp_path):  # noqa: F811
    root, endpoint = store_root
    config, env, sets = secret_setup
    data_uri = put_file(root, endpoint, SNLI_SAMPLE, "snli.csv")
    model_uri = str(tiny_model_dir)
    if endpoint:  # the model comes from S3 too: the download and its cache are scanned
        bucket = root[len("s3://"):].split("/", 1)[0]
        for path in Path(tiny_model_dir).iterdir():
            s3_client(endpoint).upload_file(str(path), bucket, f"models/tiny/{path.name}")
        model_uri = f"s3://{bucket}/models/tiny"
    endpoint_url = endpoint_with_password(endpoint or "http://127.0.0.1:9")  # unused by a local run
    args = ["run", "--config", config, *sets, "--set", f"storage.endpoint_url={endpoint_url}",
            *[a for kv in (f"run_uri={root}", f"data.uri={data_uri}", f"model.uri={model_uri}", *SMALL)
              for a in ("--set", kv)]]
    result = run_job(*args, env=job_env(endpoint, **env))
    assert result.returncode == 0, result.stderr

    written = objects_under(endpoint, root) if endpoint else files_under(Path(root))
    names = {k.rsplit("/", 1)[-1] for k in written}
    for expected in ("config.yaml", "evaluate.json", "LATEST", "trainer_state.json", "training_args.bin",
                     "adapter_config.json", "report.json", "report.md", "generation_config.json"):
        assert expected in names, expected
    assert any(n.startswith("events.out.tfevents") for n in names)
    blobs = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode(), **written,
             **files_under(tmp_path / "cache"), **files_under(tmp_path / "tmp")}
    assert leaks(blobs) == []

    # The secrets were used (redacted, not dropped): the highest layer won.
    resolved = next(v for k, v in written.items() if k.endswith("/config.yaml") and "/checkpoints/" not in k).decode()
    assert "secret_access_key: '***'" in resolved and "http://***@127.0.0.1:" in resolved


def test_a_hub_run_leaks_no_token(secret_setup, tiny_model_dir, tmp_path):  # noqa: F811
    """The base model from a gated repo on a fake Hugging Face Hub that checks HF_TOKEN: the run
    trains, its train marker records the commit, and the token is nowhere in what it wrote."""
    from tests.fakehub import FakeHub, folder_files

    config, env, sets = secret_setup
    hub = FakeHub(token=ENV_SECRETS["HF_TOKEN"])
    sha = hub.add_repo("models", "org/gated-tiny", {"main": folder_files(tiny_model_dir)}, gated=True)["main"]
    hub.start()
    root = tmp_path / "run"
    try:
        result = run_job("run", "--config", config, *sets, "--stages", "format,train",
                         *[a for kv in (f"run_uri={root}", f"data.uri={SNLI_SAMPLE}", "model.uri=hf://org/gated-tiny",
                                        *SMALL) for a in ("--set", kv)],
                         env=job_env(None, HF_ENDPOINT=hub.url, **env))
    finally:
        hub.stop()
    assert result.returncode == 0, result.stderr
    assert json.loads((root / "_stages" / "train.json").read_text())["metrics"]["model_revision"] == sha
    blobs = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode(), **files_under(root),
             **files_under(tmp_path / "cache"), **files_under(tmp_path / "tmp")}
    assert leaks(blobs) == []


def run_failing(*args, env, argv_prefix=()):
    return run_job(*args, env=job_env(**env)) if not argv_prefix else _run_python(argv_prefix, args, env)


def _run_python(code, args, env):
    import subprocess

    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=job_env(**env), timeout=300, cwd=ROOT)


def test_failures_leak_no_secret(secret_setup, moto_server, tmp_path):
    config, env, sets = secret_setup
    base = ["--config", config, *sets, "--set", f"run_uri={tmp_path / 'run'}", "--set", f"data.uri={SNLI_SAMPLE}",
            "--set", "model.uri=/nonexistent-model"]
    outputs = {}

    def check(name, result, code, *expected):
        assert result.returncode == code, (name, result.stderr)
        for text in expected:
            assert text in result.stderr, (name, text, result.stderr)
        outputs[name] = result.stdout + result.stderr

    # exit 2: a bad value next to the secrets, and secrets of the wrong type (values never echoed)
    check("bad value", run_failing("run", *base, "--set", "train.lora_r=abc",
                                   "--set", f"storage.endpoint_url=leakuser:{URL_PASSWORD}@127.0.0.1:9000", env=env),
          2, "train.lora_r: expected an integer", "storage.endpoint_url: must start with http:// or https://")
    bad_yaml = tmp_path / "bad.yaml"  # the error is on the secret's own line: PyYAML would quote it
    bad_yaml.write_text(f"storage:\n  secret_access_key: {FILE_SECRETS['secret_access_key']}: x\n")
    check("bad yaml", run_failing("run", "--config", bad_yaml, env=env), 2, "not valid YAML at line 2")
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text(f"storage:\n  session_token: [{FILE_SECRETS['session_token']}]\n")
    check("wrong type", run_failing("run", "--config", wrong_type, env=env), 2,
          "storage.session_token: expected a string", "value not shown")
    check("https data.uri", run_failing("run", *base, "--set",
                                        f"data.uri=https://leakuser:{URL_PASSWORD}@example.com/x.csv", env=env),
          2, "data.uri: https:// URLs are not supported (https://***@example.com/x.csv)")
    # exit 2: a usage error quoting a stray argument (a space after '=' in --set KEY=VALUE)
    check("usage", run_failing("run", *base, "--set", "storage.secret_access_key=",
                               SET_SECRETS["secret_access_key"], env=env), 2, "unexpected extra argument")
    # exit 3: a bucket that does not exist, an endpoint that does not answer
    check("no bucket", run_failing("run", *base[:-4], "--set", "run_uri=s3://no-such-bucket-leakcheck/run",
                                   "--set", f"storage.endpoint_url={endpoint_with_password(moto_server)}",
                                   "--set", f"data.uri={SNLI_SAMPLE}", "--set", "model.uri=/m", env=env),
          3, "s3://no-such-bucket-leakcheck")
    check("no endpoint", run_failing("run", *base[:-4], "--set", "run_uri=s3://bucket/run",
                                     "--set", "storage.endpoint_url=http://leakuser:" + URL_PASSWORD + "@127.0.0.1:9",
                                     "--set", "storage.max_attempts=1", "--set", f"data.uri={SNLI_SAMPLE}",
                                     "--set", "model.uri=/m", env=env),
          3, "cannot reach endpoint http://***@127.0.0.1:9")
    # exit 1: an unexpected exception whose message holds every secret the job knows; its traceback is logged
    boom = ("import os, sys, job.runner\n"
            "def boom(cfg, *a, **k):\n"
            "    s = cfg.storage\n"
            "    raise RuntimeError(' '.join([s.access_key_id, s.secret_access_key, s.session_token,\n"
            "        s.endpoint_url, s.endpoint_url.split('//')[1]] + [os.environ[n] for n in (\n"
            "        'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_SECURITY_TOKEN',\n"
            "        'HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN')]))\n"
            "job.runner.run_pipeline = boom\n"
            "from job.cli import main\n"
            "sys.argv[0] = 'job'\n"
            "main()\n")
    check("unexpected", run_failing("run", *base, "--set",
                                    f"storage.endpoint_url={endpoint_with_password(moto_server)}", env=env,
                                    argv_prefix=boom),
          1, "Traceback", "RuntimeError: *** *** *** http://***@127.0.0.1")
    # what the config and plan commands print
    check("config", run_failing("config", *base, env=env), 0)
    check("plan", run_failing("plan", *base, env=env), 0)

    assert leaks({name: text.encode() for name, text in outputs.items()}) == []
    assert leaks(files_under(tmp_path / "cache")) == [] and leaks(files_under(tmp_path / "run")) == []
