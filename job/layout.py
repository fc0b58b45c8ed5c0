"""Where everything lives: every path of a run (under run_uri) and of the local work folder, named once.

The run (the contract in README "Run layout"):

    config.yaml                   the settings the results were made with
    _lease.json                   the writer's lease (job/lease.py)
    _stages/<stage>.json          a finished stage (written last); <stage>.started.json: partial results
    data/train.jsonl, data/eval.jsonl, data/stats.json        format
    checkpoints/checkpoint-<step>/, checkpoints/LATEST, checkpoints/trackers.json,
    tensorboard/, adapter/                                    train
    merged/                                                   merge
    export/                                                   export
    report/                                                   evaluate

The local work folder (platform.work_dir) has one scratch folder per stage; the merge stage's holds
the merged model it uploaded, which evaluate and export on the same machine reuse
(job/stages/merged.py).
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
LEASE = "_lease.json"
LEASE_PROBE = "_lease.probe-"  # + a random hex: the object that tests conditional writes on S3
MARKERS = "_stages"

DATA = "data"
TRAIN_DATA = f"{DATA}/train.jsonl"
EVAL_DATA = f"{DATA}/eval.jsonl"
STATS = f"{DATA}/stats.json"

CHECKPOINTS = "checkpoints"
LATEST = f"{CHECKPOINTS}/LATEST"
TRACKER_STATE = f"{CHECKPOINTS}/trackers.json"  # cleared with the checkpoints when training starts over
TENSORBOARD = "tensorboard"
ADAPTER = "adapter"
MERGED = "merged"
EXPORT = "export"
REPORT = "report"


def marker(stage: str, started: bool = False) -> str:
    """_stages/<stage>.json (finished) or _stages/<stage>.started.json (partial results exist)."""
    return f"{MARKERS}/{stage}{'.started' if started else ''}.json"


def stage_work_dir(work_root: Path, stage: str) -> Path:
    """The stage's scratch folder on this machine."""
    return Path(work_root) / stage


def local_merged(work_root: Path) -> Path:
    """The merged model as this machine's merge stage wrote it before uploading it to merged/."""
    return stage_work_dir(work_root, "merge") / MERGED


def local_merged_stamp(work_root: Path) -> Path:
    """The merge fingerprint local_merged() was written for (written after the upload)."""
    return stage_work_dir(work_root, "merge") / f"{MERGED}.fingerprint"
