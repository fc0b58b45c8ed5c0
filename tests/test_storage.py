"""job.storage: the same suite on a folder, on moto's S3 server and on s3rver (two S3 implementations, real
boto3 over HTTP), plus what is particular to each backend: atomic local writes, and S3's missing bucket,
access denied, dead endpoint, and the probe of conditional writes (honoured by moto, ignored by s3rver)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import boto3
import pytest

from job.config import StorageConfig
from job.errors import EXIT_BAD_INPUT, InputError, StorageError
from job.storage import TEMP_SUFFIX, LocalStore, S3Store, is_s3, open_store, redact_uri, split_uri, verify_download
from tests.s3server import backend_root, make_bucket

TEXT = "Ein Mann fährt Fahrrad. 自転車に乗る男。 — «ok» 🚲\n"


def client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def stray_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and TEMP_SUFFIX in p.name)


@pytest.fixture(params=["local", "s3", "s3rver"])
def store_root(request, tmp_path):
    """Overrides conftest's store_root (local, moto) for this module: every S3 test here runs on moto ("s3")
    and on s3rver too, since nothing in the store itself depends on conditional writes."""
    return backend_root(request, tmp_path, request.param)


@pytest.fixture(params=["s3", "s3rver"])
def s3_endpoint(request):
    return request.getfixturevalue({"s3": "moto_server", "s3rver": "s3rver_server"}[request.param])


@pytest.fixture
def s3_bucket(s3_endpoint):
    """Overrides conftest's s3_bucket (moto): a fresh bucket on each S3 implementation."""
    return s3_endpoint, make_bucket(s3_endpoint)


# --- the same behaviour on every backend --------------------------------------------------------------

def test_open_store_picks_backend_and_names_uris(store_root):
    root, endpoint = store_root
    store = open_store(root, StorageConfig(endpoint_url=endpoint))
    assert isinstance(store, S3Store if is_s3(root) else LocalStore)
    assert store.uri == root
    assert store.uri_of("") == root and store.uri_of("a/b.txt") == f"{root}/a/b.txt"


def test_text_and_bytes_round_trip(store_root):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1]))
    store.write_text("notes/ünïcode.txt", TEXT)
    assert store.read_text("notes/ünïcode.txt") == TEXT
    blob = bytes(range(256)) * 10
    store.write_bytes("blob.bin", blob)
    assert store.read_bytes("blob.bin") == blob
    store.write_text("notes/ünïcode.txt", "second version")  # overwrite replaces the whole file
    assert store.read_text("notes/ünïcode.txt") == "second version"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""


def test_exists_and_exists_dir(store_root):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1]))
    assert not store.exists("a/b/c.txt") and not store.exists_dir("a") and not store.exists_dir("")
    store.write_text("a/b/c.txt", "x")
    assert store.exists("a/b/c.txt")
    assert not store.exists("a/b") and not store.exists("a/b/c")  # a folder or a prefix is not a file
    assert store.exists_dir("a") and store.exists_dir("a/b") and store.exists_dir("")
    assert not store.exists_dir("a/b/c.txt") and not store.exists_dir("a/b/c")


def test_list_is_recursive_sorted_and_relative(store_root):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1]))
    assert store.list() == [] and store.list("nothing/here") == []
    for name in ["z.txt", "a/2.txt", "a/10.txt", "a/b/deep.txt", "ab.txt"]:
        store.write_text(name, name)
    assert store.list() == ["a/10.txt", "a/2.txt", "a/b/deep.txt", "ab.txt", "z.txt"]
    assert store.list("a") == ["10.txt", "2.txt", "b/deep.txt"]  # "ab.txt" is not under "a/"
    assert store.list("a/") == store.list("a")
    assert store.list("a/b") == ["deep.txt"]


def test_child_is_rooted_at_rel(store_root):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1]))
    child = store.child("checkpoints/checkpoint-5")
    assert child.uri == f"{store_root[0]}/checkpoints/checkpoint-5"
    child.write_text("state.json", "{}")
    assert store.read_text("checkpoints/checkpoint-5/state.json") == "{}"
    assert store.child("checkpoints").list() == ["checkpoint-5/state.json"]
    assert type(child) is type(store)


