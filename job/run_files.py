"""Read back the files a stage wrote (data/*.jsonl, data/stats.json, ...): damage is bad input (exit 2)
that names the file and the way out, never a JSONDecodeError traceback.

The job writes these files in one piece (atomic rename, one PutObject), so damage means they were
changed outside the job (edited, truncated by a copy, synced file by file); redoing the stage that
made them repairs the run.
"""

from __future__ import annotations

import json
from pathlib import Path

from job.errors import InputError
from job.storage import Store


def _damaged(store: Store, rel: str, made_by: str, what: str, remedy: str = "") -> InputError:
    remedy = remedy or "to make it again (and the stages after it)"
    return InputError(f"{store.uri_of(rel)} is damaged ({what}); it was changed outside the job. Rerun with "
                      f"--force {made_by} {remedy}, or restore the file")


def read_json_object(store: Store, rel: str, made_by: str, text_keys: tuple[str, ...] = (),
                     remedy: str = "") -> dict:
    """The JSON object in `rel`, whose `text_keys` hold strings (a marker's fingerprint, LATEST's name)."""
    try:
        value = json.loads(store.read_text(rel))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(store, rel, made_by, str(exc), remedy) from None
    if not isinstance(value, dict):
        raise _damaged(store, rel, made_by, f"a JSON {type(value).__name__}, not an object", remedy)
    missing = [k for k in text_keys if not isinstance(value.get(k), str)]
    if missing:
        raise _damaged(store, rel, made_by, f"no {', '.join(missing)}", remedy)
    return value


def read_jsonl(store: Store, rel: str, made_by: str, keys: tuple[str, ...] = (),
               allow_empty: bool = False) -> list[dict]:
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


def check_adapter(folder: Path, uri: str) -> None:
    """A downloaded adapter/ folder is what train saved: a damaged one exits 2 naming the file and the
    way out, instead of failing deep inside peft."""
    from job.model_files import safetensors_problem

    problems = []
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or "peft_type" not in config:
            problems.append("adapter_config.json is not a PEFT adapter config")
    except (OSError, ValueError) as exc:
        problems.append(f"adapter_config.json unreadable ({type(exc).__name__}: {exc})")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append("adapter_model.safetensors is missing")
    elif problem := safetensors_problem(weights):
        problems.append(f"adapter_model.safetensors {problem}")
    if problems:
        raise InputError(f"{uri} is damaged: {'; '.join(problems)}. It was changed outside the job: rerun with "
                         "--force train to train it again (and the stages after it), or restore the files")
