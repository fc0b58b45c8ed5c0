"""One writer per run: a lease object at `<run_uri>/_lease.json` that a job holds while it writes.

Kubernetes can run a Job's pod twice (a node that lost contact still runs the old pod), and a person
can start the same command twice. Two jobs writing one run_uri would mix checkpoints and markers, so
`job run` (and `job format|train|merge|evaluate`) takes this lease before it writes anything, renews
it while it runs and deletes it when it ends (done, failed, or SIGTERM -> exit 75). Commands that
only read (`job plan`, `job config`, `job predict`) take none.

Every change to the lease is conditional, so that of two jobs racing for it exactly one wins:

- create:  S3 `PutObject If-None-Match: *` (412 when the key exists); locally `O_CREAT | O_EXCL`.
- renew, take over, release: "only if it is still the version I read". S3: `PutObject`/`DeleteObject`
  with `If-Match: <ETag>` (412 when someone else wrote it since). Locally there is no compare-and-swap
  on a file, so a writer first creates a claim file named after the version it read, with O_EXCL: of
  all the jobs that want to replace that version, only one can hold its claim; it checks that the
  lease still is that version, replaces it (temp file + rename) and removes the claim. A job that
  claims the same version later finds the lease changed and backs off.

A job that finds a lease held by someone else:
- the holder is alive (the lease changes while we watch it: it was renewed): exit 4 (`RunLocked`),
  naming the holder. Watching takes at most a third of the holder's lease time (40 s by default).
- the holder is dead: the lease is taken over, and the log says who held it and since when. "Dead"
  means its lease expired (not renewed for `storage.lease_seconds`, judged by the storage's clock: S3's
  Last-Modified against the Date of the same response, or the file's mtime, so clocks of different
  machines never matter), or, on the same machine, its process is gone (a kill -9 then a rerun does
  not wait). So a pod restarted after an OOM kill waits at most `lease_seconds` after the old pod's
  last renewal, and never fails because of its own dead predecessor.

The holder renews every third of the lease time on a background thread. If a renewal finds the lease
taken by another job (or deleted), or storage kept failing for two thirds of the lease time (so that
another job may soon take over legitimately), the lease is lost: every later write through the run's
store raises (`LeasedStore`), training is asked to stop after its current step (the stop flag SIGTERM
uses), and the job exits 4 (taken) or 3 (storage failed). There are no fencing tokens: a single file
upload that started before the loss may still finish.

Some S3-compatible servers ignore If-None-Match / If-Match. Before its first lease on a bucket, a process
probes the store (`S3Store.conditional_writes_problem`: a throwaway `_lease.probe-<hex>` object written
with conditions that must fail, then deleted); a store that ignores them is refused with exit 2, naming
the endpoint, the bucket and `storage.lease`. `storage.lease: false` runs without any lease (`NoLease`):
one writer by convention, with a warning at start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import cached_property
from pathlib import Path
from typing import Optional

import botocore.exceptions

import job
from job.clock import utc_timestamp
from job.errors import ConfigError, JobError, Preempted, RunLocked, StorageError
from job.layout import LEASE, LEASE_PROBE
from job.run_files import LeaseBody, lenient
from job.storage import TEMP_SUFFIX, LocalStore, S3Store, Store, local_errors, redact_uri

log = logging.getLogger("job.lease")

# The holder counts its lease as valid for this share of lease_seconds after its last successful write,
# while others wait all of lease_seconds: the gap is the holder's margin to notice and stop writing.
HOLDER_SHARE = 2 / 3
# S3's answers when a condition does not hold: 412, 409 (a concurrent conditional write won), 404 (If-Match
# on a key that is gone).
CONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404", "NotFound"}


@dataclass
class Seen:
    """The lease as read from storage."""

    raw: bytes
    version: str
    """Changes with every write: the ETag on S3, a hash of the bytes locally."""
    age: float
    """Seconds since it was last written, by the storage's own clock."""
    now: float
    """The storage's clock (epoch seconds) when it was read: for telling when the lease expires."""
    default_expiry: float

    @cached_property
    def body(self) -> dict:
        """The lease's fields; one of the wrong type or out of bounds (job/run_files.py LeaseBody) counts as
        absent, so a damaged lease is an unknown holder whose lease expires, never one that lasts for ever."""
        try:
            body = json.loads(self.raw)
        except ValueError:  # being written (a local O_EXCL create is not atomic with its content), or damaged
            return {}
        return lenient(body, LeaseBody)

    @property
    def token(self) -> Optional[str]:
        return self.body.get("token")

    @property
    def expiry(self) -> float:
        value = self.body.get("expiry_seconds")
        return float(value) if isinstance(value, (int, float)) and value > 0 else self.default_expiry

    @property
    def stale(self) -> bool:
        return self.age >= self.expiry

    @property
    def holder(self) -> str:
        b = self.body
        if not b.get("host"):
            return "an unknown job (the lease file is empty or unreadable)"
        where = f" on {b['platform']}" if b.get("platform") else ""
        return f"{b['host']} pid {b.get('pid', '?')}{where} (since {b.get('acquired_at', '?')})"

    def expires(self) -> str:
        return utc_timestamp(self.now + self.expiry - self.age)


