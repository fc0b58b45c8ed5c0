"""Glue between the CLI and the pipeline: open the run's storage, record the config, run stages."""

from __future__ import annotations

import logging

from job.config import Config, to_yaml
from job.lease import Lease
from job.pipeline import Pipeline
from job.platform import StopRequest, detect, work_dir
from job.stages import all_stages, storage_options
from job.storage import open_store

log = logging.getLogger("job")


def pipeline_for(cfg: Config, stop=None) -> Pipeline:
    store = open_store(cfg.run_uri, **storage_options(cfg))
    return Pipeline(all_stages(), cfg, store, work_dir(cfg), stop=stop)


def run_pipeline(cfg: Config, stages: list[str], force: str | None = None) -> dict:
    stop = StopRequest().install()
    try:
        pipeline = pipeline_for(cfg, stop)
        # One writer per run_uri: the lease is taken before anything is written, renewed while the
        # stages run and released at the end; once lost, every write fails and the job exits 4.
        with Lease(pipeline.store, cfg.storage.lease_seconds, stop) as lease:
            pipeline.store = lease.guard(pipeline.store)
            log.info("run %s on %s: stages %s%s", cfg.run_uri, detect(), ",".join(stages),
                     f" (forcing {force})" if force else "")
            pipeline.store.write_text("config.yaml", to_yaml(cfg))
            return pipeline.run(stages, force)
    finally:
        stop.uninstall()
