"""One writer per run (job/lease.py), once against a folder and once against moto's S3 server; and on
s3rver, a second S3 implementation that ignores conditional writes: there the lease refuses (exit 2),
and `storage.lease=false` runs without one.

The lease objects are driven directly for the conditional operations, and real `python -m job run`
processes for what users see: two jobs at once (one runs, the other exits 4), a SIGKILLed holder
taken over, renewal beyond the lease time, release on exit 0 and on SIGTERM (75), a lease stolen
mid-run (exit 4, no marker). Overlaps are arranged by the test holding or writing leases itself and by
waiting for the jobs' own log lines, never by sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import botocore.exceptions
import pytest

from job.config import StorageConfig
from job.errors import EXIT_BAD_INPUT, EXIT_LOCKED, ConfigError, RunLocked, StorageError
from job.lease import LEASE, Lease
from job.storage import open_store
from tests.helpers import ROOT, SNLI_SAMPLE, job_env, put_file, read_run_file, run_file_exists, run_job, s3_client
from tests.s3server import backend_root

LEASE_SECONDS = 3  # the minimum: renewed every second, so a second holder learns within about a second
# Jobs train on a shared CPU: a longer lease gives their renewal thread slack against a busy machine.
JOB_LEASE_SECONDS = 12  # 6 expired once under CI's load (a renewal late by over 6 s) while the job lived


@pytest.fixture(autouse=True)
def atomic_moto(monkeypatch):
    """Real S3 checks If-None-Match / If-Match and writes atomically; moto 5.2.5 checks, then writes,
    without a lock, so two requests racing in its threads could both pass. Serialise them, as S3 does."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        original = getattr(S3Response, name)

        def atomic(self, _original=original):
            with lock:
                return _original(self)
        monkeypatch.setattr(S3Response, name, atomic)


def store_of(root, endpoint):
    return open_store(root, StorageConfig(endpoint_url=endpoint))


def write_run_file(root, endpoint, rel, text):
    if root.startswith("s3://"):
        bucket, _, prefix = root[5:].partition("/")
        s3_client(endpoint).put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=text.encode())
    else:
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # as atomic as the job's own writes


def delete_run_file(root, endpoint, rel):
    if root.startswith("s3://"):
        bucket, _, prefix = root[5:].partition("/")
        s3_client(endpoint).delete_object(Bucket=bucket, Key=f"{prefix}/{rel}")
    else:
        (Path(root) / rel).unlink()


def foreign_lease(host="elsewhere", pid=4242, expiry=600, token="f0reign"):
    """A lease as another machine's job writes it."""
    return json.dumps({"token": token, "host": host, "pid": pid, "platform": "kubernetes",
                       "acquired_at": "2026-01-02T03:04:05Z", "renewed_at": "2026-01-02T03:04:05Z",
                       "expiry_seconds": expiry, "renewals": 0})


def lease_body(root, endpoint):
    return json.loads(read_run_file(root, endpoint, LEASE))


# -- the lease object ------------------------------------------------------------------------------


def test_conditional_create_rejects_a_second_holder(store_root):
    root, endpoint = store_root
    first, second = Lease(store_of(root, endpoint), LEASE_SECONDS), Lease(store_of(root, endpoint), LEASE_SECONDS)
    assert first.backend.create(b'{"token": "a"}') is not None
    assert second.backend.create(b'{"token": "b"}') is None  # O_EXCL / If-None-Match: *
    seen = first.backend.read(LEASE_SECONDS)
    assert seen.token == "a"
    # A replace or delete conditioned on a version that is no longer there fails.
    newer = first.backend.replace(seen, b'{"token": "a2"}')
    assert newer is not None and first.backend.read(LEASE_SECONDS).token == "a2"
    assert second.backend.replace(seen, b'{"token": "b"}') is None
    assert second.backend.delete(seen) is False
    assert first.backend.read(LEASE_SECONDS).token == "a2"
    assert first.backend.delete(first.backend.read(LEASE_SECONDS)) is True
    assert first.backend.read(LEASE_SECONDS) is None


