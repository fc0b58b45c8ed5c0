"""A fault-injecting HTTP proxy in front of moto's S3 server, for reliability tests.

boto3 talks to it as to S3 (`AWS_ENDPOINT_URL=proxy.url`); it forwards each request to moto and,
at seeded random rates, answers instead:

  slowdown   503 SlowDown with S3's XML error body (the request never reaches S3)
  internal   500 InternalError (the request never reaches S3)
  reset      the connection is reset (RST) without any response (the request never reaches S3)
  truncate   the request reaches S3, the response carries the full Content-Length but only half
             the body, then the connection closes (only responses with a body, i.e. GET)

It counts requests and request-body bytes per key and can SIGKILL a process when a trigger fires:
the Nth request matching (method, key regex), before it is forwarded or after S3 answered it but
before the client hears the answer; or once B request-body bytes of matching keys have gone
through (the upload stops there, mid-body). After a kill the proxy drops every further request
(`dead`) until `reset()`, so nothing the dying process still had in flight reaches S3 afterwards.

Keys are object keys without the bucket ("run/data/train.jsonl"); bucket-level requests (list,
delete_objects) have key "". Request bodies are streamed (Content-Length or chunked), so multipart
uploads of large shards pass through in 64 KiB pieces; responses are read whole (test objects are small).
"""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FAULTS = ("slowdown", "internal", "reset", "truncate")
ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
             '<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>')
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "proxy-connection"}
CHUNK = 64 * 1024


@dataclass
class Trigger:
    """SIGKILL `pid` at the `nth` request matching method and key, or after `after_bytes` body bytes."""

    name: str
    pid: int  # may be set after the trigger is armed (arm it, start the process, set the pid)
    key: str  # regex, searched in the object key
    method: str | None = None  # None: any method
    nth: int | None = None
    after_bytes: int | None = None
    when: str = "before"  # nth only: "before" forwarding, or "after" S3 answered (the client never hears it)
    seen: int = 0
    bytes: int = 0
    fired: bool = False

    def matches(self, method: str, key: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.key, key) is not None


@dataclass
class Record:
    method: str
    key: str
    query: str
    outcome: str = "ok"  # ok | a fault name | killed | dropped
    body_bytes: int = 0


