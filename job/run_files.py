"""Read back the files the job wrote into a run: damage is bad input (exit 2) that names the file, what is
wrong with it and the `--force` that makes it again, never an AttributeError deep inside a stage.

The job writes these files in one piece (atomic rename, one PutObject), so damage means they were
changed outside the job (edited, truncated by a copy, synced file by file); redoing the stage that
made them repairs the run.

Each JSON file the job writes and reads back has a schema here (pydantic models: types and bounds,
checked where the file is read): the stage markers, checkpoints/LATEST, adapter/adapter_config.json,
checkpoints/trackers.json, data/stats.json and the lease. Keys a schema does not name are kept as they
are (a newer job, or peft, may add some). Readers return the file's own dict once it passed, so
callers keep reading plain JSON values and the files keep their format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from job.errors import InputError
from job.storage import Store

# -- schemas ---------------------------------------------------------------------------------------

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
Text = Annotated[str, Field(max_length=4096)]


class RunFile(BaseModel):
    """Strict types (a "3" is not a 3) and any extra keys kept."""

    model_config = ConfigDict(extra="allow", strict=True)


class LossPoint(RunFile):
    step: Count
    loss: Annotated[float, Field(allow_inf_nan=True)]  # a diverged run logs inf/nan: the report shows it


class TrainMetrics(RunFile):
    """What the report reads from the train marker (job/report.py train_summary, plot_loss)."""

    loss_curve: list[LossPoint] = []
    steps: Optional[Count] = None
    tokens_seen: Optional[Count] = None
    final_loss: Optional[float] = None


class MergeMetrics(RunFile):
    """What the report formats as numbers (job/report.py merge_summary)."""

    max_logit_diff: Optional[float] = None
    tolerance: Optional[float] = None
    logit_scale: Optional[float] = None
    files: list[Text] = []


class ExportFile(RunFile):
    file: Text
    bytes: Count


class ExportMetrics(RunFile):
    files: dict[str, ExportFile] = {}


class StageMarker(RunFile):
    """_stages/<stage>.json and <stage>.started.json (job/pipeline.py writes them)."""

    stage: Optional[Text] = None
    fingerprint: Annotated[str, Field(min_length=1, max_length=128)]
    version: Optional[Text] = None
    upstream: dict[str, Text] = {}
    config: dict[str, Any] = {}
    inputs: Optional[dict[str, Optional[dict[str, Any]]]] = None
    """Identity of the outside inputs (job/input_identity.py), None where it was unknown."""
    started_at: Optional[Text] = None
    finished_at: Optional[Text] = None
    seconds: Optional[Seconds] = None
    phase_seconds: dict[str, Seconds] = {}
    metrics: dict[str, Any] = {}


class TrainMarker(StageMarker):
    metrics: TrainMetrics = TrainMetrics()


class MergeMarker(StageMarker):
    metrics: MergeMetrics = MergeMetrics()


class ExportMarker(StageMarker):
    metrics: ExportMetrics = ExportMetrics()


def marker_schema(stage: str) -> type[StageMarker]:
    """The schema of a stage's marker: the metrics a later stage reads are typed too."""
    return {"train": TrainMarker, "merge": MergeMarker, "export": ExportMarker}.get(stage, StageMarker)


class CheckpointSettings(RunFile):
    """The batch settings training started with: a resume keeps them (job/stages/train.py batch_settings)."""

    packing: Optional[bool] = None
    packing_length: Optional[Annotated[int, Field(ge=1, le=2**24)]] = None
    micro_batch_size: Optional[Annotated[int, Field(ge=1, le=2**20)]] = None
    gradient_checkpointing: Optional[bool] = None


class Latest(RunFile):
    """checkpoints/LATEST (job/stages/checkpoints.py CheckpointSync._upload)."""

    checkpoint: Annotated[str, Field(pattern=r"^checkpoint-[0-9]{1,12}$")]
    """A folder name under checkpoints/, never a path elsewhere."""
    step: Optional[Count] = None
    fingerprint: Optional[Text] = None
    files: list[Text] = []
    settings: CheckpointSettings = CheckpointSettings()
    processes: Annotated[int, Field(ge=1, le=65536)] = 1
    uploaded_at: Optional[Text] = None


class AdapterConfig(RunFile):
    """adapter/adapter_config.json as peft writes it: the values merge and evaluate hand to peft."""

    peft_type: Annotated[str, Field(min_length=1, max_length=64)]
    r: Annotated[int, Field(ge=1, le=65536)]
    lora_alpha: Annotated[float, Field(allow_inf_nan=False)]
    lora_dropout: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    target_modules: Optional[Union[Text, list[Text]]] = None
    modules_to_save: Optional[list[Text]] = None
    base_model_name_or_path: Optional[Text] = None
    bias: Optional[Text] = None
    fan_in_fan_out: Optional[bool] = None
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] = {}
    alpha_pattern: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = {}


class TrackerState(RunFile):
    """checkpoints/trackers.json (job/trackers.py)."""

    mlflow_run_id: Optional[Annotated[str, Field(min_length=1, max_length=256)]] = None


class DataStats(RunFile):
    """data/stats.json (the format stage): the report's data section."""

    rows_read: Optional[Count] = None
    rows_kept: Optional[Count] = None
    train_rows: Optional[Count] = None
    eval_rows: Optional[Count] = None
    dropped: dict[str, Count] = {}


class LeaseBody(RunFile):
    """_lease.json (job/lease.py). Read leniently: a field of the wrong type counts as absent."""

    token: Optional[Text] = None
    host: Optional[Text] = None
    pid: Optional[Annotated[int, Field(ge=1, le=2**31)]] = None
    platform: Optional[Text] = None
    acquired_at: Optional[Text] = None
    expiry_seconds: Optional[Annotated[float, Field(gt=0, le=30 * 86400, allow_inf_nan=False)]] = None
    """Bounded: a lease that claims to last for ever would block the run for ever."""
    boot_id: Optional[Text] = None
    pid_ns: Optional[Text] = None
    process_start: Optional[Text] = None