def test_upload_and_download_file(store_root, tmp_path):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1]))
    src = tmp_path / "src.txt"
    src.write_text(TEXT, encoding="utf-8")
    store.upload_file(src, "in/data.csv")
    assert store.read_text("in/data.csv") == TEXT
    dst = tmp_path / "new" / "folder" / "out.csv"  # parent folders are created
    store.download_file("in/data.csv", dst)
    assert dst.read_text(encoding="utf-8") == TEXT
    assert stray_files(tmp_path) == []


def test_large_file_round_trips_in_parallel_parts(store_root, tmp_path, request):
    root, endpoint = store_root
    store = open_store(root, StorageConfig(endpoint_url=endpoint, multipart_chunk_mb=5, max_concurrency=4))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024 + 123))
    store.upload_file(big, "model/model.safetensors")
    back = tmp_path / "back.bin"
    store.download_file("model/model.safetensors", back)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    if is_s3(root):  # went up as a multipart upload: 5 + 5 + 2 MiB, so the ETag ends in "-3"
        bucket, prefix = root[5:].split("/", 1)
        head = client(endpoint).head_object(Bucket=bucket, Key=f"{prefix}/model/model.safetensors")
        etag = head["ETag"].strip('"')
        if request.node.callspec.params["store_root"] == "s3rver":
            # s3rver gives a multipart object the MD5 of its whole bytes (S3 does not); downloads check that
            assert etag == hashlib.md5(big.read_bytes()).hexdigest(), etag
        else:
            assert etag.endswith("-3"), etag


def test_upload_and_download_dir(store_root, tmp_path):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1], max_concurrency=3))
    src = tmp_path / "adapter"
    files = {"adapter_config.json": json.dumps({"r": 64}), "adapter_model.safetensors": "w" * 5000,
             "tokenizer/tokenizer.json": TEXT, "tokenizer/deep/x.txt": "x"}
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding="utf-8")
    assert store.upload_dir(src, "adapter") == sorted(files)
    assert store.list("adapter") == sorted(files)
    dst = tmp_path / "downloaded"
    assert store.download_dir("adapter", dst) == sorted(files)
    for name, text in files.items():
        assert (dst / name).read_text(encoding="utf-8") == text
    assert stray_files(tmp_path) == []


def test_download_dir_of_nothing_is_missing_object(store_root, tmp_path):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1]))
    with pytest.raises(StorageError, match="nothing found under") as info:
        store.download_dir("checkpoints/checkpoint-9", tmp_path / "d")
    assert f"{store_root[0]}/checkpoints/checkpoint-9" in str(info.value)
    assert info.value.exit_code == EXIT_BAD_INPUT  # missing, in a folder or bucket that exists: retrying cannot help


def test_delete_file_and_prefix(store_root):
    store = open_store(store_root[0], StorageConfig(endpoint_url=store_root[1]))
    for name in ["run/a.txt", "run/sub/b.txt", "run/sub/c/d.txt", "run2/keep.txt", "run.txt"]:
        store.write_text(name, name)
    store.delete("run/a.txt")
    assert store.list() == ["run.txt", "run/sub/b.txt", "run/sub/c/d.txt", "run2/keep.txt"]
    store.delete("run")  # everything under run/, but not the siblings run2/ and run.txt
    assert store.list() == ["run.txt", "run2/keep.txt"]
    store.delete("run")  # missing is not an error
    store.delete("no/such/file.txt")
    store.child("run2").delete("")  # a store can empty itself
    assert store.list() == ["run.txt"]


def test_missing_object_is_storage_error_naming_the_uri(store_root, tmp_path):
    root, endpoint = store_root
    store = open_store(root, StorageConfig(endpoint_url=endpoint))
    store.write_text("present.txt", "here")  # the bucket or folder exists; only the file is missing
    with pytest.raises(StorageError) as info:
        store.read_text("data/train.jsonl")
    assert f"{root}/data/train.jsonl" in str(info.value)
    assert "not found" in str(info.value)
    assert info.value.exit_code == 2