class _Killed(Exception):
    """A trigger fired inside this request: the process is dead, drop the connection."""


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rates: dict[str, float] = {}
        self.fault_keys = ""  # faults only hit keys matching this regex ("" matches every key)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.triggers: list[Trigger] = []
        self.reset()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="faultproxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- configuration -------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> None:
        """Forget counts, records, triggers and faults (a fresh proxy for the next process)."""
        with self.lock:
            if seed is not None:
                self.rng = random.Random(seed)
            self.rates, self.fault_keys, self.triggers = {}, "", []
            self.requests: Counter = Counter()  # (method, key) -> requests
            self.body_bytes: Counter = Counter()  # key -> request-body bytes forwarded
            self.faults: Counter = Counter()  # fault name -> times injected
            self.records: list[Record] = []
            self.fired: list[str] = []  # names of the triggers that fired
            self.dead = False

    def set_faults(self, keys: str = "", **rates: float) -> None:
        """E.g. set_faults(slowdown=0.05, internal=0.05, reset=0.05, truncate=0.05)."""
        unknown = set(rates) - set(FAULTS)
        if unknown or sum(rates.values()) > 1:
            raise ValueError(f"bad fault rates {rates}")
        with self.lock:
            self.rates, self.fault_keys = dict(rates), keys

    def kill_at(self, name: str, pid: int, key: str, *, method: str | None = None, nth: int | None = None,
                after_bytes: int | None = None, when: str = "before") -> Trigger:
        if (nth is None) == (after_bytes is None) or when not in ("before", "after"):
            raise ValueError("give exactly one of nth / after_bytes; when is 'before' or 'after'")
        trigger = Trigger(name, pid, key, method, nth, after_bytes, when)
        with self.lock:
            self.triggers.append(trigger)
        return trigger

    # -- called by the handler (under self.lock) -----------------------------------------------

    def _fire(self, trigger: Trigger) -> None:
        trigger.fired, self.dead = True, True
        self.fired.append(trigger.name)
        if trigger.pid > 0:  # 0 or -1 would signal a whole process group
            try:
                os.kill(trigger.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _on_request(self, record: Record) -> tuple[str | None, list[Trigger]]:
        """Count the request; return (fault to inject or None, nth-triggers to fire after forwarding)."""
        with self.lock:
            self.records.append(record)
            self.requests[(record.method, record.key)] += 1
            if self.dead:
                record.outcome = "dropped"
                raise _Killed
            after = []
            for trigger in self.triggers:
                if trigger.fired or trigger.nth is None or not trigger.matches(record.method, record.key):
                    continue
                trigger.seen += 1
                if trigger.seen == trigger.nth:
                    if trigger.when == "before":
                        record.outcome = "killed"
                        self._fire(trigger)
                        raise _Killed
                    after.append(trigger)
            fault = None
            if self.rates and not after and re.search(self.fault_keys, record.key):
                draw = self.rng.random()
                for name, rate in self.rates.items():
                    if draw < rate:
                        fault = name
                        break
                    draw -= rate
            return fault, after

    def _count_fault(self, record: Record, fault: str) -> None:
        with self.lock:
            self.faults[fault] += 1
            record.outcome = fault

    def _on_body(self, record: Record, n: int) -> int:
        """Account n body bytes; return how many of them may be forwarded (fewer: a trigger fired)."""
        with self.lock:
            if self.dead:
                raise _Killed
            allowed = n
            for trigger in self.triggers:
                if trigger.fired or trigger.after_bytes is None or not trigger.matches(record.method, record.key):
                    continue
                if trigger.bytes + n >= trigger.after_bytes:
                    allowed = min(allowed, trigger.after_bytes - trigger.bytes)
                    trigger.bytes = trigger.after_bytes
                    record.outcome = "killed"
                    self._fire(trigger)
                else:
                    trigger.bytes += n
            if not self.dead:
                self.body_bytes[record.key] += n
                record.body_bytes += n
            return allowed


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a killed client is expected
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_any(self) -> None:
        proxy: FaultProxy = self.server.proxy
        url = urlsplit(self.path)
        bucket_and_key = unquote(url.path).lstrip("/")
        record = Record(self.command, bucket_and_key.partition("/")[2], url.query)
        try:
            fault, after = proxy._on_request(record)
            if fault in ("slowdown", "internal", "reset"):
                proxy._count_fault(record, fault)
                self._drain()
                if fault == "reset":
                    return self._reset()
                code, message, status = (("SlowDown", "Please reduce your request rate.", 503) if fault == "slowdown"
                                         else ("InternalError", "We encountered an internal error.", 500))
                return self._send(status, {"Content-Type": "application/xml"},
                                  ERROR_XML.format(code=code, message=message).encode())
            status, headers, body = self._forward(proxy, record)
            if after:
                with proxy.lock:
                    for trigger in after:
                        record.outcome = "killed"
                        proxy._fire(trigger)
                raise _Killed
            if fault == "truncate" and len(body) > 1 and self.command == "GET":
                proxy._count_fault(record, fault)
                self._send(status, headers, body[: len(body) // 2], length=len(body))
                self.close_connection = True
                return None
            return self._send(status, headers, body)
        except _Killed:
            return self._reset()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_any

    # -- pieces --------------------------------------------------------------------------------

    def _body_chunks(self):
        """The request body in pieces, from Content-Length or chunked transfer encoding."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                yield data
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                return
            remaining -= len(data)
            yield data

    def _drain(self) -> None:
        for _ in self._body_chunks():
            pass

    def _forward(self, proxy: FaultProxy, record: Record):
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            elif self.headers.get("Content-Length") is not None:
                conn.putheader("Content-Length", self.headers["Content-Length"])
            conn.endheaders()
            for data in self._body_chunks():
                allowed = proxy._on_body(record, len(data))
                data = data[:allowed]
                if data:
                    conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if proxy.dead:
                    raise _Killed  # the upload stops mid-body, as when the uploader dies
            if chunked:
                conn.send(b"0\r\n\r\n")
            response = conn.getresponse()
            body = response.read()
            headers = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
            if self.command == "HEAD":
                headers["Content-Length"] = response.getheader("Content-Length", "0")
            return response.status, headers, body
        finally:
            conn.close()

    def _send(self, status: int, headers: dict, body: bytes, length: int | None = None) -> None:
        self.send_response_only(status)
        for name, value in headers.items():
            if not (self.command == "HEAD" and name.lower() == "content-length"):
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", headers.get("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with RST: the client sees 'connection reset by peer', not a clean end."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
