"""Train settings that can only be checked against the model or the tokenized data: checked right after
the base model loads and before the first step, so a bad name costs a model load, not a training run.
Everything that can be checked without them is checked when the config loads (job/config.py)."""

from __future__ import annotations

import re

from job.errors import InputError


def linear_module_names(model) -> list[str]:
    """Short names (q_proj, down_proj, ...) of the model's linear layers, in model order, deduplicated.
    bitsandbytes' Linear4bit is a torch Linear, so a 4-bit model lists the same names."""
    import torch

    names = []
    for full_name, module in model.named_modules():
        short = full_name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and short not in names:
            names.append(short)
    return names


def check_target_modules(model, target_modules, model_uri: str) -> None:
    """Every train.target_modules entry must match a module, with PEFT's rules: a list entry matches a
    module whose name is that entry or ends in "." + entry; a string other than "all-linear" is a regular
    expression matched against the whole module name. PEFT alone fails only when nothing matches, so a
    misspelt name next to a good one would silently train fewer layers."""
    if target_modules == "all-linear":
        return
    module_names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        unmatched = [] if any(re.fullmatch(target_modules, name) for name in module_names) else [target_modules]
    else:
        unmatched = [target for target in target_modules
                     if not any(name == target or name.endswith(f".{target}") for name in module_names)]
    if unmatched:
        raise InputError(f"train.target_modules: {', '.join(map(repr, unmatched))} match no module of the model "
                         f"{model_uri} (looked for {target_modules!r}); its linear layers are "
                         f"{', '.join(linear_module_names(model))}. Use some of those, or \"all-linear\"")
    # A name that exists but is not a layer LoRA can wrap (a norm, a whole MLP block): PEFT would raise a
    # ValueError while building the adapter. Name the entries and the kinds of module they matched.
    modules = dict(model.named_modules())
    wrong = {}
    for name, module in modules.items():
        if name and _targeted(name, target_modules) and not _lora_layer(module):
            wrong.setdefault(type(module).__name__, []).append(name.rsplit(".", 1)[-1])
    if wrong:
        kinds = "; ".join(f"{', '.join(sorted(set(names)))} ({kind})" for kind, names in wrong.items())
        raise InputError(f"train.target_modules: {target_modules!r} names modules of the model {model_uri} that are "
                         f"not linear layers, which LoRA cannot wrap: {kinds}; its linear layers are "
                         f"{', '.join(linear_module_names(model))}. Use some of those, or \"all-linear\"")


def _targeted(name: str, target_modules) -> bool:
    """PEFT's matching rule (see check_target_modules)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in target_modules)


def _lora_layer(module) -> bool:
    """A module type PEFT's LoRA wraps: linear layers (bitsandbytes' 4-bit ones are torch Linear), embeddings,
    convolutions and GPT-2's Conv1D."""
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                               torch.nn.Conv3d)) or type(module).__name__ == "Conv1D"


def check_packing(settings: dict, lengths: list[int], max_seq_length: int) -> None:
    """A packed row must hold the longest example: trl's packing would cut it, losing its EOS (the label
    check would refuse the batch without naming the key). Config loading already refuses a
    packing_length below max_seq_length; this covers settings kept from a resumed run."""
    if not settings.get("packing"):
        return
    longest = max(lengths, default=0)
    if settings["packing_length"] < longest:
        raise InputError(f"train.packing_length: packed rows of {settings['packing_length']} tokens cannot hold "
                         f"the longest example ({longest} tokens, within train.max_seq_length={max_seq_length}); "
                         "raise train.packing_length to at least train.max_seq_length, or set it to auto (a resumed "
                         "run keeps the settings it started with: then --force train)")
