"""Measured peaks of one stage: GPU memory (PyTorch's allocator) and host memory (the process's RSS).

Each stage records them in its marker next to what the memory plan expected (job/memory_plan.py), so
a plan can be checked against a run. Host peaks are per stage although stages share one process:
Linux lets a process reset its high-water mark (`echo 5 > /proc/self/clear_refs`, since Linux 4.0), so
VmHWM read at the end of a stage is that stage's peak. Where that is not possible, the lifetime peak
(getrusage) is reported and marked as such.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

GiB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_host_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _host_peak_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _cuda():
    torch = sys.modules.get("torch")  # never import torch only to measure: format runs without it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch
    return None


@contextmanager
def measured(record: dict) -> Iterator[None]:
    """Fill `record` with the stage's peaks: host_peak_gb (with host_peak_scope) and gpu_peak_gb."""
    scope = "stage" if _reset_host_peak() else "process"
    torch = _cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        record["host_peak_gb"] = round(_host_peak_bytes() / GiB, 2)
        record["host_peak_scope"] = scope
        torch = _cuda()  # the stage may have started CUDA
        record["gpu_peak_gb"] = round(torch.cuda.max_memory_reserved() / GiB, 2) if torch is not None else None
