"""Experiment trackers for the train stage (train.report_to): TensorBoard, MLflow, Weights & Biases.

Each tracker takes its settings from its own environment variables (MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT, WANDB_DIR, ...). Three rules:
- the job never prompts: wandb without WANDB_API_KEY and WANDB_MODE runs offline (said in the log);
- a tracker never stops training: one that cannot be imported or set up, or fails while logging
  (a server that went away), is logged as a warning once and left out from then on;
- a resumed run continues the same tracker run: the wandb run id is derived from run_uri and the train
  fingerprint (with WANDB_RESUME=allow); the MLflow run id, which the server assigns, is kept in
  checkpoints/trackers.json and handed back through MLFLOW_RUN_ID. A user's own values always win.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from job.errors import InputError
from job.layout import TRACKER_STATE
from job.run_files import TrackerState, read_run_json


def requested(report_to) -> list[str]:
    """train.report_to as a list of tracker names ("none" or [] for no tracker)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [n for n in names if n != "none"]


def tracker_callbacks(report_to, ctx, tensorboard_dir, environ=os.environ) -> list:
    """Callbacks for the requested trackers, each guarded so its failures only warn."""
    log = ctx.log
    callbacks = []
    for name in requested(report_to):
        try:
            inner = _make(name, ctx, tensorboard_dir, environ)
        except Exception as exc:  # noqa: BLE001 - a missing or broken tracker must not stop training
            log.warning("train: tracker %s is not available (%s: %s); training goes on without it",
                        name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            continue
        callbacks.append(guarded(inner, name, log, ctx.store if name == "mlflow" else None))
    return callbacks


def _make(name: str, ctx, tensorboard_dir, environ):
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tensorboard_dir)))
    if name == "mlflow":
        import mlflow  # noqa: F401 - fail here, with a warning, when it is not installed
        from transformers.integrations import MLflowCallback

        run_id = _stored(ctx.store, ctx.log).get("mlflow_run_id")
        if run_id and "MLFLOW_RUN_ID" not in environ:
            environ["MLFLOW_RUN_ID"] = run_id
            ctx.log.info("train: continuing MLflow run %s", run_id)
        return MLflowCallback()
    if name == "wandb":
        import wandb  # noqa: F401
        from transformers.integrations import WandbCallback

        if not environ.get("WANDB_API_KEY") and not environ.get("WANDB_MODE"):
            environ["WANDB_MODE"] = "offline"  # wandb would otherwise ask for a key on the terminal
            ctx.log.warning("train: wandb has no WANDB_API_KEY and no WANDB_MODE: logging offline into %s "
                            "(`wandb sync` uploads it later)", environ.get("WANDB_DIR", "./wandb"))
        environ.setdefault("WANDB_RUN_ID", run_id_for(ctx))
        environ.setdefault("WANDB_RESUME", "allow")
        environ.setdefault("WANDB_CONSOLE", "off")  # the job's own log lines stay as they are
        return WandbCallback()
    raise ValueError(name)


def run_id_for(ctx) -> str:
    """Stable across restarts of one run (same run_uri, same training settings), different otherwise."""
    uri = getattr(ctx.store, "uri_of", lambda rel: "")("")
    return "qlora-" + hashlib.sha256(f"{uri}|{ctx.fingerprint}".encode()).hexdigest()[:16]


def _stored(store, log=None) -> dict:
    """checkpoints/trackers.json, checked against its schema (job/run_files.py). A damaged one costs only
    the MLflow run's continuity, never the training: a warning naming it, and a new MLflow run."""
    try:
        return read_run_json(store, TRACKER_STATE, "train", TrackerState) or {}
    except InputError as exc:
        if log is not None:
            log.warning("train: %s. Training goes on; MLflow starts a new run", exc)
        return {}


def guarded(inner, name: str, log: logging.Logger, store=None):
    """`inner` (a transformers TrainerCallback) whose exceptions become one warning; after a failure the
    tracker is left out. For MLflow, the run id is stored once its run exists (resume continues it)."""
    from transformers import TrainerCallback

    class Guarded(TrainerCallback):
        failed = False
        recorded = False

        def __repr__(self):
            return f"Guarded({type(inner).__name__})"

    def make_event(event: str):
        def handler(self, args, state, control, **kwargs):
            if self.failed:
                return None
            try:
                result = getattr(inner, event)(args, state, control, **kwargs)
            except Exception as exc:  # noqa: BLE001 - see the module docstring
                self.failed = True
                log.warning("train: tracker %s failed in %s (%s: %s); training goes on without it", name, event,
                            type(exc).__name__, (str(exc).splitlines() or [""])[0][:200])
                return None
            if store is not None and not self.recorded and event in ("on_train_begin", "on_log"):
                self.recorded = _record_mlflow_run(store, log)
            return result

        return handler

    for event in [e for e in dir(TrainerCallback) if e.startswith("on_")]:
        setattr(Guarded, event, make_event(event))
    return Guarded()


def _record_mlflow_run(store, log) -> bool:
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return False
    state = _stored(store)
    if state.get("mlflow_run_id") != run.info.run_id:
        store.write_text(TRACKER_STATE, json.dumps({**state, "mlflow_run_id": run.info.run_id}, indent=2) + "\n")
        log.info("train: MLflow run %s", run.info.run_id)
    return True
