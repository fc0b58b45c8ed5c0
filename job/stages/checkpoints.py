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
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from job import distributed
from job.clock import utc_timestamp
from job.distributed import SINGLE, Ranks
from job.errors import InputError
from job.layout import CHECKPOINTS, LATEST, TENSORBOARD
from job.model_files import safetensors_problem
from job.run_files import Latest, read_run_json
from job.storage import Store


@dataclass
class ResumePoint:
    step: int
    path: Path
    tokens_seen: int
    settings: dict
    """Micro-batch size, packing length, checkpointing the run was started with: a resume keeps
    them even on another card, so the data position and the effective batch stay the same."""
    processes: int = 1
    """How many GPU processes trained up to this checkpoint."""


def find_resume_checkpoint(store: Store, fingerprint: str, local_root: Path, log: logging.Logger,
                           ranks: Ranks = SINGLE) -> Optional[ResumePoint]:
    """Download the checkpoint LATEST points to (if any) into a fresh local folder.

    In a multi-GPU run the first process of each machine downloads it and records what it found in
    `resume.json` there; the other processes of the machine read that record."""
    record = local_root / "resume.json"
    with distributed.local_main_first(ranks):
        if ranks.is_local_main:
            shutil.rmtree(local_root, ignore_errors=True)
            point = _download_resume_point(store, fingerprint, local_root, log)
            if point is not None and ranks.distributed:
                record.write_text(json.dumps({**asdict(point), "path": str(point.path)}))
            return point
    if not record.is_file():
        return None
    fields = json.loads(record.read_text())
    return ResumePoint(**{**fields, "path": Path(fields["path"])})


def _download_resume_point(store: Store, fingerprint: str, local_root: Path,
                           log: logging.Logger) -> Optional[ResumePoint]:
    latest = _read_latest(store)
    if latest is None:
        return None
    if latest.get("fingerprint") != fingerprint:
        log.warning("%s was made with other settings (fingerprint %s, now %s): starting over",
                    LATEST, latest.get("fingerprint"), fingerprint)
        return None
    t0 = time.monotonic()
    name, local, state = _download_usable_checkpoint(store, latest, local_root, log)
    log.info("resuming from %s (step %d), downloaded in %.1f s", store.uri_of(f"{CHECKPOINTS}/{name}"),
             state["global_step"], time.monotonic() - t0)
    return ResumePoint(step=int(state["global_step"]), path=local,
                       tokens_seen=int(state.get("num_input_tokens_seen", 0)),
                       settings=latest.get("settings", {}), processes=int(latest.get("processes", 1)))


# -- a damaged checkpoint --------------------------------------------------------------------------
#
# LATEST is published only after every file of its checkpoint was uploaded, and downloads are verified
# against the stored object, so a checkpoint LATEST names can only be unusable when the store was
# changed behind the job's back: a lifecycle rule or a person deleted files, or a copy of the run was
# synced file by file (SageMaker's /opt/ml/checkpoints sync can restore LATEST without the files it
# names after a spot interruption). Then the job resumes from the newest older checkpoint that is
# complete, with a warning: that is exactly the state a preemption right after that checkpoint would
# have left (optimizer, scheduler, RNG and data position all come from it), so nothing is mixed, and
# only the steps since then are redone. Starting over silently would throw away the whole run, and a
# traceback would help nobody; when no checkpoint is usable the job stops with exit 2 and says how to
# go on (--force train).


def _read_latest(store: Store) -> Optional[dict]:
    """LATEST checked against its schema (job/run_files.py Latest), None when there is none."""
    return read_run_json(store, LATEST, "train", Latest, remedy="to start training over (this deletes checkpoints/)")


def _download_usable_checkpoint(store: Store, latest: dict, local_root: Path,
                                log: logging.Logger) -> tuple[str, Path, dict]:
    """(name, local folder, trainer state) of LATEST's checkpoint, or else of the newest older
    checkpoint in storage that is complete; InputError (exit 2) when none is."""
    name = latest["checkpoint"]
    listed = set(latest.get("files", []))
    older = sorted({p.split("/", 1)[0] for p in store.list(CHECKPOINTS) if p.startswith("checkpoint-")},
                   key=_step_of, reverse=True)
    problems = []
    for candidate in [name] + [n for n in older if _step_of(n) < _step_of(name)]:
        # Every checkpoint of a run holds the files LATEST lists, but for the RNG states (one per GPU).
        required = listed if candidate == name else {f for f in listed if not f.startswith("rng_state")}
        files = set(store.list(f"{CHECKPOINTS}/{candidate}"))
        problem = ("no files" if not files else
                   f"missing {', '.join(sorted(required - files))}" if required - files else None)
        local = local_root / candidate
        if problem is None:
            store.download_dir(f"{CHECKPOINTS}/{candidate}", local)
            problem = checkpoint_problem(local, _step_of(candidate))
        if problem is None:
            if problems:
                log.warning("%s: resuming from the older checkpoint %s instead; the steps after it are trained "
                            "again", problems[0], store.uri_of(f"{CHECKPOINTS}/{candidate}"))
            return candidate, local, json.loads((local / "trainer_state.json").read_text())
        problems.append(f"checkpoint {store.uri_of(f'{CHECKPOINTS}/{candidate}')} is unusable ({problem})")
        shutil.rmtree(local, ignore_errors=True)
    raise InputError(f"cannot resume training from {store.uri_of(LATEST)}: {'; '.join(problems)}, and no older "
                     "checkpoint is complete. Rerun with --force train to start training over (this deletes "
                     f"{CHECKPOINTS}/), or restore the checkpoint's files")


