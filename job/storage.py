"""One small interface over local folders and s3:// (boto3 directly), so every stage is storage-agnostic.

Paths given to a store (`rel`) are '/'-separated and relative to its root; '' is the root. Writes are
atomic: a local write goes to a hidden temp file that is renamed into place, an S3 write is one
PutObject. Downloads are verified before they are renamed into place. Every failure becomes a
`StorageError` (exit code 3) whose message names the URI and says what to check, but for a missing
file or object in a folder or bucket that exists: `MissingObject` (exit code 2, retrying cannot help).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, TypeVar

import boto3
import botocore.client
import botocore.config
import botocore.exceptions
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.retries import standard as botocore_retries

from job.config import StorageConfig
from job.errors import InputError, MissingObject, StorageError

# Temp files of interrupted local writes end like this; `list` skips them, as S3 hides unfinished uploads.
TEMP_SUFFIX = ".incomplete"
MIB = 1024 * 1024
T = TypeVar("T")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def redact_uri(uri: str) -> str:
    """Hide credentials embedded in a URL: https://user:pass@host -> https://***@host."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", uri)


def split_uri(uri: str) -> tuple[str, str]:
    """(parent URI, file name), so that `open_store(parent).download_file(name, dst)` fetches `uri`."""
    if is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        parent, _, name = key.rstrip("/").rpartition("/")
        if bucket and name:
            return "s3://" + _join(bucket, parent), name
    else:
        parent, sep, name = uri.removeprefix("file://").rstrip("/").rpartition("/")
        if name:
            return parent or sep or ".", name  # "/x.csv" -> "/", "x.csv" -> "."
    raise InputError(f"{redact_uri(uri)}: not a file URI (expected s3://bucket/path/file or a file path)")


def _clean(rel: str) -> str:
    """Normalise a relative path; '..' is refused so a store never reaches outside its root."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"relative store path may not contain '..': {rel!r}")
    return "/".join(parts)


def _join(prefix: str, rel: str) -> str:
    return "/".join(p for p in (prefix, _clean(rel)) if p)


class Store(ABC):
    """A root (folder or bucket prefix) holding files addressed by '/'-separated relative paths."""

    uri: str

    def __init__(self, max_concurrency: int) -> None:
        self.max_concurrency = max_concurrency

    def uri_of(self, rel: str) -> str:
        return _join(self.uri, rel)

    @abstractmethod
    def child(self, rel: str) -> Store: ...
    @abstractmethod
    def exists(self, rel: str) -> bool: ...
    @abstractmethod
    def exists_dir(self, rel: str) -> bool: ...
    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...
    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None: ...
    @abstractmethod
    def upload_file(self, local_path: str | Path, rel: str) -> None: ...
    @abstractmethod
    def download_file(self, rel: str, local_path: str | Path) -> None: ...
    @abstractmethod
    def list(self, rel: str = "") -> list[str]: ...
    @abstractmethod
    def delete(self, rel: str) -> None: ...

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def upload_dir(self, local_dir: str | Path, rel: str) -> list[str]:
        return self._each_file(local_dir, rel, self.upload_file)

    def move_file(self, local_path: str | Path, rel: str) -> None:
        """upload_file, then the local file is gone (LocalStore renames it: no second copy on the disk)."""
        self.upload_file(local_path, rel)
        Path(local_path).unlink()

    def move_dir(self, local_dir: str | Path, rel: str) -> list[str]:
        """upload_dir, leaving no local copy: for outputs nothing on this machine reads again (export's GGUF
        files), and for a run on this machine's disk, where a copy would double the disk a 70B needs."""
        names = self._each_file(local_dir, rel, self.move_file)
        shutil.rmtree(local_dir, ignore_errors=True)
        return names

    def _each_file(self, local_dir: str | Path, rel: str, send: Callable[[Path, str], None]) -> list[str]:
        """send(file, its name under rel) for every file under local_dir, in parallel; the names, sorted."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"folder not found: {local_dir}")
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        self._parallel(lambda name: send(local_dir / name, _join(rel, name)), names)
        return names

    def local_folder(self, rel: str) -> Path | None:
        """The folder `rel` as a path on this machine when the store is a local folder, else None."""
        return None

    def download_dir(self, rel: str, local_dir: str | Path) -> list[str]:
        names = self.list(rel)
        if not names:
            raise MissingObject(f"nothing found under {redact_uri(self.uri_of(rel))}/: check the path")
        self._parallel(lambda name: self.download_file(_join(rel, name), Path(local_dir) / name), names)
        return names

    def _parallel(self, fn: Callable[[str], None], names: list[str]) -> None:
        # Many small files (tokenizer, shards, checkpoint parts) are latency-bound: overlap them.
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            list(pool.map(fn, names))  # list(): re-raises the first failure


def _replace_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temp file next to `final`, fsync it and rename it over `final`.

    Readers see the old file or the new one, never half of one; a crash leaves only a hidden temp file.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        fill(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _check_size(path: Path, expected: int, uri: str) -> None:
    if path.stat().st_size != expected:
        raise _Corrupt(f"{uri}: got {path.stat().st_size} bytes, expected {expected}")


class _Corrupt(Exception):
    """A transfer finished but its bytes do not match the source (truncated or altered on the way)."""


@contextmanager
def local_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise MissingObject(f"file not found: {uri}") from None
    except PermissionError:
        raise StorageError(f"permission denied: {uri}: check the owner and mode of the folder") from None
    except _Corrupt as exc:
        raise StorageError(f"copy failed verification: {exc}") from None
    except OSError as exc:  # disk full, a file where a folder should be, ...
        raise StorageError(f"cannot access {uri}: {exc.strerror or exc}") from None


# A full disk (or quota) while downloading: every download goes into the cache (JOB_CACHE_DIR).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def download_space(local_path: str | Path, uri: str) -> Iterator[None]:
    """Turn a full disk under a download into exit 3 that names the folder and how to move the cache.
    Retrying cannot free the space; the unfinished temp file is already gone (_replace_atomically)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise StorageError(f"no space left in {Path(local_path).parent} while downloading {redact_uri(uri)} "
                           f"({os.strerror(exc.errno)}): downloads go to the cache folder; free space there, or point "
                           "JOB_CACHE_DIR (or model.cache_dir) at a folder on a larger disk") from None


