"""Read back the files a stage wrote (data/*.jsonl, data/stats.json, ...): damage is bad input (exit 2)
that names the file and the way out, never a JSONDecodeError traceback.

The job writes these files in one piece (atomic rename, one PutObject), so damage means they were
changed outside the job (edited, truncated by a copy, synced file by file); redoing the stage that
made them repairs the run.
"""

from __future__ import annotations

import json

from job.errors import InputError
from job.storage import Store


def _damaged(store: Store, rel: str, made_by: str, what: str) -> InputError:
    return InputError(f"{store.uri_of(rel)} is damaged ({what}); it was changed outside the job. Rerun with "
                      f"--force {made_by} to make it again (and the stages after it), or restore the file")


def read_json_object(store: Store, rel: str, made_by: str) -> dict:
    try:
        value = json.loads(store.read_text(rel))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(store, rel, made_by, str(exc)) from None
    if not isinstance(value, dict):
        raise _damaged(store, rel, made_by, f"a JSON {type(value).__name__}, not an object")
    return value


def read_jsonl(store: Store, rel: str, made_by: str, keys: tuple[str, ...] = (), allow_empty: bool = False) -> list[dict]:
    """Every record of a JSON Lines file; each must be an object holding `keys`."""
    try:
        text = store.read_text(rel)
    except UnicodeDecodeError as exc:
        raise _damaged(store, rel, made_by, f"not UTF-8: {exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise _damaged(store, rel, made_by, f"line {number}: {exc}") from None
        if not isinstance(record, dict) or any(k not in record for k in keys):
            raise _damaged(store, rel, made_by, f"line {number} is not a record with {', '.join(keys)}")
        records.append(record)
    if not records and not allow_empty:
        raise _damaged(store, rel, made_by, "no records")
    return records
