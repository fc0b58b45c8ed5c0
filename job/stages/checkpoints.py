"""Checkpoints in object storage: upload as they are made, publish LATEST last, resume from it.

Layout under run_uri: checkpoints/checkpoint-<step>/... and checkpoints/LATEST, a small JSON file
written only after every file of that checkpoint is uploaded. A checkpoint is used for resuming only
through LATEST, so a half-uploaded one is never read. LATEST also records the train stage's
fingerprint: a checkpoint made with other settings is never resumed (the pipeline refuses earlier).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from job.storage import Store

PREFIX = "checkpoints"
LATEST = f"{PREFIX}/LATEST"
TENSORBOARD = "tensorboard"


@dataclass
class ResumePoint:
    step: int
    path: Path
    tokens_seen: int
    settings: dict
    """Micro-batch size, packing length, checkpointing the run was started with: a resume keeps
    them even on another card, so the data position and the effective batch stay the same."""


def find_resume_checkpoint(store: Store, fingerprint: str, local_root: Path, log: logging.Logger) -> Optional[ResumePoint]:
    """Download the checkpoint LATEST points to (if any) into a fresh local folder."""
    if not store.exists(LATEST):
        return None
    latest = json.loads(store.read_text(LATEST))
    if latest.get("fingerprint") != fingerprint:
        log.warning("checkpoints/LATEST was made with other settings (fingerprint %s, now %s): starting over",
                    latest.get("fingerprint"), fingerprint)
        return None
    name = latest["checkpoint"]
    shutil.rmtree(local_root, ignore_errors=True)
    local = local_root / name
    t0 = time.monotonic()
    files = store.download_dir(f"{PREFIX}/{name}", local)
    missing = sorted(set(latest.get("files", [])) - set(files))
    if missing:
        raise RuntimeError(f"checkpoint {store.uri_of(PREFIX + '/' + name)} lacks {missing} listed in LATEST")
    state = json.loads((local / "trainer_state.json").read_text())
    log.info("resuming from %s (step %d), downloaded in %.1f s", store.uri_of(f"{PREFIX}/{name}"),
             latest["step"], time.monotonic() - t0)
    return ResumePoint(step=int(latest["step"]), path=local, tokens_seen=int(state.get("num_input_tokens_seen", 0)),
                       settings=latest.get("settings", {}))


class CheckpointSync(TrainerCallback):
    """Uploads each checkpoint the trainer saves, then publishes it in LATEST and prunes old ones.

    Also asks the trainer for a checkpoint every `every_minutes`, and for a checkpoint and a stop
    when SIGTERM arrived (`stop`). Uploads run on one background thread, in order, so training goes
    on while the network works; the trainer never touches a checkpoint folder after saving it, and
    local folders are deleted only after their upload finished.
    """

    def __init__(self, store: Store, fingerprint: str, keep: int, every_minutes: float, background: bool,
                 stop, tensorboard_dir: Path, log: logging.Logger, settings: dict):
        self.store, self.fingerprint, self.keep, self.settings = store, fingerprint, keep, settings
        self.every_seconds = every_minutes * 60
        self.stop, self.tensorboard_dir, self.log = stop, tensorboard_dir, log
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload") if background else None
        self.pending: list[Future] = []
        self.last_save = time.monotonic()
        self.last_uploaded_step: Optional[int] = None
        self.uploaded_steps: list[int] = []

    # -- trainer events ------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop is not None and self.stop.is_set():
            control.should_save = True
            control.should_training_stop = True
        elif self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds:
            control.should_save = True
        elif state.max_steps > 0 and state.global_step >= state.max_steps:
            # The last step is checkpointed too: a kill during the adapter upload then costs no training.
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.executor is None:
            self._upload(folder, state.global_step)
        else:
            self._raise_failed_uploads()
            # One worker: uploads finish in order, so LATEST only ever moves forward.
            self.pending.append(self.executor.submit(self._upload, folder, state.global_step))
        return control

    # -- uploads -------------------------------------------------------------------------------

    def _upload(self, folder: Path, step: int) -> None:
        t0 = time.monotonic()
        rel = f"{PREFIX}/{folder.name}"
        self.store.delete(rel)  # leftovers of an interrupted upload of the same step
        files = self.store.upload_dir(folder, rel)
        latest = {"checkpoint": folder.name, "step": step, "fingerprint": self.fingerprint, "files": sorted(files),
                  "settings": self.settings,
                  "uploaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.store.write_text(LATEST, json.dumps(latest, indent=2) + "\n")  # last: publishes the checkpoint
        self.last_uploaded_step = step
        self.uploaded_steps.append(step)
        self.log.info("checkpoint %d uploaded to %s in %.1f s", step, self.store.uri_of(rel), time.monotonic() - t0)
        self._prune(folder)
        self.upload_tensorboard()

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep` checkpoints in storage and only the newest one locally."""
        remote = sorted({p.split("/", 1)[0] for p in self.store.list(PREFIX) if p.startswith("checkpoint-")},
                        key=lambda n: int(n.rsplit("-", 1)[1]))
        for name in remote[: max(0, len(remote) - self.keep)]:
            self.store.delete(f"{PREFIX}/{name}")
        for local in newest.parent.glob("checkpoint-*"):
            if local != newest and int(local.name.rsplit("-", 1)[1]) < int(newest.name.rsplit("-", 1)[1]):
                shutil.rmtree(local, ignore_errors=True)

    def upload_tensorboard(self) -> None:
        """Upload a snapshot: the event files keep growing while the writer runs, and an upload
        must not see a file change size under it. Event files are append-only, so any prefix is valid."""
        if not (self.tensorboard_dir.is_dir() and any(self.tensorboard_dir.rglob("*"))):
            return
        snapshot = self.tensorboard_dir.with_name(self.tensorboard_dir.name + ".snapshot")
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(self.tensorboard_dir, snapshot)
        self.store.upload_dir(snapshot, TENSORBOARD)
        shutil.rmtree(snapshot, ignore_errors=True)

    def _raise_failed_uploads(self) -> None:
        done = [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if not f.done()]
        for future in done:
            future.result()  # re-raises a StorageError from the upload thread in the training thread

    def finish(self) -> Optional[int]:
        """Wait for every upload; return the step LATEST now points to."""
        for future in self.pending:
            future.result()
        self.pending = []
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        return self.last_uploaded_step