class LocalStore(Store):
    def __init__(self, root: str | Path, max_concurrency: int = 8) -> None:
        super().__init__(max_concurrency)
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, rel: str) -> Path:
        rel = _clean(rel)
        return self.root / rel if rel else self.root

    def child(self, rel: str) -> LocalStore:
        return LocalStore(self._path(rel), self.max_concurrency)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def exists_dir(self, rel: str) -> bool:
        return bool(self.list(rel))  # like S3: a folder exists when a file is under it

    def read_bytes(self, rel: str) -> bytes:
        with local_errors(self.uri_of(rel)):
            return self._path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with local_errors(self.uri_of(rel)):
            _replace_atomically(self._path(rel), lambda tmp: tmp.write_bytes(data))

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        with local_errors(str(local_path)):
            size = Path(local_path).stat().st_size
        with local_errors(self.uri_of(rel)):
            _replace_atomically(self._path(rel), lambda tmp: self._copy(Path(local_path), tmp, size))

    def move_file(self, local_path: str | Path, rel: str) -> None:
        dst = self._path(rel)
        with local_errors(self.uri_of(rel)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(local_path, dst)  # atomic, and the disk holds one copy
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        super().move_file(local_path, rel)  # another filesystem: copy, then remove

    def local_folder(self, rel: str) -> Path | None:
        return self._path(rel)

    def download_file(self, rel: str, local_path: str | Path) -> None:
        src = self._path(rel)
        with local_errors(self.uri_of(rel)):
            size = src.stat().st_size
        with local_errors(str(local_path)), download_space(local_path, self.uri_of(rel)):
            _replace_atomically(Path(local_path), lambda tmp: self._copy(src, tmp, size))

    @staticmethod
    def _copy(src: Path, dst: Path, size: int) -> None:
        shutil.copyfile(src, dst)
        _check_size(dst, size, str(src))

    def list(self, rel: str = "") -> list[str]:
        base = self._path(rel)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                      if p.is_file() and not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)))

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        with local_errors(self.uri_of(rel)):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


