"""Training progress for batch platforms: one log line per logging step instead of bars and raw dicts.

transformers' Trainer reports progress with a tqdm bar redrawn with carriage returns
(ProgressCallback) or, with disable_tqdm, by print()ing every log dict to stdout (PrinterCallback).
Neither reads well in `kubectl logs` or CloudWatch. `use_progress_log` replaces both:

- stderr not a terminal (or JOB_LOG_FORMAT=json): ProgressLog logs one line per logging step through
  the job's logger: step/total, loss, learning rate, grad norm, tokens/s, elapsed, ETA and the age of
  the last uploaded checkpoint; in json mode the same numbers are fields of the JSON object.
- a terminal: the bar stays, with the loss and learning rate shown on it instead of printed dicts.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def use_progress_log(trainer, log: logging.Logger, checkpoints=None, bars: bool = False) -> None:
    """Swap the Trainer's own progress reporting for ours. `checkpoints`: the CheckpointSync whose
    last upload the lines report (its last_uploaded_step and last_uploaded_at)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressBar() if bars else ProgressLog(log, checkpoints))


class QuietProgressBar(ProgressCallback):
    """The terminal bar, with loss and learning rate in its postfix instead of a dict per log. While
    it is drawn, log records (a checkpoint upload, a warning) are written above it with tqdm.write,
    so a line never starts in the middle of the bar."""

    def __init__(self):
        super().__init__()
        self.redirected: list[tuple[logging.StreamHandler, object]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                    self.redirected.append((handler, handler.setStream(_AboveTheBar(handler.stream))))

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        for handler, stream in self.redirected:
            handler.setStream(stream)
        self.redirected = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs.get('learning_rate', 0):.3g}",
                                          refresh=False)


class _AboveTheBar:
    """A stream for a logging handler: each record goes through tqdm.write (clear the bars, write,
    redraw them). The handler writes a record and its newline in one call."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


class ProgressLog(TrainerCallback):
    """One line per logging step on the main process (the Trainer averages the loss over processes)."""

    def __init__(self, log: logging.Logger, checkpoints=None):
        self.log, self.checkpoints = log, checkpoints
        self.started = 0.0
        self.start_step = 0
        self.last_time = 0.0
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts at its checkpoint's step: speed and ETA count this session's steps only.
        self.started = self.last_time = time.monotonic()
        self.start_step = state.global_step
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary dict: the stage's own lines report that
        now = time.monotonic()
        fields = progress_fields(state, logs, now - self.started, self.start_step,
                                 tokens=state.num_input_tokens_seen - self.last_tokens, window=now - self.last_time)
        fields.update(self._checkpoint_fields(now))
        self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        self.log.info("%s", progress_text(fields), extra={"fields": fields})

    def _checkpoint_fields(self, now: float) -> dict:
        sync = self.checkpoints
        step = getattr(sync, "last_uploaded_step", None)
        uploaded_at = getattr(sync, "last_uploaded_at", None)
        age = round(now - uploaded_at, 1) if uploaded_at is not None else None
        return {"checkpoint_step": step, "checkpoint_age_s": age}


def progress_fields(state, logs: dict, elapsed: float, start_step: int, tokens: int, window: float) -> dict:
    """The numbers of one progress line: tokens/s over the window since the previous line; the ETA
    from this session's mean step time."""
    step, total = state.global_step, state.max_steps
    done = step - start_step
    eta = elapsed / done * max(total - step, 0) if done > 0 and total > 0 else None
    return {
        "step": step,
        "total": total,
        "loss": _number(logs.get("loss")),
        "lr": _number(logs.get("learning_rate")),
        "grad_norm": _number(logs.get("grad_norm")),
        "tokens_per_s": round(tokens / window, 1) if window > 0 else None,
        "elapsed_s": round(elapsed, 1),
        "eta_s": round(eta, 1) if eta is not None else None,
        "epoch": _number(logs.get("epoch")),
    }


def progress_text(f: dict) -> str:
    """`train: step 3/40 loss 6.9510 lr 4.00e-05 grad_norm 0.0960 | 430 tokens/s | elapsed 0:02, ETA 0:28 |
    last checkpoint 2, 0:01 ago`"""
    parts = [f"train: step {f['step']}/{f['total']}"]
    if f["loss"] is not None:
        parts.append(f"loss {f['loss']:.4f}")
    if f["lr"] is not None:
        parts.append(f"lr {f['lr']:.2e}")
    if f["grad_norm"] is not None:
        parts.append(f"grad_norm {f['grad_norm']:.4f}")
    line = " ".join(parts)
    if f["tokens_per_s"] is not None:
        line += f" | {f['tokens_per_s']:,.0f} tokens/s"
    line += f" | elapsed {duration(f['elapsed_s'])}, ETA {duration(f['eta_s'])}"
    step, age = f.get("checkpoint_step"), f.get("checkpoint_age_s")
    if step is None:
        line += " | no checkpoint yet"
    elif age is None:
        line += f" | last checkpoint {step}, before this restart"
    else:
        line += f" | last checkpoint {step}, {duration(age)} ago"
    return line


def duration(seconds: Optional[float]) -> str:
    """0:07, 12:34, 3:02:15; '?' when unknown."""
    if seconds is None:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(value) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
