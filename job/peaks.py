"""Measured peaks of one stage: GPU memory (PyTorch's allocator) and host memory.

Each stage records them in its marker next to what the memory plan expected (job/memory_plan.py), so
a plan can be checked against a run. Host memory is measured two ways, because memory-mapped model files
(safetensors, GGUF) count in a process's RSS while it reads them, although the kernel can drop those
pages at any time (they are the file's, not the process's):
- host_peak_gb: the peak of anonymous memory (RssAnon, sampled every 50 ms): what the host must really
  have for the stage; the plan's host figure is this.
- host_peak_rss_gb: the peak RSS including mapped file pages (VmHWM). Stages share one process, so the
  high-water mark is reset at the stage's start (`echo 5 > /proc/self/clear_refs`, Linux 4.0+); where
  that is not possible it is the process's lifetime peak, and host_peak_scope says "process".
"""

from __future__ import annotations

import resource
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

GiB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_host_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    peak = status_kib("VmHWM")
    if peak is not None:
        return peak * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class _AnonSampler(threading.Thread):
    """The peak of RssAnon while the stage runs (no kernel high-water mark exists for it)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(name="peak-memory", daemon=True)
        self.interval, self.peak, self._done = interval, status_kib("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            now = status_kib("RssAnon")
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def stop(self) -> int | None:
        self._done.set()
        self.join()
        now = status_kib("RssAnon")
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now
        return None if self.peak is None else self.peak * 1024


def _cuda():
    torch = sys.modules.get("torch")  # never import torch only to measure: format runs without it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch
    return None


_gpu_peak_before_reset = 0  # the running stage's GPU peak before one of its parts reset PyTorch's counter


def reset_gpu_peak() -> None:
    """Reset PyTorch's peak counter so a part of a stage (one model in evaluate, the training loop) can
    read its own peak, without losing the stage's peak that `measured` records."""
    global _gpu_peak_before_reset
    torch = _cuda()
    if torch is not None:
        _gpu_peak_before_reset = max(_gpu_peak_before_reset, torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()


@contextmanager
def measured(record: dict) -> Iterator[None]:
    """Fill `record` with the stage's peaks: host_peak_gb (anonymous), host_peak_rss_gb (with mapped
    files, host_peak_scope) and gpu_peak_gb (None without CUDA)."""
    scope = "stage" if reset_host_peak() else "process"
    sampler = _AnonSampler()
    sampler.start()
    global _gpu_peak_before_reset
    _gpu_peak_before_reset = 0
    torch = _cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        anon = sampler.stop()
        record["host_peak_gb"] = round(anon / GiB, 2) if anon is not None else None
        record["host_peak_rss_gb"] = round(rss_peak_bytes() / GiB, 2)
        record["host_peak_scope"] = scope
        torch = _cuda()  # the stage may have started CUDA
        record["gpu_peak_gb"] = (round(max(_gpu_peak_before_reset, torch.cuda.max_memory_reserved()) / GiB, 2)
                                 if torch is not None else None)