ACCESS_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem"}


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, client: botocore.client.BaseClient, transfer: TransferConfig,
                 max_attempts: int, max_concurrency: int) -> None:
        super().__init__(max_concurrency)
        self.bucket, self.prefix, self.client = bucket, _clean(prefix), client
        self.transfer, self.max_attempts = transfer, max_attempts
        self.uri = f"s3://{_join(bucket, self.prefix)}"

    def _key(self, rel: str) -> str:
        return _join(self.prefix, rel)

    def _dir_prefix(self, rel: str) -> str:
        key = self._key(rel)
        return key + "/" if key else ""

    def child(self, rel: str) -> S3Store:
        return S3Store(self.bucket, self._key(rel), self.client, self.transfer, self.max_attempts,
                       self.max_concurrency)

    @contextmanager
    def _errors(self, rel: str) -> Iterator[None]:
        """Turn boto3's exceptions into a StorageError that names the URI and says what to check."""
        uri = redact_uri(self.uri_of(rel))
        try:
            yield
        except S3UploadFailedError as exc:  # boto3 wraps the real ClientError of an upload in this
            cause = exc.__context__
            raise self._client_error(cause, uri) if isinstance(cause, botocore.exceptions.ClientError) \
                else StorageError(f"upload to {uri} failed: {exc}") from None
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(exc, uri) from None
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
            endpoint = redact_uri(self.client.meta.endpoint_url)
            raise StorageError(f"cannot reach endpoint {endpoint} for {uri}: {exc}: check storage.endpoint_url"
                               " / AWS_ENDPOINT_URL and the network (gave up after retries)") from None
        except botocore.exceptions.NoCredentialsError:
            raise StorageError(f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or attach a role") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(f"S3 request for {uri} failed: {exc}") from None

    def _client_error(self, exc: botocore.exceptions.ClientError, uri: str) -> StorageError:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", "")
        if code == "NoSuchBucket":
            return StorageError(f"bucket does not exist: s3://{self.bucket} (NoSuchBucket) while accessing {uri}: "
                                "check the bucket name, the region and the endpoint")
        if code in ("NoSuchKey", "404", "NotFound"):
            return MissingObject(f"object not found: {uri}")
        if code in ACCESS_CODES:
            return StorageError(f"access denied to {uri}: check the credentials/role and the bucket policy "
                                f"({code}{': ' + message if message else ''})")
        return StorageError(f"S3 request for {uri} failed after retries: {code}: {message}")

    def _head_or_none(self, rel: str) -> dict | None:
        """The object's metadata, or None when it is missing; a missing bucket raises NoSuchBucket."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NotFound"):
                raise
        # HEAD has no body, so a missing bucket is a bare 404 too; a list call names it (NoSuchBucket).
        self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        return None

    def exists(self, rel: str) -> bool:
        with self._errors(rel):
            return self._head_or_none(rel) is not None

    def exists_dir(self, rel: str) -> bool:
        with self._errors(rel):
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._dir_prefix(rel), MaxKeys=1)
        return page.get("KeyCount", 0) > 0

    def read_bytes(self, rel: str) -> bytes:
        # botocore checks the body against Content-Length, and retries cover the request itself;
        # a body cut off while streaming is retried here.
        def read() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        with self._errors(rel):
            return self._retry_transfer(rel, read)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._errors(rel):
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        if not Path(local_path).is_file():
            raise StorageError(f"file not found: {local_path}")
        with self._errors(rel):  # multipart above the threshold, parts in parallel
            self.client.upload_file(str(local_path), self.bucket, self._key(rel), Config=self.transfer)

    def download_file(self, rel: str, local_path: str | Path) -> None:
        with self._errors(rel):
            head = self._head_or_none(rel)
            if head is None:
                raise MissingObject(f"object not found: {redact_uri(self.uri_of(rel))}")

            def fetch() -> None:
                _replace_atomically(Path(local_path), lambda tmp: self._fetch_verified(rel, tmp, head))
            with download_space(local_path, self.uri_of(rel)):
                self._retry_transfer(rel, fetch)

    def _fetch_verified(self, rel: str, tmp: Path, head: dict) -> None:
        self.client.download_file(self.bucket, self._key(rel), str(tmp), Config=self.transfer)
        verify_download(tmp, head, self.uri_of(rel), *self._part_sizes(rel, head))

    def _part_sizes(self, rel: str, head: dict) -> tuple[list[int], bool]:
        """Part sizes to check a multipart ETag ("<MD5 of the parts' MD5s>-<parts>") with, and whether
        the server told it (else they are guesses).

        S3 (and MinIO) answer HEAD ?partNumber=1 with the first part's length; boto3, the AWS CLI,
        rclone and mc upload in equal parts but the last, so that gives every boundary. A server that
        ignores partNumber (moto) answers with the whole object: then the part size this store uploads
        with and boto3's default (8 MiB) are tried.
        """
        match = re.fullmatch(r'"?[0-9a-f]{32}-(\d+)"?', head.get("ETag", ""))
        if not match:
            return [], False
        first = self.client.head_object(Bucket=self.bucket, Key=self._key(rel), PartNumber=1)
        if first.get("PartsCount") == int(match.group(1)) and first["ContentLength"] < head["ContentLength"]:
            return [first["ContentLength"]], True
        # s3transfer never uses parts under 5 MiB
        return [max(self.transfer.multipart_chunksize, 5 * MIB), 8 * MIB], False

    def _retry_transfer(self, rel: str, fn: Callable[[], T]) -> T:
        """Retry what botocore's retries do not cover: a body that arrived truncated or corrupted."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except (_Corrupt, RetriesExceededError, botocore.exceptions.IncompleteReadError,
                    botocore.exceptions.ResponseStreamingError) as exc:
                if attempt == self.max_attempts:
                    raise StorageError(f"download of {redact_uri(self.uri_of(rel))} kept failing after "
                                       f"{attempt} attempts: {exc}") from None
                time.sleep(min(20.0, 0.5 * 2 ** attempt))

    def list(self, rel: str = "") -> list[str]:
        prefix = self._dir_prefix(rel)
        names = []
        with self._errors(rel):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                # Keys ending in '/' are "folder" markers some consoles create, not files.
                names += [o["Key"][len(prefix):] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(names)

    def delete(self, rel: str) -> None:
        prefix = self._dir_prefix(rel)
        with self._errors(rel):
            keys = [self._key(rel)] if _clean(rel) else []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", [])]
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if answer.get("Errors"):  # per-key failures come back in the body, not as an exception
                    first = answer["Errors"][0]
                    raise StorageError(f"cannot delete s3://{self.bucket}/{first['Key']}: {first.get('Code')}: "
                                       f"{first.get('Message', '')} ({len(answer['Errors'])} keys failed)")

    # -- conditional writes (the lease relies on them) ---------------------------------------------

    @property
    def endpoint(self) -> str:
        return redact_uri(self.client.meta.endpoint_url)

    def conditional_writes_problem(self, probe_rel: str) -> str | None:
        """None when this endpoint and bucket honour If-None-Match and If-Match on PutObject; else what
        the store did wrong. The verdict is cached for the process, per endpoint and bucket.

        AWS S3 (since 2024) and moto answer a failed condition with 412; some S3-compatible servers
        (s3rver, older releases of others) ignore the headers and overwrite, which would let two jobs
        both "win" a lease."""
        key = (self.client.meta.endpoint_url, self.bucket)
        with _VERDICTS_LOCK:
            if key not in _CONDITIONAL_VERDICTS:
                _CONDITIONAL_VERDICTS[key] = self._probe_conditional_writes(probe_rel)
            return _CONDITIONAL_VERDICTS[key]

    def _probe_conditional_writes(self, rel: str) -> str | None:
        """Write a fresh probe object with If-None-Match: *, then try three more conditional writes on it
        (two that must fail, one that must succeed), then delete it.

        Every PUT sends the same bytes, so the ETag never changes: a request that a retry repeats after
        its first attempt landed gets the same answer (a retried create then fails its condition, which
        only a store that checks conditions can do, so that is accepted)."""
        body, key = b"probe of conditional writes; deleted at once\n", self._key(rel)
        wrong = '"' + "0" * 32 + '"'

        def put(**condition) -> str | None:
            """The code of a failed condition (412/409), None on success; other errors as problems."""
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)
                return None
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "?")
                if code in CONDITION_FAILED_CODES:
                    return code
                if code in CONDITIONS_UNSUPPORTED_CODES:
                    raise _Unsupported(f"it rejects {next(iter(condition))} with {code}") from None
                raise

        written = False
        with self._errors(rel):
            try:
                put(IfNoneMatch="*")
                written = True
                etag = self.client.head_object(Bucket=self.bucket, Key=key)["ETag"]
                if put(IfNoneMatch="*") is None:
                    return "a PutObject with If-None-Match: * overwrote an existing object (S3 answers 412)"
                if put(IfMatch=wrong) is None:
                    return "a PutObject with If-Match: <another ETag> overwrote the object (S3 answers 412)"
                if put(IfMatch=etag) is not None:
                    return "a PutObject with If-Match: <the object's own ETag> was refused"
                return None
            except _Unsupported as exc:
                return str(exc)
            finally:
                if written:  # else nothing was stored (and a dead endpoint is not waited for twice)
                    self.client.delete_object(Bucket=self.bucket, Key=key)