# -- where the lease lives ---------------------------------------------------------------------------


class _Backend(ABC):
    uri: str

    @abstractmethod
    def read(self, default_expiry: float) -> Optional[Seen]:
        """The lease, or None when there is none."""

    @abstractmethod
    def create(self, data: bytes) -> Optional[str]:
        """Write the lease if there is none: its new version, or None when one exists."""

    @abstractmethod
    def replace(self, seen: Seen, data: bytes) -> Optional[str]:
        """Overwrite the lease if it is still `seen`: its new version, or None when it changed."""

    @abstractmethod
    def delete(self, seen: Seen) -> bool:
        """Delete the lease if it is still `seen`."""

    def check_conditions(self) -> None:
        """Raise ConfigError (exit 2) when the store cannot do the conditional writes the lease needs."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


class _LocalBackend(_Backend):
    # A claim is held for the milliseconds between checking and replacing the lease. One older than
    # this belongs to a process that was killed inside that window: it is removed, so the lease does
    # not stay blocked. (Two jobs both finding the same abandoned claim in the same instant could
    # both go on; that needs a kill -9 inside a window of milliseconds first.)
    ABANDONED_CLAIM_SECONDS = 30.0

    def __init__(self, store: LocalStore):
        self.store = store
        self.path = store.root / LEASE
        self.uri = str(self.path)

    def read(self, default_expiry: float) -> Optional[Seen]:
        with local_errors(self.uri):
            try:
                with open(self.path, "rb") as f:  # fstat and read the same file, even if renamed over now
                    mtime, raw = os.fstat(f.fileno()).st_mtime, f.read()
            except FileNotFoundError:
                return None
        now = time.time()
        return Seen(raw, _digest(raw), max(0.0, now - mtime), now, default_expiry)

    def create(self, data: bytes) -> Optional[str]:
        with local_errors(self.uri):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return _digest(data)

    @contextmanager
    def _claim(self, seen: Seen) -> Iterator[bool]:
        claim = self.path.with_name(f".{LEASE}.claim-{seen.version}{TEMP_SUFFIX}")  # hidden from Store.list
        with local_errors(self.uri):
            try:
                os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                try:
                    if time.time() - claim.stat().st_mtime > self.ABANDONED_CLAIM_SECONDS:
                        claim.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                yield False  # someone else is replacing this version right now: look again
                return
            try:
                current = self.read(seen.default_expiry)
                yield current is not None and current.version == seen.version
            finally:
                claim.unlink(missing_ok=True)

    def replace(self, seen: Seen, data: bytes) -> Optional[str]:
        with self._claim(seen) as ours:
            if not ours:
                return None
            self.store.write_bytes(LEASE, data)  # temp file + fsync + rename: readers see old or new
            return _digest(data)

    def delete(self, seen: Seen) -> bool:
        with self._claim(seen) as ours:
            if ours:
                with local_errors(self.uri):
                    self.path.unlink(missing_ok=True)
            return ours


class _S3Backend(_Backend):
    def __init__(self, store: S3Store):
        self.store, self.client, self.bucket = store, store.client, store.bucket
        self.key = "/".join(p for p in (store.prefix, LEASE) if p)
        self.uri = redact_uri(store.uri_of(LEASE))

    @contextmanager
    def _errors(self) -> Iterator[None]:
        with self.store._errors(LEASE):  # the store's messages: missing bucket, access denied, endpoint
            yield

    @staticmethod
    def _condition_failed(exc: botocore.exceptions.ClientError) -> bool:
        return exc.response.get("Error", {}).get("Code") in CONDITION_FAILED

    def read(self, default_expiry: float) -> Optional[Seen]:
        def fetch():
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return answer, answer["Body"].read()

        with self._errors():
            try:  # a body cut short while streaming is fetched again, as for every other read of the store
                answer, raw = self.store._retry_transfer(LEASE, fetch)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
        # Age by the server's clock alone (Last-Modified vs the Date of this response), so that the
        # clocks of the machines running jobs never matter. Both have one-second resolution.
        date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        age = max(0.0, now - answer["LastModified"].timestamp())
        return Seen(raw, answer["ETag"], age, now, default_expiry)

    def _put(self, data: bytes, **condition) -> Optional[str]:
        with self._errors():
            try:
                answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                                ContentType="application/json", **condition)
            except botocore.exceptions.ClientError as exc:
                if self._condition_failed(exc):
                    return None
                raise
        return answer["ETag"]

    def check_conditions(self) -> None:
        # Some S3-compatible servers ignore If-None-Match / If-Match and overwrite: two jobs would then both
        # hold the lease. Probe once per process and bucket before trusting them.
        problem = self.store.conditional_writes_problem(f"{LEASE_PROBE}{uuid.uuid4().hex}")
        if problem is not None:
            raise ConfigError(
                f"the S3 store at endpoint {self.store.endpoint}, bucket s3://{self.bucket}, does not honour "
                f"conditional writes ({problem}), so the lease that keeps a second job off "
                f"{redact_uri(self.store.uri)} cannot work there. Use a store that honours If-None-Match and "
                "If-Match on PutObject (AWS S3 does), or set storage.lease=false "
                "to run without a lease and make sure yourself that only one job writes this run_uri.")

    def create(self, data: bytes) -> Optional[str]:
        return self._put(data, IfNoneMatch="*")

    def replace(self, seen: Seen, data: bytes) -> Optional[str]:
        return self._put(data, IfMatch=seen.version)

    def delete(self, seen: Seen) -> bool:
        with self._errors():
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=seen.version)
            except botocore.exceptions.ClientError as exc:
                if self._condition_failed(exc):
                    return False
                raise
        return True


def _backend(store: Store) -> _Backend:
    if isinstance(store, S3Store):
        return _S3Backend(store)
    if isinstance(store, LocalStore):
        return _LocalBackend(store)
    raise TypeError(f"no lease for a {type(store).__name__}")


# -- who we are ------------------------------------------------------------------------------------


def _read_text(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if it is gone
    or a zombie (killed, not yet reaped)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in (...) may contain spaces
    return None if fields[0] == "Z" else fields[19]


def _pid_namespace() -> Optional[str]:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


# -- the lease -------------------------------------------------------------------------------------


class _Taken(Exception):
    def __init__(self, seen: Optional[Seen]):
        self.seen = seen


class Lease:
    """The run's lease: `with Lease(store, seconds, stop) as lease:` holds it for the block.

    `lease.guard(store)` wraps the run's store so that writes fail once the lease is lost; when the
    block ends after a loss (whatever it raised), the loss is what is raised (exit 4, or 3)."""

    def __init__(self, store: Store, seconds: float, stop=None):
        from job.platform import detect

        self.backend = _backend(store)
        self.run_uri = redact_uri(store.uri)
        self.seconds = float(seconds)
        self.stop = stop
        self.token = secrets.token_hex(8)
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "platform": detect(),
                         "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(),
                         "process_start": _process_start(os.getpid())}
        self.acquired_at: Optional[float] = None
        self.renewals = 0
        self.version: Optional[str] = None
        self.valid_until = 0.0  # monotonic
        self.lost: Optional[JobError] = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    # -- the object ------------------------------------------------------------------------------

    def _body(self) -> bytes:
        now = time.time()
        return (json.dumps({
            "token": self.token, **self.identity,
            "acquired_at": utc_timestamp(self.acquired_at or now), "renewed_at": utc_timestamp(now),
            "expires_at": utc_timestamp(now + self.seconds), "expiry_seconds": self.seconds,
            "renewals": self.renewals, "job_version": job.__version__,
            "note": "This job writes this run. Do not delete this file unless you are sure the job is dead.",
        }, indent=2) + "\n").encode()

    def _written(self, version: str, sent_at: float) -> None:
        self.version = version
        self.valid_until = sent_at + self.seconds * HOLDER_SHARE

    def _confirm(self, sent_at: float) -> bool:
        """After a write that the store accepted: read it back (a second guard after the probe in
        `check_conditions`: of two racing writers on a store that ignored the conditions, the last one
        wins, and both learn which)."""
        seen = self.backend.read(self.seconds)
        if seen is not None and seen.token == self.token:
            self._written(seen.version, sent_at)
            return True
        return False

    # -- acquire ---------------------------------------------------------------------------------

    def _holder_is_gone(self, seen: Seen) -> bool:
        """On this machine, in this PID namespace: is the holder's process gone (or a new one by that PID)?"""
        b, me = seen.body, self.identity
        if not (me["boot_id"] and me["pid_ns"] and b.get("host") == me["host"] and b.get("boot_id") == me["boot_id"]
                and b.get("pid_ns") == me["pid_ns"] and isinstance(b.get("pid"), int) and b.get("process_start")):
            return False  # elsewhere (another pod, container or host): only the expiry can tell
        return _process_start(b["pid"]) != b["process_start"]

    def acquire(self) -> None:
        """Take the lease, waiting while it is unclear whether its holder lives (at most its lease time)."""
        self.backend.check_conditions()
        watched: Optional[Seen] = None
        while True:
            if self.stop is not None and self.stop.is_set():
                raise Preempted(f"stopped by SIGTERM while waiting for the lease on {self.run_uri}; "
                                "nothing was written")
            self.acquired_at = time.time()
            sent_at = time.monotonic()
            if self.backend.create(self._body()) is not None and self._confirm(sent_at):
                log.debug("lease %s taken", self.backend.uri)
                return
            seen = self.backend.read(self.seconds)
            if seen is None:
                continue  # released between our create and this read: try again
            if seen.token == self.token:
                self._written(seen.version, sent_at)  # our create, answered late (a retried request)
                return
            gone = self._holder_is_gone(seen)
            if seen.stale or gone:
                why = ("its process is gone" if gone else
                       f"not renewed for {seen.age:.0f} s, expired after {seen.expiry:.0f} s")
                log.warning("taking over the lease on %s from %s: %s", self.run_uri, seen.holder, why)
                self.acquired_at, sent_at = time.time(), time.monotonic()
                if self.backend.replace(seen, self._body()) is not None and self._confirm(sent_at):
                    return
                continue  # another job changed it first: look again
            if watched is not None and seen.version != watched.version:
                raise self._locked(seen)  # renewed (or taken by a new job) while we watched: alive
            if watched is None:
                watched = seen
                log.info("%s holds the lease on %s (renewed %.0f s ago); waiting up to %.0f s to see whether it "
                         "is alive (it renews every %.0f s) or its lease expires", seen.holder, self.run_uri,
                         seen.age, seen.expiry - seen.age, seen.expiry / 3)
            pause = min(5.0, max(0.2, seen.expiry / 12))
            if self.stop is not None:
                self.stop.event.wait(pause)  # SIGTERM wakes us
            else:
                time.sleep(pause)

    def _locked(self, seen: Seen) -> RunLocked:
        return RunLocked(
            f"another job is writing to {self.run_uri}: {seen.holder} holds its lease, renewed {seen.age:.0f} s ago; "
            f"it expires at {seen.expires()} unless renewed again. Two jobs must not write one run: wait for "
            f"that job to finish (or stop it), or use another run_uri. If you are sure it is dead, delete "
            f"{self.backend.uri} and rerun.")

    # -- renew -----------------------------------------------------------------------------------

    def renew(self) -> None:
        """One renewal: rewrite the lease, only if it is still ours. Raises _Taken when it is not."""
        with self._lock:
            seen = self.backend.read(self.seconds)
            if seen is None or seen.token != self.token:
                raise _Taken(seen)
            sent_at = time.monotonic()
            self.renewals += 1
            version = self.backend.replace(seen, self._body())
            if version is not None:
                self._written(version, sent_at)
                return
            # The condition failed: the lease changed since we read it. Ours still, with another version:
            # our own write landed but its answer was lost and the retry found it changed.
            again = self.backend.read(self.seconds)
            if again is None or again.token != self.token:
                raise _Taken(again)
            if again.version == seen.version:  # locally: another job held the claim on this version
                raise StorageError(f"{self.backend.uri}: another job was replacing the lease at the same time")
            self._written(again.version, sent_at)

    def _renew_loop(self) -> None:
        interval = self.seconds / 3
        wait = interval
        while not self._closing.wait(wait):
            try:
                self.renew()
                wait = interval
            except _Taken as taken:
                self._lose(self._taken_error(taken.seen))
                return
            except Exception as exc:  # noqa: BLE001 - storage trouble: retry soon, give up at the deadline
                left = self.valid_until - time.monotonic()
                if left <= 0:
                    self._lose(StorageError(
                        f"could not renew the lease on {self.run_uri} for {self.seconds * HOLDER_SHARE:.0f} s "
                        f"({exc}): stopped writing, since another job may take the run over now; rerun when "
                        "storage is reachable again"))
                    return
                log.warning("could not renew the lease on %s (%s); retrying, %.0f s left", self.run_uri, exc, left)
                wait = min(interval, max(0.5, interval / 4))

    def _taken_error(self, seen: Optional[Seen]) -> RunLocked:
        if seen is None:
            what = f"its lease {self.backend.uri} was deleted while this job ran (by a person or another job)"
        else:
            what = f"{seen.holder} took over its lease {self.backend.uri}"
        return RunLocked(f"this job lost {self.run_uri}: {what}. It stopped writing; results written since the "
                         f"last renewal may be mixed with the other job's. Let the other job finish, then rerun.")

    def _lose(self, error: JobError) -> None:
        self.lost = error
        log.error("lease lost, stopping: %s", error)
        if self.stop is not None and not self.stop.is_set():
            # Training polls this flag after every step (as for SIGTERM): it stops and tries to save a
            # checkpoint, whose upload LeasedStore refuses.
            self.stop.received_at = time.monotonic()
            self.stop.event.set()

    def check(self) -> None:
        """Raise unless writing is safe: the lease is ours and was confirmed recently enough."""
        if self.lost is None and time.monotonic() > self.valid_until:
            self._lose(StorageError(f"the lease on {self.run_uri} was not renewed in time (storage slow or "
                                    "unreachable): stopped writing, since another job may take the run over now"))
        if self.lost is not None:
            raise self.lost

    # -- release ---------------------------------------------------------------------------------

    def release(self) -> None:
        """Delete the lease if it is still ours (never another job's)."""
        with self._lock:
            for _ in range(3):
                seen = self.backend.read(self.seconds)
                if seen is None or seen.token != self.token:
                    if self.lost is None:
                        log.warning("lease on %s: not ours any more at release, left alone", self.run_uri)
                    return
                if self.backend.delete(seen):
                    log.debug("lease %s released", self.backend.uri)
                    return

    # -- as a context ----------------------------------------------------------------------------

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=self.seconds)
        try:
            self.release()
        except JobError as release_error:
            if exc is None and self.lost is None:
                raise
            log.warning("could not release the lease on %s: %s", self.run_uri, release_error)
        if self.lost is not None and exc is not self.lost:
            # Whatever the stages raised after the loss (a refused write, the stop flag's Preempted),
            # the loss is the story: exit 4 (or 3), not 75 or 1.
            raise self.lost from exc

    def guard(self, store: Store) -> "LeasedStore":
        return LeasedStore(store, self)