# -- reading ---------------------------------------------------------------------------------------


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# pydantic's error types in the words of a JSON file (its own messages name Python classes).
_KINDS = {"dict_type": "must be an object", "model_type": "must be an object", "model_attributes_type":
          "must be an object", "list_type": "must be a list", "string_type": "must be a string",
          "int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false"}


def schema_problems(exc: ValidationError) -> str:
    """pydantic's findings as one line: `config: must be an object (got [])`; three at most."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "the object"
        if error["type"] == "missing":
            parts.append(f"no {where}")
        else:
            what = _KINDS.get(error["type"]) or error["msg"].replace("Input should", "should")
            what = what[0].lower() + what[1:]
            parts.append(f"{where}: {what} (got {_short(error['input'])})")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f"; {more} more" if more > 0 else "")


def check_schema(value, schema: type[RunFile]) -> Optional[str]:
    """None when `value` (parsed JSON) fits `schema`, else what is wrong, for a message."""
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    try:
        schema.model_validate(value)
    except ValidationError as exc:
        return schema_problems(exc)
    return None


def lenient(value, schema: type[RunFile]) -> dict:
    """`value` with every top-level key that does not fit `schema` left out ({} for a non-object)."""
    if not isinstance(value, dict):
        return {}
    try:
        schema.model_validate(value)
        return value
    except ValidationError as exc:
        bad = {error["loc"][0] for error in exc.errors() if error["loc"]}
    return {k: v for k, v in value.items() if k not in bad}


def _damaged(store: Store, rel: str, made_by: str, what: str, remedy: str = "") -> InputError:
    remedy = remedy or "to make it again (and the stages after it)"
    return InputError(f"{store.uri_of(rel)} is damaged ({what}); it was changed outside the job. Rerun with "
                      f"--force {made_by} {remedy}, or restore the file")


def folder_in_place(store: Store, rel: str) -> bool:
    """A folder (or S3 keys under `rel/`) where the job writes a file: the file reads as absent, and the
    job would fail much later, writing it."""
    root = getattr(store, "root", None)  # a local run (wrapped stores pass `root` on): an empty folder too
    if isinstance(root, Path) and (root / rel).is_dir():
        return True
    return bool(store.list(rel))


def read_run_json(store: Store, rel: str, made_by: str, schema: type[RunFile], remedy: str = "") -> Optional[dict]:
    """The JSON object in `rel` once it fits `schema`; None when there is no such file. Damage (not JSON,
    not an object, wrong types or bounds, a folder in its place) is an InputError naming the file and
    `--force made_by`."""
    if not store.exists(rel):
        if folder_in_place(store, rel):
            raise _damaged(store, rel, made_by, "a folder where the file belongs", remedy)
        return None
    try:
        value = json.loads(store.read_text(rel))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(store, rel, made_by, str(exc), remedy) from None
    except RecursionError:  # [[[[... nested deeper than the parser goes
        raise _damaged(store, rel, made_by, "nested too deeply", remedy) from None
    problem = check_schema(value, schema)
    if problem:
        raise _damaged(store, rel, made_by, problem, remedy)
    return value


def read_json_object(store: Store, rel: str, made_by: str, text_keys: tuple[str, ...] = (),
                     remedy: str = "", schema: type[RunFile] = RunFile) -> dict:
    """The JSON object in `rel` (which must exist), checked against `schema`, whose `text_keys` hold strings."""
    value = read_run_json(store, rel, made_by, schema, remedy)
    if value is None:
        raise _damaged(store, rel, made_by, "the file is missing", remedy)
    missing = [k for k in text_keys if not isinstance(value.get(k), str)]
    if missing:
        raise _damaged(store, rel, made_by, f"no {', '.join(missing)}", remedy)
    return value


def download_run_folder(store: Store, rel: str, local_dir: Path, made_by: str) -> list[str]:
    """Download a folder a finished stage wrote (adapter/, merged/). Gone although the stage's marker says
    done means it was deleted outside the job: exit 2 naming it and `--force made_by`, not "check the path"."""
    if not store.list(rel):
        raise _damaged(store, rel + "/", made_by, "the folder is missing or empty although stage "
                       f"{made_by} is marked done", "to make it again (and the stages after it)")
    return store.download_dir(rel, local_dir)


def read_jsonl(store: Store, rel: str, made_by: str, keys: tuple[str, ...] = (),
               allow_empty: bool = False) -> list[dict]:
    """Every record of a JSON Lines file; each must be an object holding `keys`."""
    if not store.exists(rel):
        raise _damaged(store, rel, made_by, "the file is missing" if not folder_in_place(store, rel)
                       else "a folder where the file belongs")
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


def _peft_problem(folder: Path) -> Optional[str]:
    """What peft itself says about the config (its dozens of keys beyond the ones AdapterConfig names): the
    stages hand the folder to peft next, and a value it rejects would be a traceback there."""
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any refusal of peft's (TypeError, ValueError, ...) is the damage
        return f"peft cannot read it: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None


def check_adapter(folder: Path, uri: str) -> None:
    """A downloaded adapter/ folder is what train saved: a damaged one exits 2 naming the file and the
    way out, instead of failing deep inside peft (a TypeError for `"r": "x"`)."""
    from job.model_files import safetensors_problem

    problems = []
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        problem = check_schema(config, AdapterConfig) or _peft_problem(folder)
        if problem:
            problems.append(f"adapter_config.json is not a PEFT adapter config ({problem})")
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
