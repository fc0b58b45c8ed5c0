"""LoRA dropout recomputed in the backward pass instead of stored (issue 21).

peft computes each LoRA layer as `lora_B(lora_A(dropout(x))) * scaling`. Autograd then keeps, for
each of the 7 LoRA layers of a decoder block, the dropout mask and the dropped copy of the layer's
input (3 bytes a value in bf16), although q, k and v (and gate and up) read the same input: about
6*hidden + intermediate values a token and layer, a third of a 7B's activations without
checkpointing (121 -> 88 GiB on an H200 at 16k tokens with dropout 0, docs/benchmarks.md).

Folded, `lora_A` does the dropout itself inside `torch.utils.checkpoint`: the forward keeps only a
reference to the input (shared by the layers that read it, and kept anyway with dropout 0), and the
backward draws the same mask again from the saved RNG state and recomputes the small `x @ A^T`
(rank r columns). The forward and the gradients are the ones peft computes: same mask, same
operations. The adapter's weights and names do not change (lora_A keeps its `weight`), so
checkpoints, the saved adapter and the merge are as before.

Under activation checkpointing the whole decoder layer is recomputed in the backward anyway and its
masks are never stored for more than one layer, so the fold is left off there. With the fused LoRA
function (job/fused_lora.py, the default on CUDA) the fold is not used: that function draws the mask
again itself, without the checkpoint's bookkeeping.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from job.config import Config


class DropoutRecomputedLinear(nn.Linear):
    """A LoRA `lora_A` (nn.Linear, no bias) that applies the LoRA dropout to its input itself, recomputed
    in the backward pass. Made from peft's lora_A in place (`fold_lora_dropout`), so its parameter
    stays the one the optimizer, the checkpoints and the adapter file know."""

    dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)  # evaluation: peft's nn.Dropout would be the identity too
        return checkpoint(self._dropped_linear, x, use_reentrant=False, preserve_rng_state=True)

    def _dropped_linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.dropout(x, self.dropout_p, training=True), self.weight, self.bias)


def fold_lora_dropout(model) -> int:
    """Fold each LoRA layer's dropout into its lora_A (DropoutRecomputedLinear); returns how many layers.
    Only plain LoRA layers whose dropout is an nn.Dropout with p > 0 and whose lora_A is an nn.Linear
    (peft's own) are changed; anything else (DoRA and other variants) keeps peft's code."""
    from peft.tuners.lora import LoraLayer

    folded = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            lora_a = module.lora_A[name] if name in module.lora_A else None
            if (isinstance(dropout, nn.Dropout) and dropout.p > 0 and type(lora_a) is nn.Linear
                    and name not in getattr(module, "lora_variant", {})):
                # The same module object gets the subclass: its parameter, hooks and name stay as they are.
                lora_a.__class__ = DropoutRecomputedLinear
                lora_a.dropout_p = dropout.p
                module.lora_dropout[name] = nn.Identity()
                folded += 1
    return folded


def choose_recompute(cfg: Config, checkpointing: bool, fused: bool) -> tuple[bool, str]:
    """Whether the LoRA dropout is drawn again in the backward pass instead of stored, and why (or why not).
    `fused`: the LoRA layers run job/fused_lora.py's function, which does it itself (measured faster than
    storing, with the planner's larger batch); without it, fold_lora_dropout does it (7% slower than peft at
    the same batch: only with true)."""
    setting = cfg.train.recompute_lora_dropout
    if cfg.train.lora_dropout == 0:
        return False, "no LoRA dropout (train.lora_dropout: 0)"
    if setting is False:
        return False, "off (train.recompute_lora_dropout: false)"
    if setting is True:
        return True, "train.recompute_lora_dropout: true"
    if checkpointing:
        return False, "auto: not needed, activation checkpointing recomputes each layer anyway"
    if not fused:
        return False, "auto: not without the fused LoRA function (peft's own forward stores them)"
    return True, "auto: no activation checkpointing, so the masks and dropped inputs would be stored"