class LeasedStore(Store):
    """The run's store, refusing every write once the lease is lost (reads pass).

    `upload_dir` and `move_dir` are Store's own, so each file of a folder upload is checked, not only the
    first."""

    def __init__(self, inner: Store, lease: Lease):
        super().__init__(inner.max_concurrency)
        self.inner, self.lease, self.uri = inner, lease, inner.uri

    def __getattr__(self, name):  # anything else a caller may use (root, client, ...)
        return getattr(self.inner, name)

    def child(self, rel: str) -> "LeasedStore":
        return LeasedStore(self.inner.child(rel), self.lease)

    def exists(self, rel: str) -> bool:
        return self.inner.exists(rel)

    def exists_dir(self, rel: str) -> bool:
        return self.inner.exists_dir(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self.inner.read_bytes(rel)

    def download_file(self, rel: str, local_path) -> None:
        self.inner.download_file(rel, local_path)

    def download_dir(self, rel: str, local_dir) -> list[str]:
        return self.inner.download_dir(rel, local_dir)

    def list(self, rel: str = "") -> list[str]:
        return self.inner.list(rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.lease.check()
        self.inner.write_bytes(rel, data)

    def upload_file(self, local_path, rel: str) -> None:
        self.lease.check()
        self.inner.upload_file(local_path, rel)

    def move_file(self, local_path, rel: str) -> None:
        self.lease.check()
        self.inner.move_file(local_path, rel)

    def local_folder(self, rel: str):
        return self.inner.local_folder(rel)

    def delete(self, rel: str) -> None:
        self.lease.check()
        self.inner.delete(rel)


class NoLease:
    """`storage.lease: false`: nothing is taken, renewed or checked; the run's store is used as it is."""

    def __init__(self, store: Store):
        self.run_uri = redact_uri(store.uri)

    def __enter__(self) -> "NoLease":
        log.warning("storage.lease is false: no lease on %s, so nothing stops a second job from writing this "
                    "run at the same time; make sure only one job uses this run_uri", self.run_uri)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None

    def guard(self, store: Store) -> Store:
        return store


def lease_for(store: Store, storage, stop=None) -> "Lease | NoLease":
    """The run's lease as `storage` (the config's StorageConfig) asks: a Lease, or NoLease when
    storage.lease is false."""
    if not storage.lease:
        return NoLease(store)
    return Lease(store, storage.lease_seconds, stop)
