"""Where the job runs (SageMaker, Kubernetes, RunPod, local), its local folders, stop signals, and giving
memory back between stages."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
from pathlib import Path

from job.config import Config
from job.errors import ConfigError

log = logging.getLogger("job.platform")


def detect(environ=os.environ) -> str:
    if environ.get("SM_TRAINING_ENV") or environ.get("TRAINING_JOB_NAME") or Path("/opt/ml/input/config").is_dir():
        return "sagemaker"
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    if environ.get("RUNPOD_POD_ID"):
        return "runpod"
    return "local"


def free_gpu_memory() -> None:
    """Collect dropped models and hand the GPU memory PyTorch keeps cached back to the device, for what
    runs next in this process (the next stage, the next model, another process's merge)."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cache_dir(cfg: Config, environ=os.environ) -> Path:
    """Downloads (the base model) and scratch space: model.cache_dir, $JOB_CACHE_DIR, or ~/.cache/qlora-job."""
    root = cfg.model.cache_dir or environ.get("JOB_CACHE_DIR") or "~/.cache/qlora-job"
    return Path(root).expanduser()


def work_dir(cfg: Config) -> Path:
    """Local scratch for this run: stable across restarts of the same run_uri, so work can be reused."""
    digest = hashlib.sha256(cfg.run_uri.encode()).hexdigest()[:12]
    path = cache_dir(cfg) / "work" / digest
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, a file in the way, a name too long: the setting, not a bug
        raise ConfigError(f"cannot create the work folder {path} under model.cache_dir (or JOB_CACHE_DIR): "
                          f"{exc.strerror or exc}; point model.cache_dir at a writable folder") from None
    return path


def keep_compiled_kernels(cfg: Config, environ=os.environ) -> None:
    """Keep torch.compile's kernels (flex attention) with the model cache, so a restart on a node
    that kept the cache (a volume, /workspace) skips most of the first step's compilation."""
    environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir(cfg, environ) / "inductor"))


class StopRequest:
    """Turns SIGTERM (spot preemption, pod eviction, `docker stop`) into a flag the trainer polls.

    The handler only sets a flag: the current optimizer step finishes, then the train stage saves
    and uploads a checkpoint and exits 75. A second SIGTERM does the same (it is not fatal), and
    SIGINT keeps its default (KeyboardInterrupt) so a person at a terminal can still stop at once.
    """

    def __init__(self):
        self.event = threading.Event()
        self.received_at: float | None = None
        self._previous = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        import time

        if not self.event.is_set():
            self.received_at = time.monotonic()
            log.warning("SIGTERM received: finishing the current step, then saving a checkpoint")
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def set_from_peer(self) -> None:
        """Another process of a multi-GPU run got the SIGTERM: this one stops the same way."""
        import time

        if not self.event.is_set():
            self.received_at = time.monotonic()
            log.warning("another GPU process received SIGTERM: saving a checkpoint with it, then stopping")
        self.event.set()

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