def test_s3_server_answers_412_to_failed_conditions(s3_bucket):
    """What the S3 backend relies on, checked against the server itself (no atomic_moto involved)."""
    endpoint, bucket = s3_bucket
    s3 = s3_client(endpoint)
    etag = s3.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")["ETag"]
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
        with pytest.raises(botocore.exceptions.ClientError) as failed:
            s3.put_object(Bucket=bucket, Key="k", Body=b"2", **condition)
        assert failed.value.response["Error"]["Code"] == "PreconditionFailed"
        assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    newer = s3.put_object(Bucket=bucket, Key="k", Body=b"3", IfMatch=etag)["ETag"]
    with pytest.raises(botocore.exceptions.ClientError, match="PreconditionFailed"):
        s3.delete_object(Bucket=bucket, Key="k", IfMatch=etag)
    s3.delete_object(Bucket=bucket, Key="k", IfMatch=newer)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def test_live_holder_keeps_a_second_job_out(store_root):
    root, endpoint = store_root
    with Lease(store_of(root, endpoint), LEASE_SECONDS) as holder:
        with pytest.raises(RunLocked) as locked:
            Lease(store_of(root, endpoint), LEASE_SECONDS).acquire()  # waits for one renewal: alive
        message = str(locked.value)
        assert f"another job is writing to {root}" in message
        assert f"pid {os.getpid()}" in message and "expires at" in message
        assert f"delete {root}/{LEASE}" in message
        assert lease_body(root, endpoint)["token"] == holder.token
    assert not run_file_exists(root, endpoint, LEASE)  # released