def _step_of(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def checkpoint_problem(folder: Path, step: int) -> Optional[str]:
    """What is wrong with a downloaded checkpoint folder, or None. Cheap structural checks that catch
    truncated or overwritten files before the Trainer fails deep inside torch.load: the JSON files
    parse, trainer_state.json is at the folder's step, every safetensors file is as long as its header
    says, and every torch.save file (a zip archive) passes its CRC check."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json unreadable ({type(exc).__name__})"
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"trainer_state.json is not at step {step}"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
                return f"{rel} {problem}"
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:  # torch.save writes a zip archive
                    if archive.testzip() is not None:
                        return f"{rel} fails its CRC check"
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, MemoryError) as exc:
            return f"{rel} is damaged ({type(exc).__name__})"
    return None


class CheckpointSync(TrainerCallback):
    """Uploads each checkpoint the trainer saves, then publishes it in LATEST and prunes old ones.

    Also asks the trainer for a checkpoint every `every_minutes`, and for a checkpoint and a stop
    when SIGTERM arrived (`stop`). Uploads run on one background thread, in order, so training goes
    on while the network works; the trainer never touches a checkpoint folder after saving it, and
    local folders are deleted only after their upload finished.
    """

    def __init__(self, store: Store, fingerprint: str, keep: int, every_minutes: float, background: bool,
                 stop, tensorboard_dir: Path, log: logging.Logger, settings: dict, ranks: Ranks = SINGLE):
        self.store, self.fingerprint, self.keep, self.settings = store, fingerprint, keep, settings
        self.ranks = ranks
        self.every_seconds = every_minutes * 60
        self.stop, self.tensorboard_dir, self.log = stop, tensorboard_dir, log
        self.executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
                         if background else None)
        self.pending: list[Future] = []
        self.last_save = time.monotonic()
        self.last_uploaded_step: Optional[int] = None
        # time.monotonic() of the last upload; progress lines show its age
        self.last_uploaded_at: Optional[float] = None
        self.uploaded_steps: list[int] = []

    # -- trainer events ------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        stop_now = self.stop is not None and self.stop.is_set()
        time_due = self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds
        # Every rank must take the same decision (a SIGTERM may reach only one of them, clocks drift):
        # one tiny all-reduce per step; nothing in a single-process run.
        stop_now, time_due = distributed.any_rank(stop_now, time_due)
        if stop_now:
            if self.stop is not None and not self.stop.is_set():
                self.stop.set_from_peer()
            control.should_save = True
            control.should_training_stop = True
        elif time_due:
            control.should_save = True
        elif state.max_steps > 0 and state.global_step >= state.max_steps:
            # The last step is checkpointed too: a kill during the adapter upload then costs no training.
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()
        if self.ranks.distributed:
            distributed.barrier()  # every rank has written its RNG state into the folder
            if not self.ranks.is_main:
                return control  # one process uploads
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
        rel = f"{CHECKPOINTS}/{folder.name}"
        self.store.delete(rel)  # leftovers of an interrupted upload of the same step
        files = self.store.upload_dir(folder, rel)
        latest = {"checkpoint": folder.name, "step": step, "fingerprint": self.fingerprint, "files": sorted(files),
                  "settings": self.settings, "processes": self.ranks.world_size,
                  "uploaded_at": utc_timestamp()}
        self.store.write_text(LATEST, json.dumps(latest, indent=2) + "\n")  # last: publishes the checkpoint
        self.last_uploaded_step, self.last_uploaded_at = step, time.monotonic()
        self.uploaded_steps.append(step)
        self.log.info("checkpoint %d uploaded to %s in %.1f s", step, self.store.uri_of(rel), time.monotonic() - t0)
        self._prune(folder)
        self.upload_tensorboard()

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep` checkpoints in storage and only the newest one locally."""
        remote = sorted({p.split("/", 1)[0] for p in self.store.list(CHECKPOINTS) if p.startswith("checkpoint-")},
                        key=lambda n: int(n.rsplit("-", 1)[1]))
        for name in remote[: max(0, len(remote) - self.keep)]:
            self.store.delete(f"{CHECKPOINTS}/{name}")
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
