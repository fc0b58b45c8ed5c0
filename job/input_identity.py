"""What a stage's outside input is, cheaply: so a changed CSV at the same data.uri makes format stale.

A local file up to HASH_LIMIT is identified by its SHA-256 (a copy or a `touch` changes nothing), a
larger one by size and mtime; an S3 object by one HEAD request: ETag and size. Not its VersionId: a
versioned bucket gives every upload a new one, even of the same bytes, and the same bytes must not make
format stale (the ETag changes with the content). None when it cannot be known (the file is missing, the
endpoint is down): the pipeline then keeps what the stage's marker recorded, and a stage that has to run
fails on its input with the real error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from job.config import StorageConfig
from job.storage import is_s3, open_store, split_uri

HASH_LIMIT = 256 * 1024 * 1024  # hashing 256 MiB takes about a second; SNLI's train split is 60 MB


def file_identity(uri: str, storage: StorageConfig) -> Optional[dict]:
    try:
        if is_s3(uri):
            parent, name = split_uri(uri)
            store = open_store(parent, storage)
            head = store.client.head_object(Bucket=store.bucket, Key=store._key(name))
            return {"etag": head.get("ETag", "").strip('"'), "size": head.get("ContentLength")}
        if "://" in uri.removeprefix("file://"):  # hf://, ... : another module knows its identity
            return None
        path = Path(uri.removeprefix("file://")).expanduser()
        stat = path.stat()
        if stat.st_size <= HASH_LIMIT:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            return {"sha256": digest.hexdigest(), "size": stat.st_size}
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except Exception:  # noqa: BLE001 - unknown identity is an answer; the stage reports the real error
        return None


def describe(identity: Optional[dict]) -> str:
    if not identity:
        return "unknown"
    return ", ".join(f"{k} {str(v)[:12] if k in ('sha256', 'etag') else v}" for k, v in identity.items())
