"""A fake Hugging Face Hub on 127.0.0.1: the routes huggingface_hub's snapshot_download uses.

  GET  /api/{models|datasets}/ORG/NAME[/revision/REV]     repo info with the resolved commit `sha`
  GET  /api/{models|datasets}/ORG/NAME/tree/REV[/PATH]    the file list (one page)
  HEAD /[datasets/]ORG/NAME/resolve/REV/FILE               X-Repo-Commit, ETag, Content-Length
  GET  the same                                            the bytes (Range honoured)

Errors as the Hub sends them: 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, and
for a gated repo without the right `Authorization: Bearer <token>` 401 with X-Error-Code GatedRepo.
`cut_after_bytes` makes the server stop answering (connection closed, then refused) once a file
body has sent that many bytes: an endpoint that goes down mid-download; `fail_status` answers every request
with that status (503: a Hub that is down). huggingface_hub reads HF_ENDPOINT
at import: point a job's process at `hub.url` through its environment.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # sha -> {path: bytes}
    refs: dict[str, str]  # branch or tag -> sha
    gated: bool = False


@dataclass
class FakeHub:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)  # (models|datasets, ORG/NAME) -> Repo
    token: str = ""
    cut_after_bytes: int | None = None
    fail_status: int | None = None  # answer every request with this status (503: the Hub is down)
    requests: list[str] = field(default_factory=list)  # "METHOD path", for assertions
    _server: ThreadingHTTPServer | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(self, kind: str, repo_id: str, revisions: dict[str, dict[str, bytes]], gated: bool = False) -> dict:
        """revisions: ref name -> files. Returns ref name -> commit sha (each ref its own commit)."""
        repo = Repo({}, {}, gated)
        for ref, files in revisions.items():
            sha = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
            repo.commits[sha] = files
            repo.refs[ref] = sha
        self.repos[(kind, repo_id)] = repo
        return dict(repo.refs)

    def push(self, kind: str, repo_id: str, ref: str, files: dict[str, bytes]) -> str:
        """A new commit on `ref` (the branch moves); returns its sha."""
        repo = self.repos[(kind, repo_id)]
        sha = hashlib.sha1(f"{repo_id}@{ref}#{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.refs[ref] = sha
        return sha

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _route(self, head: bool) -> None:
        self.fake.requests.append(f"{self.command} {self.path}")
        if self.fake.fail_status is not None:
            return self._error(self.fake.fail_status, "ServiceUnavailable", "the hub is down (fake)")
        path = self.path.split("?", 1)[0]
        api = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?", path)
        resolve = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            kind, repo_id, what, rev, _sub = api.groups()
            repo, sha = self._lookup(kind, repo_id, rev or "main")
            if repo is None:
                return
            files = repo.commits[sha]
            if what == "tree":
                body = [{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                        for name, data in files.items()]
            else:
                body = {"id": repo_id, "sha": sha, "private": False, "gated": "manual" if repo.gated else False,
                        "siblings": [{"rfilename": name} for name in files]}
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        elif resolve:
            datasets, repo_id, rev, name = resolve.groups()
            repo, sha = self._lookup("datasets" if datasets else "models", repo_id, rev)
            if repo is None:
                return
            data = repo.commits[sha].get(name)
            if data is None:
                return self._error(404, "EntryNotFound")
            self._send_file(data, sha, head)
        else:
            self._error(404, "RepoNotFound")

    def _lookup(self, kind: str, repo_id: str, rev: str):
        repo = self.fake.repos.get((kind, repo_id))
        if repo is None:
            self._error(401, "RepoNotFound")  # the Hub answers 401 for a repo it will not show
            return None, None
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self._error(401, "GatedRepo",
                        "Access to this model is restricted. You must have access to it and be authenticated.")
            return None, None
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            self._error(404, "RevisionNotFound")
            return None, None
        return repo, sha

    def _send_file(self, data: bytes, sha: str, head: bool) -> None:
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not head and int(match.group(1)) < len(data):
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        cut = self.fake.cut_after_bytes
        if head or cut is None or len(body) <= cut:
            return self._send(206 if start else 200, body, headers, head)
        # The endpoint dies mid-body: promise the whole file, send part of it, and stop serving.
        self.send_response(200)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        threading.Thread(target=self.fake.stop, daemon=True).start()

    def _error(self, status: int, code: str, message: str = "") -> None:
        self._send(status, json.dumps({"error": message or code}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code,
                    **({"X-Error-Message": message} if message else {})}, head=self.command == "HEAD")

    def _send(self, status: int, body: bytes, headers: dict, head: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