def test_expired_lease_is_taken_over_by_exactly_one_newcomer(store_root, caplog):
    root, endpoint = store_root
    # A holder on another machine that stopped renewing (SIGKILL, lost node): its lease expires 1 s after
    # it was written, by the storage's clock.
    write_run_file(root, endpoint, LEASE, foreign_lease(expiry=1))
    results = {}

    def newcomer(name):
        lease = Lease(store_of(root, endpoint), LEASE_SECONDS)
        try:
            results[name] = lease.__enter__()
        except RunLocked as exc:
            results[name] = exc

    caplog.set_level(logging.INFO, logger="job.lease")
    threads = [threading.Thread(target=newcomer, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [r for r in results.values() if isinstance(r, Lease)]
    losers = [r for r in results.values() if isinstance(r, RunLocked)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert lease_body(root, endpoint)["token"] == winners[0].token
    assert re.search(r"taking over the lease on \S+ from elsewhere pid 4242 on kubernetes \(since "
                     r"2026-01-02T03:04:05Z\): not renewed for \d+ s, expired after 1 s", caplog.text)
    winners[0].__exit__(None, None, None)
    assert not run_file_exists(root, endpoint, LEASE)


def test_lost_lease_refuses_writes_and_release_leaves_the_new_holder_alone(store_root):
    root, endpoint = store_root
    store = store_of(root, endpoint)
    lease = Lease(store, LEASE_SECONDS)
    guarded = lease.guard(store)
    with pytest.raises(RunLocked, match="thief pid 7 .* took over its lease"):
        with lease:
            guarded.write_text("a.txt", "written while holding the lease")
            write_run_file(root, endpoint, LEASE, foreign_lease(host="thief", pid=7))
            deadline = time.monotonic() + 30
            while lease.lost is None and time.monotonic() < deadline:  # the renewal thread notices
                time.sleep(0.05)
            with pytest.raises(RunLocked):
                guarded.write_text("b.txt", "refused")
    assert store.exists("a.txt") and not store.exists("b.txt")
    assert lease_body(root, endpoint)["host"] == "thief"  # not deleted at release


def test_renewals_that_keep_failing_end_in_a_storage_error(tmp_path):
    lease = Lease(store_of(str(tmp_path / "run"), None), LEASE_SECONDS)
    with pytest.raises(StorageError, match="not renewed in time"):
        with lease:
            lease._closing.set()  # no more renewals, as if storage stopped answering
            lease.valid_until = time.monotonic() - 1
            lease.guard(lease.backend.store).write_text("x.txt", "refused")
    assert not (tmp_path / "run" / "x.txt").exists()


@pytest.mark.parametrize("backend", ["s3", "s3rver"])
def test_lease_probes_the_store_for_conditional_writes(backend, request, tmp_path):
    """moto honours If-None-Match / If-Match and the lease works; s3rver ignores them (a second create
    overwrites), so taking a lease there is refused before the lease object is written."""
    root, endpoint = backend_root(request, tmp_path, backend)
    store = store_of(root, endpoint)
    if backend == "s3":
        with Lease(store, LEASE_SECONDS) as lease:
            assert lease_body(root, endpoint)["token"] == lease.token
        assert store.list() == []
        return
    with pytest.raises(ConfigError) as refused:
        Lease(store, LEASE_SECONDS).acquire()
    message = str(refused.value)
    assert f"endpoint {endpoint}, bucket s3://{root[5:].split('/')[0]}, does not honour conditional writes" in message
    assert "If-None-Match: * overwrote an existing object" in message and "storage.lease=false" in message
    assert store.list() == []  # no lease, and the probe object was deleted


def test_lease_seconds_is_validated():
    from job.config import load_config
    from job.errors import ConfigError

    base = ("run_uri=/r", "data.uri=/d.csv", "model.uri=/m")
    assert load_config(None, base, environ={}).storage.lease_seconds == 120
    with pytest.raises(ConfigError, match="storage.lease_seconds: must be at least 3"):
        load_config(None, (*base, "storage.lease_seconds=2"), environ={})


# -- real jobs -------------------------------------------------------------------------------------


class Job:
    """`python -m job ARGS` in the background; its stderr lines are collected as they come."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "job", *map(str, args)], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern, timeout=300):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not re.search(pattern, self.stderr):
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError(f"job ended without logging {pattern!r}:\n{self.stderr}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {pattern!r} in time:\n{self.stderr}")
                self.changed.wait(timeout=1)

    def wait(self, timeout=300) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return code


def job_args(root, data_uri, model_dir, stages="format,train", max_steps=4, *extra):
    return ["run", "--stages", stages, "--set", f"run_uri={root}", "--set", f"data.uri={data_uri}",
            "--set", f"model.uri={model_dir}", "--set", "data.eval_size=20", "--set", "train.load_in_4bit=false",
            "--set", f"train.max_steps={max_steps}", "--set", "train.checkpoint_every_steps=2",
            "--set", "train.logging_steps=1", "--set", "train.micro_batch_size=2",
            "--set", "train.packing_length=256", "--set", "train.max_seq_length=256",
            "--set", f"storage.lease_seconds={JOB_LEASE_SECONDS}", *extra]


def wait_until(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_jobs_at_once_one_writes_the_other_exits_4(run_setup):
    root, endpoint, data_uri, env, model_dir = run_setup
    args = job_args(root, data_uri, model_dir, "format,train", 100000)  # trains until the test stops it
    # A live holder elsewhere: both jobs start, find it and wait to see whether it renews.
    write_run_file(root, endpoint, LEASE, foreign_lease())
    jobs = [Job(args, env) for _ in range(2)]
    for j in jobs:
        j.wait_for_line(r"elsewhere pid 4242 on kubernetes .* holds the lease on .*waiting up to")
    # Reading commands take no lease.
    plan = run_job("plan", "--set", f"run_uri={root}", "--set", f"data.uri={data_uri}", "--set",
                   f"model.uri={model_dir}", env=env)
    assert plan.returncode == 0, plan.stderr
    assert not run_file_exists(root, endpoint, "config.yaml")  # nobody wrote yet
    # The holder ends: both jobs race to create the lease at the same moment. The winner runs until
    # the test stops it, so the loser sees it renew and exits 4.
    delete_run_file(root, endpoint, LEASE)
    wait_until(lambda: any(j.proc.poll() is not None for j in jobs), "one job to exit")
    loser, winner = (jobs[0], jobs[1]) if jobs[0].proc.poll() is not None else (jobs[1], jobs[0])
    assert loser.wait() == EXIT_LOCKED, loser.stderr
    assert re.search(rf"another job is writing to {re.escape(root)}: \S+ pid {winner.proc.pid} on local \(since "
                     rf"[0-9TZ:-]+\) holds its lease, renewed \d+ s ago; it expires at [0-9TZ:-]+ unless renewed "
                     rf"again\. .*delete {re.escape(root)}/_lease\.json and rerun", loser.stderr), loser.stderr
    assert "stage format" not in loser.stderr and "run " + root not in loser.stderr
    winner.wait_for_line(r"checkpoint \d+ uploaded")
    assert "stage format: running" in winner.stderr
    winner.proc.send_signal(signal.SIGTERM)
    assert winner.wait() == 75, winner.stderr
    assert not run_file_exists(root, endpoint, LEASE)  # released on SIGTERM
    again = run_job(*job_args(root, data_uri, model_dir, "format"), env=env)
    assert again.returncode == 0, again.stderr
    assert "stage format: done already" in again.stderr
    assert not run_file_exists(root, endpoint, LEASE)  # released on a normal exit


def test_renewal_and_takeover_after_sigkill(run_setup):
    root, endpoint, data_uri, env, model_dir = run_setup
    args = job_args(root, data_uri, model_dir, "format,train", 100000)
    first = Job(args, env)
    first.wait_for_line(r"checkpoint \d+ uploaded")
    # Renewed every 4 s: alive past its 12 s lease time.
    wait_until(lambda: lease_body(root, endpoint)["renewals"] >= 4, "renewals")
    assert lease_body(root, endpoint)["pid"] == first.proc.pid
    with pytest.raises(RunLocked, match=f"pid {first.proc.pid}"):
        Lease(store_of(root, endpoint), LEASE_SECONDS).acquire()

    first.proc.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert lease_body(root, endpoint)["pid"] == first.proc.pid  # nobody released it

    # Same machine: the holder's process is gone, so the rerun takes over without waiting for expiry.
    second = Job(args, env)
    second.wait_for_line(rf"taking over the lease on {re.escape(root)} from \S+ pid {first.proc.pid} on local "
                         r"\(since [0-9TZ:-]+\): its process is gone")
    second.wait_for_line(r"resuming from")
    second.wait_for_line(r"checkpoint \d+ uploaded")  # training goes on under the new lease
    assert lease_body(root, endpoint)["pid"] == second.proc.pid
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 75, second.stderr
    assert not run_file_exists(root, endpoint, LEASE)


def test_lease_stolen_mid_run_stops_the_job_with_exit_4(run_setup):
    root, endpoint, data_uri, env, model_dir = run_setup
    job = Job(job_args(root, data_uri, model_dir, "format,train", 100000), env)
    job.wait_for_line(r"checkpoint \d+ uploaded")
    write_run_file(root, endpoint, LEASE, foreign_lease(host="thief", pid=7))
    assert job.wait() == EXIT_LOCKED, job.stderr
    assert re.search(rf"this job lost {re.escape(root)}: thief pid 7 on kubernetes \(since [0-9TZ:-]+\) took over "
                     r"its lease", job.stderr), job.stderr
    assert "stopped by SIGTERM" not in job.stderr  # the stop flag was raised by the loss, not a signal
    assert not run_file_exists(root, endpoint, "_stages/train.json")
    assert lease_body(root, endpoint)["host"] == "thief"  # the new holder's lease is left alone


# -- stores that ignore conditional writes -------------------------------------------------------------


@pytest.fixture
def s3rver_run(request, tmp_path, tiny_model_dir):  # noqa: F811
    """(root, endpoint, data_uri, env, model_dir) for a run on s3rver, the SNLI sample next to it."""
    root, endpoint = backend_root(request, tmp_path, "s3rver")
    data_uri = put_file(root, endpoint, SNLI_SAMPLE, "snli.csv")
    return root, endpoint, data_uri, job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache"), tiny_model_dir


def bucket_keys(root, endpoint):
    bucket = root[5:].split("/")[0]
    return sorted(o["Key"] for o in s3_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", []))


def test_job_refuses_a_store_that_ignores_conditional_writes(s3rver_run):
    root, endpoint, data_uri, env, model_dir = s3rver_run
    before = bucket_keys(root, endpoint)
    result = run_job(*job_args(root, data_uri, model_dir, "format"), env=env)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    bucket = root[5:].split("/")[0]
    assert (f"the S3 store at endpoint {endpoint}, bucket s3://{bucket}, does not honour conditional writes"
            in result.stderr), result.stderr
    assert "set storage.lease=false" in result.stderr
    assert "Traceback" not in result.stderr
    assert bucket_keys(root, endpoint) == before == ["inputs/snli.csv"]  # nothing written; the probe deleted


def test_lease_false_runs_without_a_lease_with_a_warning(s3rver_run):
    root, endpoint, data_uri, env, model_dir = s3rver_run
    result = run_job(*job_args(root, data_uri, model_dir, "format", 4, "--set", "storage.lease=false"), env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"WARNING.*storage\.lease is false: no lease on {re.escape(root)}, so nothing stops a second "
                     r"job from writing this run", result.stderr), result.stderr
    assert run_file_exists(root, endpoint, "_stages/format.json")
    assert not any(k.rsplit("/", 1)[-1].startswith("_lease") for k in bucket_keys(root, endpoint))