# A condition that does not hold: 412 Precondition Failed, or 409 when a concurrent conditional write won.
CONDITION_FAILED_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# Answers of a store that does not implement the conditional headers at all.
CONDITIONS_UNSUPPORTED_CODES = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest", "400"}
# Verdicts of conditional_writes_problem per (endpoint, bucket): one probe per process and bucket, since
# every Lease (and every test) would otherwise probe again. Guarded: leases may be taken from threads.
_CONDITIONAL_VERDICTS: dict[tuple[str, str], str | None] = {}
_VERDICTS_LOCK = threading.Lock()


class _Unsupported(Exception):
    """The store rejected a conditional header as unknown (instead of evaluating it)."""


def verify_download(path: Path, head: dict, uri: str, part_sizes: list[int] = (), exact: bool = False) -> None:
    """Size against HeadObject, and MD5 where the ETag is made of MD5s of the bytes.

    Without SSE-KMS/SSE-C, a single-part object's ETag is the MD5 of its bytes, and a multipart
    object's is "<MD5 of the parts' binary MD5s>-<number of parts>", checkable with the part size.
    `part_sizes`: candidates; `exact`: the server gave it, so a mismatch is corruption (with guessed
    sizes, a mismatch may be another uploader's part size: then only the size is checked).
    """
    size = head["ContentLength"]
    _check_size(path, size, uri)
    etag = head.get("ETag", "").strip('"')
    encrypted = head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm")
    if encrypted:
        return
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        md5 = _md5_of(path, 0, size).hexdigest()
        if md5 != etag:
            raise _Corrupt(f"{uri}: MD5 {md5} does not match ETag {etag}")
    elif re.fullmatch(r"[0-9a-f]{32}-\d+", etag):
        parts = int(etag.rsplit("-", 1)[1])
        for part_size in [p for p in part_sizes if p > 0 and math.ceil(size / p) == parts]:
            md5 = hashlib.md5(b"".join(_md5_of(path, start, part_size).digest()
                                       for start in range(0, size, part_size)), usedforsecurity=False)
            if f"{md5.hexdigest()}-{parts}" == etag:
                return
            if exact:
                raise _Corrupt(f"{uri}: MD5 of the {parts} parts {md5.hexdigest()} does not match ETag {etag}")


