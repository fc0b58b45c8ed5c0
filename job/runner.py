"""Between the CLI and the pipeline: open the run's store, take its lease and run the stages on rank 0;
the other ranks of a multi-GPU run follow rank 0 (distributed.RankProtocol)."""

from __future__ import annotations

import importlib
import logging
import threading

from job import distributed
from job.config import Config
from job.distributed import SINGLE, Ranks
from job.errors import InputError, JobError
from job.lease import lease_for
from job.pipeline import Pipeline
from job.platform import StopRequest, detect, work_dir
from job.stages import all_stages
from job.storage import LocalStore, open_store

log = logging.getLogger("job")


def pipeline_for(cfg: Config, stop=None, ranks: Ranks = SINGLE) -> Pipeline:
    store = open_store(cfg.run_uri, cfg.storage)
    if isinstance(store, LocalStore) and store.root.exists() and not store.root.is_dir():
        # Else the lease would fail to create _lease.json inside it with a puzzling "File exists".
        raise InputError(f"run_uri {cfg.run_uri} is a file, not a folder: point run_uri at a folder (it is "
                         "created if missing)")
    return Pipeline(all_stages(), cfg, store, work_dir(cfg), stop=stop, ranks=ranks)


def run_pipeline(cfg: Config, stages: list[str], force: str | None = None) -> dict:
    """Run the stages. Under torchrun/accelerate (several processes), rank 0 runs the pipeline and
    the other ranks join it for training only (job/distributed.py).

    A process of the run that dies (its node killed or lost) breaks every collective call of the
    others: gloo and NCCL raise a RuntimeError there, which becomes PeerLost (a retryable exit code
    and one line naming the peer) instead of an "unexpected error" with a traceback."""
    ranks = distributed.ranks_from_env()
    try:
        return _run_ranks(cfg, stages, force)
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001 - only a lost peer is translated; anything else is re-raised
        peer = distributed.lost_peer(exc) if ranks.distributed else None
        if peer is None:
            raise
        raise distributed.peer_lost_error(ranks, peer, exc) from None


def _run_ranks(cfg: Config, stages: list[str], force: str | None) -> dict:
    ranks = distributed.setup(cfg.train.distributed_timeout_minutes)
    if ranks.distributed and "train" in stages:
        _import_in_background("job.stages.train")
    if not ranks.is_main:
        logging.getLogger("job").setLevel(logging.WARNING)  # rank 0 tells the story; others report problems
    stop = StopRequest().install()
    try:
        pipeline = pipeline_for(cfg, stop, ranks)
        if not ranks.is_main:
            pipeline.protocol.wait(pipeline.run_announced)  # train with rank 0, then end as it ends
            return {}
        # The waiting ranks end with rank 0's exit code, whatever ends the pipeline.
        with pipeline.protocol.ending():
            # One writer per run_uri: the lease is taken before anything is written, renewed while the
            # stages run and released at the end; once lost, every write fails and the job exits 4.
            # (storage.lease: false takes none, for stores that ignore conditional writes.)
            with lease_for(pipeline.store, cfg.storage, stop) as lease:
                pipeline.store = lease.guard(pipeline.store)
                log.info("run %s on %s: stages %s%s%s", cfg.run_uri, detect(), ",".join(stages),
                         f" (forcing {force})" if force else "",
                         f", {ranks.world_size} processes" if ranks.distributed else "")
                # config.yaml is written by the pipeline at the first write of a stage (after the stale
                # checks and the stage's input checks), so a refused run leaves the run folder as it was.
                return pipeline.run(stages, force)
    finally:
        stop.uninstall()


def _import_in_background(module: str) -> None:
    """Start importing `module` in a thread. The train stage's imports (peft, transformers,
    bitsandbytes, which pull in torch's compiler modules) take 10-30 s of one core before the first
    step; in a multi-process run every process paid them at the start of train, at the same time,
    while the processes other than rank 0 had sat idle through rank 0's lease and format stage. Now
    they overlap those. A failed import is left to the stage, which imports the module again and
    reports the error; Python's import lock makes the stage wait for an import still under way."""
    def load() -> None:
        try:
            importlib.import_module(module)
        except BaseException:  # noqa: BLE001, S110 - the stage's own import raises it again, where it is reported
            pass

    threading.Thread(target=load, name=f"import {module}", daemon=True).start()