def test_download_of_missing_object_leaves_nothing_behind(store_root, tmp_path):
    root, endpoint = store_root
    store = open_store(root, StorageConfig(endpoint_url=endpoint))
    store.write_text("present.txt", "here")
    dst_dir = tmp_path / "dl"
    dst_dir.mkdir()
    with pytest.raises(StorageError, match="not found") as info:
        store.download_file("absent.csv", dst_dir / "input.csv")
    assert f"{root}/absent.csv" in str(info.value)
    assert list(dst_dir.iterdir()) == []


def test_writes_leave_no_temp_files(store_root, tmp_path):
    root, endpoint = store_root
    store = open_store(root, StorageConfig(endpoint_url=endpoint))
    for i in range(5):
        store.write_text("_stages/format.json", f'{{"n": {i}}}')
    store.upload_file(__file__, "copy/test_storage.py")
    assert store.list() == ["_stages/format.json", "copy/test_storage.py"]
    assert store.read_text("_stages/format.json") == '{"n": 4}'
    if not is_s3(root):
        assert stray_files(Path(root)) == []


# --- local folders -------------------------------------------------------------------------------------

def test_local_failed_write_keeps_old_content(tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "run"))
    store.write_text("report/report.json", "old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes were written, before the rename
    with pytest.raises(StorageError, match="No space left on device") as info:
        store.write_text("report/report.json", "new " * 1000)
    assert str(tmp_path / "run" / "report" / "report.json") in str(info.value)
    monkeypatch.undo()
    assert store.read_text("report/report.json") == "old"
    assert sorted(p.name for p in (tmp_path / "run" / "report").iterdir()) == ["report.json"]


def test_local_list_skips_leftovers_of_interrupted_writes(tmp_path):
    store = open_store(str(tmp_path))
    store.write_text("a/done.txt", "x")
    (tmp_path / "a" / f".done.txt.1234abcd{TEMP_SUFFIX}").write_text("half")  # as a kill -9 leaves it
    (tmp_path / "a" / ".hidden").write_text("a real file")
    assert store.list() == ["a/.hidden", "a/done.txt"]


def test_local_uri_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_store("relative/run").write_text("x.txt", "1")
    assert (tmp_path / "relative" / "run" / "x.txt").read_text() == "1"
    assert open_store(f"file://{tmp_path}/relative/run").read_text("x.txt") == "1"
    assert open_store("relative/run").uri == str(tmp_path / "relative" / "run")


def test_local_missing_source_and_dotdot(tmp_path):
    store = open_store(str(tmp_path / "run"))
    with pytest.raises(StorageError, match="file not found: .*nope.csv"):
        store.upload_file(tmp_path / "nope.csv", "x.csv")
    with pytest.raises(StorageError, match="folder not found"):
        store.upload_dir(tmp_path / "nope", "x")
    with pytest.raises(ValueError, match=r"\.\."):
        store.read_text("../outside.txt")


# --- S3 only ---------------------------------------------------------------------------------------------

def test_s3_missing_bucket_says_so(s3_endpoint, tmp_path):
    store = open_store("s3://no-such-bucket-42/run", StorageConfig(endpoint_url=s3_endpoint, max_attempts=2))
    calls = [lambda: store.read_text("config.yaml"), lambda: store.write_text("config.yaml", "x"),
             lambda: store.download_file("data.csv", tmp_path / "d.csv"), lambda: store.list(),
             lambda: store.exists_dir("data"), lambda: store.upload_file(__file__, "t.py"),
             lambda: store.delete("data"), lambda: store.exists("_stages/format.json")]
    for call in calls:
        with pytest.raises(StorageError) as info:
            call()
        assert "s3://no-such-bucket-42" in str(info.value) and "does not exist" in str(info.value)
    assert not (tmp_path / "d.csv").exists()


def test_s3_access_denied_names_uri_and_hints(moto_server, monkeypatch):
    from moto.core.authorization import enable_iam_authentication

    endpoint, bucket = moto_server, make_bucket(moto_server)  # moto only: s3rver has no IAM
    client(endpoint).put_object(Bucket=bucket, Key="secret/data.csv", Body=b"a,b\n")
    # A user that may list the bucket but not read or write objects. On AWS, ListObjectsV2 needs s3:ListBucket on
    # the bucket's ARN, as here. moto 5.2.6 asks for "s3:ListObjectsV2" (no IAM action) instead and denies the
    # list: it is excluded in pyproject.toml, and constraints.txt pins the version the suite passed with.
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    user = f"reader-{bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="list-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with enable_iam_authentication():  # moto checks IAM policies only while this is on
        store = open_store(f"s3://{bucket}/secret", StorageConfig(endpoint_url=endpoint, max_attempts=2))
        assert store.list() == ["data.csv"]
        for call in (lambda: store.read_text("data.csv"), lambda: store.write_text("new.txt", "x")):
            with pytest.raises(StorageError) as info:
                call()
            message = str(info.value)
            assert message.startswith(f"access denied to s3://{bucket}/secret/")
            assert "check the credentials/role" in message


def test_s3_unreachable_endpoint_gives_up_after_retries(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    store = open_store("s3://bucket/run", StorageConfig(endpoint_url=endpoint, max_attempts=2))
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.read_text("config.yaml")
    assert "s3://bucket/run/config.yaml" in str(info.value)
    assert f"cannot reach endpoint {endpoint}" in str(info.value)
    assert time.monotonic() - started < 30  # two attempts, not ten minutes of backoff


def test_s3_endpoint_from_environment(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = open_store(f"s3://{bucket}/env")  # no endpoint_url: boto3 reads AWS_ENDPOINT_URL
    assert store.client.meta.endpoint_url == endpoint
    store.write_text("hello.txt", TEXT)
    body = client(endpoint).get_object(Bucket=bucket, Key="env/hello.txt")["Body"].read()
    assert body.decode() == TEXT


def test_s3_bucket_root_and_folder_markers(s3_bucket):
    endpoint, bucket = s3_bucket
    store = open_store(f"s3://{bucket}", StorageConfig(endpoint_url=endpoint))
    assert store.uri == f"s3://{bucket}"
    store.write_text("data/train.csv", "x")
    client(endpoint).put_object(Bucket=bucket, Key="data/", Body=b"")  # a console's "folder"
    assert store.list() == ["data/train.csv"]
    assert store.child("data").read_text("train.csv") == "x"


def test_s3_stores_share_one_server_but_not_buckets(s3_endpoint):
    first, second = make_bucket(s3_endpoint), make_bucket(s3_endpoint)
    assert first != second
    open_store(f"s3://{first}", StorageConfig(endpoint_url=s3_endpoint)).write_text("a", "1")
    assert open_store(f"s3://{second}", StorageConfig(endpoint_url=s3_endpoint)).list() == []


def test_conditional_writes_probe_per_implementation(s3_endpoint, request):
    """moto honours If-None-Match / If-Match as S3 does; s3rver ignores them. The probe object is deleted
    either way, and the verdict is cached per endpoint and bucket (no second probe)."""
    bucket = make_bucket(s3_endpoint)
    store = open_store(f"s3://{bucket}/run", StorageConfig(endpoint_url=s3_endpoint))
    problem = store.conditional_writes_problem("_lease.probe-1")
    if request.node.callspec.params["s3_endpoint"] == "s3rver":
        assert problem == "a PutObject with If-None-Match: * overwrote an existing object (S3 answers 412)"
    else:
        assert problem is None
    assert store.list() == []
    requests = []
    again = open_store(f"s3://{bucket}/elsewhere", StorageConfig(endpoint_url=s3_endpoint))
    again.client.meta.events.register("before-call.s3", lambda **kw: requests.append(kw["model"].name))
    assert again.conditional_writes_problem("_lease.probe-2") == problem
    assert requests == []
    again.list()
    assert requests == ["ListObjectsV2"]  # the hook does see this client's requests


# --- verification and URI helpers ------------------------------------------------------------------------

def test_verify_download_catches_truncation_and_corruption(tmp_path):
    from job.storage import _Corrupt

    path = tmp_path / "f"
    path.write_bytes(b"hello world")
    md5 = hashlib.md5(b"hello world").hexdigest()
    verify_download(path, {"ContentLength": 11, "ETag": f'"{md5}"'}, "s3://b/f")
    with pytest.raises(_Corrupt, match="got 11 bytes, expected 12"):
        verify_download(path, {"ContentLength": 12, "ETag": f'"{md5}"'}, "s3://b/f")
    with pytest.raises(_Corrupt, match="does not match ETag"):
        verify_download(path, {"ContentLength": 11, "ETag": '"' + "0" * 32 + '"'}, "s3://b/f")
    # ETags that are not an MD5 of the bytes: multipart, and SSE-KMS: size only
    verify_download(path, {"ContentLength": 11, "ETag": '"' + "0" * 32 + '-3"'}, "s3://b/f")
    verify_download(path, {"ContentLength": 11, "ETag": '"' + "0" * 32 + '"', "ServerSideEncryption": "aws:kms"},
                    "s3://b/f")


def test_s3_corrupt_transfer_is_retried_then_reported(moto_server):
    from job.storage import _Corrupt

    store = open_store("s3://any/run", StorageConfig(endpoint_url=moto_server, max_attempts=2))
    attempts = []

    def flaky():  # a body that arrives truncated once, then whole
        attempts.append(1)
        if len(attempts) == 1:
            raise _Corrupt("s3://any/run/x: got 3 bytes, expected 4")
        return b"data"

    assert store._retry_transfer("x", flaky) == b"data" and len(attempts) == 2

    def always_bad():
        raise _Corrupt("s3://any/run/x: got 3 bytes, expected 4")

    with pytest.raises(StorageError, match="s3://any/run/x kept failing after 2 attempts"):
        store._retry_transfer("x", always_bad)


def test_split_uri():
    assert split_uri("s3://b/data/train.csv") == ("s3://b/data", "train.csv")
    assert split_uri("s3://b/train.csv") == ("s3://b", "train.csv")
    assert split_uri("/data/train.csv") == ("/data", "train.csv")
    assert split_uri("train.csv") == (".", "train.csv")
    assert split_uri("/train.csv") == ("/", "train.csv")
    assert split_uri("file:///d/x.csv") == ("/d", "x.csv")
    for bad in ("s3://bucket", "s3://bucket/", "s3://", "s3:///x.csv", ""):
        with pytest.raises(InputError):
            split_uri(bad)


def test_split_uri_feeds_open_store(store_root, tmp_path):
    root, endpoint = store_root
    open_store(root, StorageConfig(endpoint_url=endpoint)).write_text("inputs/train.csv", "a,b\n")
    parent, name = split_uri(f"{root}/inputs/train.csv")
    open_store(parent, StorageConfig(endpoint_url=endpoint)).download_file(name, tmp_path / "train.csv")
    assert (tmp_path / "train.csv").read_text() == "a,b\n"


def test_redact_uri_and_is_s3():
    assert redact_uri("https://user:hunter22@minio.local:9000/x") == "https://***@minio.local:9000/x"
    assert redact_uri("http://token@host") == "http://***@host"
    assert redact_uri("s3://bucket/a@b/c") == "s3://bucket/a@b/c"  # '@' in a key is not a credential
    assert redact_uri("/local/path") == "/local/path"
    assert is_s3("s3://b") and not is_s3("/tmp/s3://x") and not is_s3("file:///x")


def test_invalid_s3_uri_is_config_error():
    with pytest.raises(InputError, match="not a valid S3 URI"):
        open_store("s3:///prefix")
