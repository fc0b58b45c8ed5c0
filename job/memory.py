"""Memory seen by the job (GPU free/total, host resident set and available), and running out of it.

Out of memory is an expected failure with its own exit code (5, errors.OutOfMemory): the model or batch
does not fit what this machine has, and the same settings on the same machine fail the same way.
`out_of_memory(stage)` wraps a stage where the pipeline runs it (and `job predict`), so every stage gets
the same one-paragraph message: the stage, the memory seen at that moment and the setting to change.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from job.errors import OutOfMemory

# What to change, per stage, when it runs out of memory (the message names it).
HINTS = {
    "format": "use a machine with more memory",
    "train": "lower train.micro_batch_size (a larger train.gradient_accumulation keeps the effective batch) or "
             "train.packing_length / train.max_seq_length, keep train.gradient_checkpointing on, or use a larger GPU",
    "merge": "set merge.device=cpu (the merge then needs host memory for the 16-bit model), or a larger GPU",
    "evaluate": "lower evaluate.batch_size or evaluate.max_new_tokens, or set evaluate.model=adapter (the 4-bit "
                "base with the adapter, as trained)",
    "export": "set export.check_prompts=0 (the tensor-by-tensor check still runs) or use a machine with more "
              "host memory",
    "predict": "lower --batch-size or --max-new-tokens, pass the base model with --adapter and --set "
               "evaluate.model=adapter (4 bits, as trained), or split a very large --input",
}


# PyTorch's CPU allocator reports a failed allocation as a plain RuntimeError with this text.
CPU_ALLOCATOR_MESSAGE = "DefaultCPUAllocator: can't allocate memory"


def is_host_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and CPU_ALLOCATOR_MESSAGE in str(exc))


def is_out_of_memory(exc: BaseException) -> bool:
    """Host memory (MemoryError, PyTorch's CPU allocator) or CUDA out of memory (torch.OutOfMemoryError,
    which torch.cuda.OutOfMemoryError also names)."""
    if is_host_out_of_memory(exc):
        return True
    torch = sys.modules.get("torch")  # never import torch just to look at an exception
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(exc, oom)


def _meminfo_kb(field: str, path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_available_bytes() -> int | None:
    """What the host can still give this process: MemAvailable, capped by a cgroup v2 limit (a container's
    memory limit, which /proc/meminfo does not show). None where neither is readable."""
    available = _meminfo_kb("MemAvailable")
    result = available * 1024 if available is not None else None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, used = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 says "no limit" with a huge number, v2 with "max"
            left = max(0, int(limit) - used)
            result = left if result is None else min(result, left)
    return result


def host_rss_bytes() -> int | None:
    kb = _meminfo_kb("VmRSS", "/proc/self/status")
    return kb * 1024 if kb is not None else None


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device, or None without one."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.mem_get_info()
    except RuntimeError:  # a broken context after a hard failure: say what is known
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def describe() -> str:
    """'GPU 1.2 GiB free of 79.1 GiB, host RSS 5.3 GiB, 90.2 GiB available on the host' (what is known)."""
    parts = []
    gpu = gpu_memory()
    if gpu is not None:
        parts.append(f"GPU {_size(gpu[0])} free of {_size(gpu[1])}")
    rss, available = host_rss_bytes(), host_available_bytes()
    if rss is not None:
        parts.append(f"host RSS {_size(rss)}")
    if available is not None:
        parts.append(f"{_size(available)} available on the host")
    return ", ".join(parts) or "memory figures unavailable on this platform"


def out_of_memory_error(stage: str | None, exc: BaseException) -> OutOfMemory:
    kind = "host memory" if is_host_out_of_memory(exc) else "GPU memory"
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    where = "job predict" if stage == "predict" else f"stage {stage}" if stage else "the job"
    hint = HINTS.get(stage or "", "use a machine with more memory")
    rerun = ""
    if stage != "predict":
        rerun = "; then rerun: finished stages are kept, this one runs again"
    if stage in (None, "train"):
        # Those train settings are part of its fingerprint: checkpoints made with the old ones are stale.
        rerun += (" (training resumes from its last checkpoint with unchanged settings; after a change of "
                  "train.* settings, a run that already saved checkpoints needs --force train)")
    return OutOfMemory(f"{where} ran out of {kind} ({type(exc).__name__}{f': {first}' if first else ''}). "
                       f"Memory now: {describe()}. To fit: {hint}{rerun}.")


@contextlib.contextmanager
def out_of_memory(stage: str | None):
    """Turn running out of memory inside the block into OutOfMemory (exit 5) naming `stage`."""
    try:
        yield
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
        error = out_of_memory_error(stage, exc)
        del exc  # drop the frames (and the tensors they hold) before anything else allocates
        _free()
        raise error from None


def _free() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()
