"""Bad inputs through the real CLI: each case exits with its documented code and a message that names
the thing (key, file, URI) and says what to do. No traceback, no marker.

Already covered elsewhere (not repeated here):
  tests/test_format.py  empty CSV, header only, missing columns, non-UTF-8 bytes, no row with the label,
                        rows with too many / too few fields, a huge field, missing local CSV, fewer rows
                        than data.eval_size, data.uri naming a missing S3 object (exit 2)
  tests/test_config.py  unknown keys, wrong types, bad choices, missing required keys (all at once),
                        invalid YAML, unreadable --config file, --set without '='
  tests/test_cli.py     the same through the CLI (exit 2), unknown --stages
  tests/test_predict.py predict's missing/unreadable input file, missing CSV column, no input
  tests/test_secrets.py unsupported URL schemes and a malformed storage.endpoint_url (exit 2)

Here: broken model folders (no weights, truncated weights, no tokenizer, a tokenizer without EOS, an
empty S3 prefix), damaged checkpoints under checkpoints/, a run_uri on a bucket that does not
exist, and a bucket the credentials may read but not write (a tiny proxy in front of moto answers
every write with S3's 403 AccessDenied, because moto itself does not enforce permissions).
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers import SNLI_SAMPLE, job_env, read_run_file, run_file_exists, run_job, s3_client

# Small and quick: 4 steps, a checkpoint every 2 (checkpoint-2 and checkpoint-4 stay in storage).
TRAIN_SETS = ("data.eval_size=8", "data.max_rows=100", "train.load_in_4bit=false", "train.max_steps=4",
              "train.checkpoint_every_steps=2", "train.logging_steps=1", "train.micro_batch_size=4",
              "train.packing_length=512", "train.lora_r=8")


def train_args(run_uri, model_uri, data_uri=SNLI_SAMPLE):
    sets = (f"run_uri={run_uri}", f"data.uri={data_uri}", f"model.uri={model_uri}") + TRAIN_SETS
    return ["run", "--stages", "format,train", *[a for kv in sets for a in ("--set", kv)]]


def assert_clean_failure(result, code, *expected):
    assert result.returncode == code, result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr


# -- the base model ------------------------------------------------------------------------------


def _no_weights(d: Path):
    (d / "model.safetensors").unlink()


def _truncated_weights(d: Path):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted copy


def _no_tokenizer(d: Path):
    (d / "tokenizer.json").unlink()


def _no_eos(d: Path):
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))


MODEL_CASES = {
    "no_weights": (_no_weights, ["not a usable Hugging Face model folder", "missing weights (model.safetensors"]),
    "truncated_weights": (_truncated_weights, ["model.safetensors is truncated or damaged",
                                               "copy the model folder again"]),
    "no_tokenizer": (_no_tokenizer, ["missing a tokenizer (tokenizer.json or tokenizer.model)"]),
    "no_eos": (_no_eos, ["the tokenizer has no EOS token; set eos_token in tokenizer_config.json"]),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_broken_model_folder_exits_2_naming_it(case, tiny_model_dir, tmp_path):  # noqa: F811
    damage, expected = MODEL_CASES[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    result = run_job(*train_args(tmp_path / "run", model), env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert_clean_failure(result, 2, str(model), *expected)
    assert (tmp_path / "run" / "_stages" / "format.json").is_file()  # format ran; train left no marker
    assert not (tmp_path / "run" / "_stages" / "train.json").exists()


def test_model_uri_on_an_empty_s3_prefix_exits_2(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    result = run_job(*train_args(tmp_path / "run", f"s3://{bucket}/models/none"),
                     env=job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache"))
    assert_clean_failure(result, 2, f"s3://{bucket}/models/none", "nothing found")


# -- damaged checkpoints ---------------------------------------------------------------------------
#
# Behaviour (job/stages/checkpoints.py explains why): a checkpoint LATEST names that is incomplete or
# damaged is never trained on; the job resumes from the newest older checkpoint that checks out, with a
# warning naming both, or, when none does, exits 2 saying how to go on (--force train). It never
# silently starts over and never ends in a traceback.


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """A run killed after its last checkpoint was uploaded, before the train marker: checkpoint-2 and
    checkpoint-4 in storage, LATEST -> checkpoint-4, no _stages/train.json."""
    base = tmp_path_factory.mktemp("interrupted")
    result = run_job(*train_args(base / "run", tiny_model_dir), env=job_env(JOB_CACHE_DIR=base / "cache"))
    assert result.returncode == 0, result.stderr
    run = base / "run"
    assert json.loads((run / "checkpoints" / "LATEST").read_text())["checkpoint"] == "checkpoint-4"
    assert (run / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()
    (run / "_stages" / "train.json").unlink()
    shutil.rmtree(run / "adapter")
    return run


def resume(interrupted_run, tmp_path, model_dir, damage):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    damage(run / "checkpoints")
    return run, run_job(*train_args(run, model_dir), env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(interrupted_run, tiny_model_dir, tmp_path):  # noqa: F811
    run, result = resume(interrupted_run, tmp_path, tiny_model_dir,
                         lambda c: _truncate(c / "checkpoint-4" / "optimizer.pt"))
    assert result.returncode == 0, result.stderr
    assert f"checkpoint {run}/checkpoints/checkpoint-4 is unusable (optimizer.pt is damaged" in result.stderr
    assert f"resuming from the older checkpoint {run}/checkpoints/checkpoint-2 instead" in result.stderr
    metrics = json.loads((run / "_stages" / "train.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    assert [e["step"] for e in metrics["loss_curve"]] == [1, 2, 3, 4]  # steps 3 and 4 trained again, once
    assert json.loads((run / "checkpoints" / "LATEST").read_text())["checkpoint"] == "checkpoint-4"
    assert (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()  # re-uploaded whole


def test_no_usable_checkpoint_exits_2_and_says_force_train(interrupted_run, tiny_model_dir, tmp_path):  # noqa: F811
    def damage(c):
        (c / "checkpoint-4" / "trainer_state.json").unlink()
        (c / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    run, result = resume(interrupted_run, tmp_path, tiny_model_dir, damage)
    assert_clean_failure(result, 2, f"cannot resume training from {run}/checkpoints/LATEST",
                         "checkpoint-4 is unusable (missing trainer_state.json)",
                         "checkpoint-2 is unusable (adapter_model.safetensors is damaged", "--force train")
    assert not (run / "_stages" / "train.json").exists()
    assert (run / "checkpoints" / "checkpoint-4").is_dir()  # nothing was deleted or overwritten


def test_garbage_latest_exits_2(interrupted_run, tiny_model_dir, tmp_path):  # noqa: F811
    run, result = resume(interrupted_run, tmp_path, tiny_model_dir,
                         lambda c: (c / "LATEST").write_bytes(b"\x00\xffnot json"))
    assert_clean_failure(result, 2, f"{run}/checkpoints/LATEST is damaged", "--force train")


# -- storage the job cannot use --------------------------------------------------------------------


def test_run_uri_on_a_missing_bucket_exits_3(moto_server, tmp_path):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    result = run_job(*train_args(f"s3://{bucket}/run", tmp_path / "no-model"),
                     env=job_env(moto_server, JOB_CACHE_DIR=tmp_path / "cache"))
    assert_clean_failure(result, 3, f"s3://{bucket}", "bucket does not exist")


class ReadOnlyS3Proxy(BaseHTTPRequestHandler):
    """Forwards reads to moto and answers every write (PUT, POST, DELETE) as S3 does when the bucket
    policy or the role allows reading only: 403 with an AccessDenied XML body. (Another engineer builds
    a general fault proxy in tests/faultproxy.py; this one is deliberately self-contained.)"""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                data += self.rfile.read(size + 2)[:size]
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, headers: list, body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        body = self._body()
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        self._reply(answer.status, answer.getheaders(), data)

    def _deny(self) -> None:
        self._body()
        xml = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
               b"<Message>Access Denied</Message><RequestId>READONLY</RequestId><HostId>proxy</HostId></Error>")
        self._reply(403, [("Content-Type", "application/xml")], xml)

    do_GET = do_HEAD = _forward
    do_PUT = do_POST = do_DELETE = _deny

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def read_only_endpoint(moto_server):
    upstream = urlsplit(moto_server)
    handler = type("Handler", (ReadOnlyS3Proxy,), {"upstream": (upstream.hostname, upstream.port)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_read_only_bucket_exits_3_saying_access_denied(s3_bucket, read_only_endpoint, tmp_path):
    endpoint, bucket = s3_bucket
    # Reading through the proxy works (the data is there), writing is refused.
    s3_client(endpoint).upload_file(str(SNLI_SAMPLE), bucket, "inputs/snli.csv")
    assert read_run_file(f"s3://{bucket}", read_only_endpoint, "inputs/snli.csv").startswith("gold_label")
    result = run_job(*train_args(f"s3://{bucket}/run", tmp_path / "no-model", f"s3://{bucket}/inputs/snli.csv"),
                     env=job_env(read_only_endpoint, JOB_CACHE_DIR=tmp_path / "cache"))
    assert_clean_failure(result, 3, f"s3://{bucket}/run/", "access denied", "AccessDenied")
    assert not run_file_exists(f"s3://{bucket}/run", endpoint, "config.yaml")
