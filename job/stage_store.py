"""The store a running stage sees: nothing is replaced before the stage writes its first byte.

A stage reads its inputs and checks them before it writes anything (format parses the whole CSV, train
loads the model and checks its labels first). So the first write into the run is the moment the stage
has committed to producing new results, and this wrapper hooks it: the pipeline then records
config.yaml and the stage's `.started` marker and, for a forced stage, deletes the old results (its
own and every later stage's markers first, then their outputs). A forced stage whose input is
mistyped therefore fails with the old run intact, and a stage that failed before writing anything
leaves no `.started` marker that would block a rerun with corrected settings.

Until then, a forced stage must not see its own old outputs (train would resume from the old
checkpoints): `hidden` paths read as absent.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from job.errors import StorageError
from job.storage import Store, _clean


class StageStore(Store):
    def __init__(self, inner: Store, before_first_write: Callable[[], None] = lambda: None,
                 hidden: tuple[str, ...] = ()):
        super().__init__(inner.max_concurrency)
        self.inner, self.uri = inner, inner.uri
        self._before_first_write = before_first_write
        self._hidden = tuple(_clean(p) for p in hidden)
        self._lock = threading.Lock()  # checkpoint uploads run on worker threads
        self._committed = False

    def __getattr__(self, name):  # anything else a caller may use (root, client, lease, ...)
        return getattr(self.inner, name)

    # -- the first write -----------------------------------------------------------------------

    def _commit(self) -> None:
        with self._lock:
            if not self._committed:
                self._before_first_write()
                self._committed = True
                self._hidden = ()  # the old outputs are gone now: what is there is this stage's

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._commit()
        self.inner.write_bytes(rel, data)

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        self._commit()
        self.inner.upload_file(local_path, rel)

    def move_file(self, local_path: str | Path, rel: str) -> None:
        self._commit()
        self.inner.move_file(local_path, rel)

    def delete(self, rel: str) -> None:
        self._commit()
        self.inner.delete(rel)

    # -- reads: hidden paths are absent ----------------------------------------------------------

    def _is_hidden(self, rel: str) -> bool:
        rel = _clean(rel)
        return any(rel == h or rel.startswith(h + "/") for h in self._hidden)

    def child(self, rel: str) -> Store:
        if self._hidden and not self._committed:
            raise NotImplementedError("child() of a forced stage's store before its first write")
        return self.inner.child(rel)

    def local_folder(self, rel: str) -> Path | None:
        return None if self._is_hidden(rel) else self.inner.local_folder(rel)

    def exists(self, rel: str) -> bool:
        return not self._is_hidden(rel) and self.inner.exists(rel)

    def exists_dir(self, rel: str) -> bool:
        return bool(self.list(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self._is_hidden(rel):
            raise StorageError(f"file not found: {self.uri_of(rel)} (forced: earlier results are not read)")
        return self.inner.read_bytes(rel)

    def download_file(self, rel: str, local_path: str | Path) -> None:
        if self._is_hidden(rel):
            raise StorageError(f"file not found: {self.uri_of(rel)} (forced: earlier results are not read)")
        self.inner.download_file(rel, local_path)

    def list(self, rel: str = "") -> list[str]:
        names = self.inner.list(rel)
        if not self._hidden:
            return names
        base = _clean(rel)
        return [n for n in names if not self._is_hidden(f"{base}/{n}" if base else n)]
