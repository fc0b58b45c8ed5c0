"""Expensive session fixtures built once per test run, not once per pytest-xdist worker.

CI runs four workers (`-n 4 --dist loadfile`), and a `scope="session"` fixture is per worker process: a
fixture that two test files use (the SmolLM2 conversion, the trained tiny run, the fault tests'
reference run) was built by every worker that ran one of those files, each time the same minutes of
CPU on a 2-core machine. `build_once(tmp_path_factory, name, build)` builds it once under the run's
shared base temp folder (pytest-N/, above the workers' popen-gwK/ folders: one per run, never reused
by the next), guarded by a file lock; the other workers wait for it and read the result.

The result is exactly what a fresh build gives: the same code builds it, once. Without xdist (`-n 0`)
the folder is the session's own base temp, and nothing is shared.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def shared_root(tmp_path_factory) -> Path:
    """pytest-N/ under xdist (every worker's base temp is pytest-N/popen-gwK/), else the base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[Path], dict | None]) -> tuple[Path, dict]:
    """(folder, info): `build(folder)` run once per test run into an empty `folder`; `info` is what it
    returned (JSON), saved beside the folder for the workers that find it built. A failed build leaves
    nothing behind: the next worker that asks builds again (and fails the same way, with its own error)."""
    root = shared_root(tmp_path_factory) / "built-once"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                info = build(folder) or {}
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.write_text(json.dumps(info))
        return folder, json.loads(done.read_text())