def _md5_of(path: Path, start: int, length: int):
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0:
            block = f.read(min(MIB, length))
            if not block:
                break
            digest.update(block)
            length -= len(block)
    return digest


# Retries. botocore's "standard" mode waits rand * min(2**i, 20) s after a throttling error (503
# SlowDown) and rand * min(0.05 * 2**i, 20) s after other errors (5xx, resets, refused connections),
# and stops retrying altogether once a client's retry quota (500 units, 5 per throttled retry, 14 per
# other) is spent. For a batch job that is both too slow to give up (10 attempts against an endpoint
# that answers 503 to everything: about a minute per request, measured 77 s for `job run`) and too
# quick to give up (the quota: after a burst of faults, every later transient error fails the job; a
# 10-attempt burst of resets is over in under 2 s). So: the same schedule for every retryable error,
# rand * min(0.5 * 2**i, 8) s: at most 47.5 s over 10 attempts (about 24 s on average), and no quota.
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 8.0


class _Backoff(botocore_retries.BaseRetryBackoff):
    def __init__(self) -> None:
        # Its own generator: retries on the upload thread must not advance the global `random`, whose
        # state training saves in every checkpoint (rng_state.pth).
        self.random = random.Random()

    def delay_amount(self, context) -> float:
        return self.random.random() * min(RETRY_BASE_SECONDS * 2 ** (context.attempt_number - 1), RETRY_MAX_SECONDS)


