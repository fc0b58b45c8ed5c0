"""Liger kernels (Triton) for RoPE, RMSNorm and SwiGLU in training: fewer kernel launches and less
activation memory. On an H200, 7B QLoRA with varlen attention: 15,612 tokens/s and 102 GiB against
12,304 and 121 GiB without (docs/benchmarks.md).

The loss stays transformers' own (trl keeps its own LM head and loss): Liger's cross-entropy and fused
linear cross-entropy are not applied. liger-kernel needs triton, so it is in the container image and
the `gpu` extra, not in the CPU install; without it the job trains the same model, slower, and says why.

Liger patches the architecture's module (modeling_llama.apply_rotary_pos_emb, LlamaRMSNorm, LlamaMLP,
...) for the whole process, not only the model it is applied to. Its Triton kernels then run in every
later model of that class, including the merge's and evaluate's CPU models, which fails ("Pointer
argument (at 0) cannot be accessed from Triton (cpu tensor?)", issue 20). KernelPatches records
transformers' modeling modules (their names and their classes' attributes) before the patch and puts
them back when training ends, so each stage after it starts with transformers' own code.
"""

from __future__ import annotations

import json
import logging
import sys
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


def apply_liger(model, patches: "KernelPatches | None" = None) -> None:
    """RoPE, RMSNorm and SwiGLU kernels on this model; the loss is left to transformers/trl. With
    `patches`, what Liger changes in transformers' modules is recorded first, to be undone after training."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    if patches is not None:
        patches.record()
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


MODELING_PREFIX = "transformers.models."


class KernelPatches:
    """Undo what kernel patches (Liger's) change in transformers' modeling modules, as a context manager
    around training: record() (right before patching, once the model's module is imported) keeps each
    loaded modeling module's names and the attributes of the classes defined in it; leaving the block
    puts back every name and attribute that was replaced. The trained model's own modules keep their
    patched forwards (they are not used for a forward again)."""

    def __init__(self):
        self.modules: dict[str, dict] = {}  # module name -> its names as recorded
        self.classes: list[tuple[type, dict]] = []  # (class, its attributes as recorded)
        self.restored: list[str] = []

    def record(self) -> None:
        for name, module in list(sys.modules.items()):
            if not name.startswith(MODELING_PREFIX) or name in self.modules or module is None:
                continue
            names = dict(vars(module))
            self.modules[name] = names
            self.classes += [(obj, dict(vars(obj))) for obj in names.values()
                             if isinstance(obj, type) and obj.__module__ == name]

    def restore(self) -> list[str]:
        """Put everything recorded back; returns what had changed ("module.name", "Class.attr")."""
        changed = []
        for name, recorded in self.modules.items():
            module = sys.modules.get(name)
            if module is None:
                continue
            changed += _restore(module, vars(module), recorded, name.rsplit(".", 1)[-1])
        for cls, recorded in self.classes:
            changed += _restore(cls, cls.__dict__, recorded, cls.__qualname__)
        self.restored += changed
        return changed

    def __enter__(self) -> "KernelPatches":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _restore(owner, current, recorded: dict, label: str) -> list[str]:
    """Names added since (lazy imports, caches) are left alone: patches replace names that exist."""
    changed = []
    for key, value in recorded.items():
        if current.get(key, _MISSING) is not value:
            setattr(owner, key, value)
            changed.append(f"{label}.{key}")
    return changed


_MISSING = object()
