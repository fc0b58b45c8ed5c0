"""The four stages, declared in order with what each depends on.

Stage modules are imported lazily: `job plan` and `job config` must not pay for importing torch.
"""

from __future__ import annotations

from job.config import Config
from job.pipeline import Stage


def storage_options(cfg: Config) -> dict:
    """Keyword arguments for `job.storage.open_store` from the storage section."""
    s = cfg.storage
    return {"endpoint_url": s.endpoint_url or None, "max_attempts": s.max_attempts,
            "max_concurrency": s.max_concurrency, "multipart_chunk_mb": s.multipart_chunk_mb}


def _lazy(module: str):
    def run(cfg, ctx):
        import importlib

        return importlib.import_module(f"job.stages.{module}").run(cfg, ctx)

    return run


def all_stages() -> list[Stage]:
    return [
        Stage("format", _lazy("format"), config_keys=("data", "prompt"),
              outputs=("data",)),
    ]


STAGE_NAMES = ("format", "train", "merge", "evaluate")