class _NoQuota:
    def acquire_retry_quota(self, context) -> bool:
        return True


def _use_job_retries(client: botocore.client.BaseClient, max_attempts: int) -> None:
    """Replace the client's standard-mode retry handler by the same one with `_Backoff` and no quota."""
    service = client.meta.service_model.service_id.hyphenize()
    adapter = botocore_retries.RetryEventAdapter()
    handler = botocore_retries.RetryHandler(
        retry_policy=botocore_retries.RetryPolicy(
            retry_checker=botocore_retries.StandardRetryConditions(max_attempts=max_attempts),
            retry_backoff=_Backoff()),
        retry_event_adapter=adapter, retry_quota=_NoQuota(), service_name=service)
    unique_id = f"retry-config-{service}"  # botocore's own handler is registered under this id
    client.meta.events.unregister(f"needs-retry.{service}", unique_id=unique_id)
    client.meta.events.register(f"needs-retry.{service}", handler.needs_retry, unique_id=unique_id)


def open_store(uri: str, settings: Optional[StorageConfig] = None) -> Store:
    """A store rooted at `uri`: a local folder (path or file://...) or s3://bucket/prefix, with the
    config's storage section (endpoint, retries, concurrency, part size; defaults when None).

    Credentials come from boto3's usual chain (environment, profile, IRSA, instance role) unless the
    settings hold them (storage.access_key_id etc., for S3-compatible stores without roles)."""
    s = settings if settings is not None else StorageConfig()
    endpoint_url, max_attempts, max_concurrency = s.endpoint_url or None, s.max_attempts, s.max_concurrency
    if not is_s3(uri):
        return LocalStore(uri.removeprefix("file://"), max_concurrency)
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise InputError(f"{redact_uri(uri)}: not a valid S3 URI (expected s3://bucket/prefix)")
    config = botocore.config.Config(
        retries={"total_max_attempts": max_attempts, "mode": "standard"},  # see _use_job_retries
        connect_timeout=10, read_timeout=120,
        max_pool_connections=max(10, max_concurrency * max_concurrency),  # files x parts in flight
        # MinIO, moto, Ceph: buckets are not DNS names there. Without an explicit endpoint, botocore's
        # "auto" already picks path style for a custom AWS_ENDPOINT_URL and virtual hosts on AWS.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    # A session per store: boto3's default session is a shared global and not thread-safe.
    session = boto3.session.Session(aws_access_key_id=s.access_key_id or None,
                                    aws_secret_access_key=s.secret_access_key or None,
                                    aws_session_token=s.session_token or None)
    client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
    _use_job_retries(client, max_attempts)
    chunk = s.multipart_chunk_mb * MIB
    transfer = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                              max_concurrency=max_concurrency, use_threads=True)
    return S3Store(bucket, prefix, client, transfer, max_attempts, max_concurrency)
