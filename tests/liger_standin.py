"""A stand-in for Liger's kernels, which need Triton and a GPU: the same kind of patch on the same
transformers classes (modeling_llama's apply_rotary_pos_emb, LlamaRMSNorm, LlamaMLP replaced in the module,
LlamaRMSNorm.forward on the class), with "kernels" that compute the same values while training and fail
like Triton on a CPU tensor in any later inference forward (the merge's and evaluate's CPU models, issue 20).

`python tests/liger_standin.py ARGS` runs `job ARGS` with the stand-in installed as liger_kernel and
Liger reported available, so the train stage applies it through job/liger.py as it would apply Liger.
"""

from __future__ import annotations

import sys
import types

TRITON_ERROR = "Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)"


def _kernel(original):
    import torch

    def patched(*args, **kwargs):
        if torch.is_inference_mode_enabled():  # training never runs in inference mode; the merge check does
            raise ValueError(TRITON_ERROR)
        return original(*args, **kwargs)

    patched.standin = True
    return patched


def apply_standin(model=None, **_flags) -> None:
    """What liger's _apply_liger_kernel_to_instance does to a Llama, with stand-in kernels."""
    from transformers.models.llama import modeling_llama as ml

    ml.apply_rotary_pos_emb = _kernel(ml.apply_rotary_pos_emb)
    ml.LlamaRMSNorm.forward = _kernel(ml.LlamaRMSNorm.forward)
    ml.LlamaMLP = type("LigerSwiGLUMLP", (ml.LlamaMLP,), {"forward": _kernel(ml.LlamaMLP.forward)})


def install() -> None:
    """liger_kernel.transformers.monkey_patch as job/liger.py imports it, backed by apply_standin."""
    import job.liger

    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch._apply_liger_kernel_to_instance = apply_standin
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_standin}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["liger_kernel.transformers.monkey_patch"] = monkey_patch
    job.liger.unavailable_reason = lambda model_dir: None  # "CUDA and liger-kernel installed"


if __name__ == "__main__":
    install()
    from job.cli import main

    sys.argv = ["job", *sys.argv[1:]]
    main()
