"""Liger kernels (Triton) for RoPE, RMSNorm and SwiGLU in training: fewer kernel launches and less
activation memory. On an H200, 7B QLoRA with varlen attention: 15,612 tokens/s and 102 GiB against
12,304 and 121 GiB without (docs/benchmarks.md).

The loss stays transformers' own (trl keeps its own LM head and loss): Liger's cross-entropy and fused
linear cross-entropy are not applied. liger-kernel needs triton, so it is in the container image and
the `gpu` extra, not in the CPU install; without it the job trains the same model, slower, and says why.

Note: liger patches the architecture's module (modeling_llama.apply_rotary_pos_emb, ...) for the
whole process, not only the model it is applied to: compare with and without it in separate processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from job.config import Config
from job.errors import InputError


def choose_liger(cfg: Config, model_dir: Path) -> tuple[bool, str]:
    """Whether Liger kernels will be applied, and why (or why not). train.liger: true that cannot be
    honoured is a configuration error (InputError, exit 2)."""
    setting = cfg.train.liger
    if setting is False:
        return False, "off (train.liger: false)"
    problem = unavailable_reason(model_dir)
    if problem is None:
        return True, ("required by train.liger: true" if setting is True else "auto: CUDA and liger-kernel installed")
    if setting is True:
        raise InputError(f"train.liger: true, but Liger kernels cannot be used here: {problem}; "
                         "set train.liger: auto or false")
    return False, f"auto: not used, {problem}"


def unavailable_reason(model_dir: Path) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (Liger's Triton kernels run on GPUs)"
    # liger-kernel 0.8.5 logs a WARNING for each optional backend it cannot import (CuTe DSL, Ascend NPU)
    # on every run; neither is used on NVIDIA GPUs with Triton, so only its errors are worth a log line.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        return (f"liger-kernel is not installed ({exc}); it is in the container image, or "
                "`pip install -e \".[gpu]\"`")
    model_type = model_type_of(model_dir)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type {model_type!r}"
    return None


def model_type_of(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def apply_liger(model) -> None:
    """RoPE, RMSNorm and SwiGLU kernels on this model; the loss is left to transformers/trl."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
