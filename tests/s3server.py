"""S3 for tests: moto's server mode on 127.0.0.1, a real HTTP endpoint that boto3 talks to as to AWS.

Fixtures:
  moto_server  (session)   the endpoint URL, e.g. "http://127.0.0.1:41234"; fake credentials in the env
  s3_bucket    (function)  (endpoint_url, bucket_name) of a fresh, empty bucket
  store_root   (function)  (root_uri, endpoint_url or None), once per backend: "local" (a folder under
                           tmp_path, not yet created) and "s3" (s3://<fresh bucket>/some/prefix)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

__all__ = ["make_bucket", "moto_server", "s3_bucket", "store_root"]


def make_bucket(endpoint_url: str, name: str | None = None) -> str:
    """Create a bucket (a fresh unique name unless given) on the endpoint and return its name."""
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    env = pytest.MonkeyPatch()  # session-scoped stand-in for the function-scoped monkeypatch fixture
    # Forget any real AWS setup (profiles, tokens, endpoints, config files) and use fake keys, so no test
    # can reach or bill a real account. These variables reach subprocesses (the CLI tests) too.
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        env.delenv(name)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        env.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: any free port
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        env.undo()


@pytest.fixture
def s3_bucket(moto_server: str) -> tuple[str, str]:
    return moto_server, make_bucket(moto_server)


@pytest.fixture(params=["local", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path) -> tuple[str, str | None]:
    if request.param == "local":
        return str(tmp_path / "store"), None
    endpoint, bucket = request.getfixturevalue("s3_bucket")  # only S3 runs start the server
    return f"s3://{bucket}/some/prefix", endpoint
