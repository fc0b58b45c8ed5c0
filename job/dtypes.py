"""Which floating-point type each use of a model runs in, with the reason (logged next to the choice).

One rule for every purpose: a setting other than "auto" is taken as it is; "auto" picks bf16 on a GPU
that has it, fp16 on one that does not, and on a CPU fp32 for computing (CPU bf16 matmuls are very
slow) but bf16 for the merged model (there it is the storage format, and merge does its arithmetic in
fp32 anyway).
"""

from __future__ import annotations

PURPOSES = ("train", "merge", "inference")
_BY_NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def pick_dtype(setting: str, purpose: str):
    """(torch dtype, why) for `purpose` (train: train.compute_dtype, merge: merge.dtype, inference: "auto")."""
    import torch

    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if setting != "auto":
        return getattr(torch, _BY_NAME[setting]), "as set"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "the GPU supports bf16"
        return torch.float16, "the GPU has no bf16"
    if purpose == "merge":
        return torch.bfloat16, "on CPU, bf16 as the stored format of the merged weights"
    return torch.float32, "on CPU (bf16 matmuls are slow there)"


def dtype_name(dtype) -> str:
    """bfloat16 for torch.bfloat16: how markers, reports and logs name a dtype."""
    return str(dtype).removeprefix("torch.")
