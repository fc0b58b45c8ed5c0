"""S3 for tests: moto's server mode on 127.0.0.1, a real HTTP endpoint that boto3 talks to as to AWS,
and s3rver (node), a second S3 implementation that, unlike AWS and moto, ignores conditional writes.

Fixtures:
  moto_server    (session)   the endpoint URL, e.g. "http://127.0.0.1:41234"; fake credentials in the env
  s3rver_server  (session)   the same for s3rver (tests/s3rver/, installed by `npm ci --prefix tests/s3rver`;
                             skipped when node is not installed, an error when node is there but s3rver is not)
  s3_bucket      (function)  (endpoint_url, bucket_name) of a fresh, empty bucket on moto
  store_root     (function)  (root_uri, endpoint_url or None), once per backend: "local" (a folder under
                             tmp_path, not yet created) and "s3" (s3://<fresh bucket>/some/prefix on moto)
`backend_root(request, tmp_path, backend)` gives the same for any backend, "s3rver" included, for
tests that run on every implementation (tests/test_storage.py, tests/test_lease.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

__all__ = ["backend_root", "fake_aws_env", "make_bucket", "moto_server", "s3_bucket", "s3rver_server",
           "store_root"]

S3RVER_DIR = Path(__file__).resolve().parent / "s3rver"
FAKE_ACCESS_KEY = "testing"
# Which fixture serves each S3 backend name used in test parameters.
S3_SERVERS = {"s3": "moto_server", "s3rver": "s3rver_server"}


def make_bucket(endpoint_url: str, name: str | None = None) -> str:
    """Create a bucket (a fresh unique name unless given) on the endpoint and return its name."""
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def fake_aws_env() -> Iterator[None]:
    env = pytest.MonkeyPatch()  # session-scoped stand-in for the function-scoped monkeypatch fixture
    # Forget any real AWS setup (profiles, tokens, endpoints, config files) and use fake keys, so no test
    # can reach or bill a real account. These variables reach subprocesses (the CLI tests) too.
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        env.delenv(name)
    for name, value in {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_ACCESS_KEY,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        env.setenv(name, value)
    try:
        yield
    finally:
        env.undo()


@pytest.fixture(scope="session")
def moto_server(fake_aws_env) -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: any free port
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3rver_server(fake_aws_env, tmp_path_factory) -> Iterator[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the s3rver backend (a second S3 implementation) needs Node.js 20")
    if not (S3RVER_DIR / "node_modules" / "s3rver" / "package.json").is_file():
        pytest.fail(f"s3rver is not installed in {S3RVER_DIR}: run `npm ci --prefix tests/s3rver` in the "
                    "repository (README, command 2)")
    # s3rver's dependencies predate OpenSSL 3; Node 17+ needs the legacy provider for them.
    env = {**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"}
    proc = subprocess.Popen([node, str(S3RVER_DIR / "serve.js"), str(tmp_path_factory.mktemp("s3rver")),
                             FAKE_ACCESS_KEY], cwd=S3RVER_DIR, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    found = re.search(r"listening on (127\.0\.0\.1:\d+)", first_line[0] if first_line else "")
    try:
        if not found:
            rest = "" if reader.is_alive() else (first_line[0] if first_line else "")
            pytest.fail(f"s3rver did not start (exit code {proc.poll()}): {rest}")
        yield f"http://{found.group(1)}"
    finally:
        proc.stdin.close()  # serve.js exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(moto_server: str) -> tuple[str, str]:
    return moto_server, make_bucket(moto_server)


def backend_root(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> tuple[str, str | None]:
    """(root_uri, endpoint_url or None) of a fresh, empty run root on `backend`: "local", "s3" (moto) or
    "s3rver". Only the backends asked for start their server."""
    if backend == "local":
        return str(tmp_path / "store"), None
    endpoint = request.getfixturevalue(S3_SERVERS[backend])
    return f"s3://{make_bucket(endpoint)}/some/prefix", endpoint


@pytest.fixture(params=["local", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path) -> tuple[str, str | None]:
    return backend_root(request, tmp_path, request.param)
