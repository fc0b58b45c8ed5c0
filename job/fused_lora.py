"""The LoRA update as one autograd function added in place to the base layer's output (issue 21).

peft computes a LoRA layer on a 4-bit base as

    result = base(x).clone()                                  # "defensively" (peft/tuners/lora/bnb.py)
    result = result + lora_B(lora_A(dropout(x))) * scaling

which, besides the two small matmuls, writes the layer's whole output four more times in the forward
pass (the clone, lora_B's output, the scaled copy, the sum) and once more in the backward pass (the
gradient times the scaling), and keeps the dropout's mask and the dropped input for the backward
pass. For the 7 linear kinds of a Llama block that is memory traffic of the size of the block's
activations, spent on elementwise copies.

`fused_lora` does the same arithmetic with one matrix product into the output that is there anyway:

    xa = dropout(x) @ A^T                  (rank r columns, kept for the backward pass)
    result += scaling * xa @ B^T           (addmm_ into the base output, no copy, no scaled tensor)

and the backward pass computes the gradients of A, B and x directly, the scaling folded into the
small matrices. The dropout is drawn as torch draws it for peft (the same mask under the same seed);
with `recompute` its mask and dropped input are not stored: the random generator's state is, and the
backward pass draws the same mask again (with activation checkpointing each layer is recomputed
anyway, so there the two are stored, as peft does). Outputs and gradients equal peft's (up to the
rounding of the operations peft does separately; tests/test_fused_lora.py), the parameters keep
their names, so checkpoints, the saved adapter and the merge are as before.

The layers are switched by class (FusedLoraLinear, FusedLoraLinear4bit: peft's classes with another
forward); a layer in a state the fused path does not cover (DoRA or another variant, several active
adapters, merged or disabled adapters, a LoRA bias, mixed-adapter batches) runs peft's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from job.config import Config


def draw_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x), what its backward pass needs), drawn exactly as `torch.nn.functional.dropout` draws it in
    training: on CUDA its fused kernel (a boolean mask), elsewhere a Bernoulli draw divided by 1 - p."""
    if x.is_cuda:
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * noise, noise


def dropout_backward(grad: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    if keep.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, keep, 1 / (1 - p))
    return grad * keep


def _generator(device: torch.device) -> torch.Generator:
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else torch.default_generator


def dequantized_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit layer's weight [out, in], dequantized as its own backward pass dequantizes it."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)


class _FusedLora(torch.autograd.Function):
    """result += scaling * dropout(x) @ A^T @ B^T, in place; see the module docstring. With `base` (a frozen
    layer) instead of `result`, the base layer's output is computed here too and the backward pass adds the
    LoRA's input gradient into the base's (one [tokens, in] tensor less per layer for autograd to sum)."""

    @staticmethod
    def forward(ctx, result, base, x, weight_a, weight_b, scaling, dropout_p, recompute, compute_dtype):
        shape_in = x.shape
        x2 = x.reshape(-1, shape_in[-1])
        a = weight_a.to(compute_dtype)
        b = weight_b.to(compute_dtype)
        state = None
        if dropout_p > 0:
            if recompute:
                state = _generator(x.device).get_state()
            # drawn on x in its own dtype, as peft's nn.Dropout draws it (CUDA's kernel lays out its random
            # numbers by dtype), then cast as autocast casts lora_A's input
            dropped, keep = draw_dropout(x2, dropout_p)
            dropped = dropped.to(compute_dtype)
        else:
            dropped, keep = x2.to(compute_dtype), None
        xa = dropped @ a.t()
        if result is None:
            result = base(x)
        else:
            ctx.mark_dirty(result)
        out2 = result.view(-1, result.shape[-1])
        if out2.dtype == compute_dtype:
            out2.addmm_(xa, b.t(), alpha=scaling)
        else:  # peft without autocast: the LoRA output in the adapter's dtype, cast to the base output's
            out2.add_((xa @ b.t()).mul_(scaling).to(out2.dtype))
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.compute_dtype, ctx.state, ctx.shape_in, ctx.x_dtype = (
            base, scaling, dropout_p, compute_dtype, state, shape_in, x.dtype)
        ctx.stored = dropout_p > 0 and not recompute
        if ctx.stored:  # what peft keeps: the dropped input and the mask, not x
            ctx.save_for_backward(xa, weight_a, weight_b, dropped, keep)
        else:  # x, to draw the dropout again or as lora_A's input (what peft keeps with dropout 0)
            ctx.save_for_backward(xa, weight_a, weight_b, x2)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        xa, weight_a, weight_b, *kept = ctx.saved_tensors
        dtype, s, p = ctx.compute_dtype, ctx.scaling, ctx.dropout_p
        grad_out2 = grad_out.reshape(-1, grad_out.shape[-1])
        g = grad_out2.to(dtype)
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        grad_b = (g.t() @ xa).mul_(s).to(weight_b.dtype) if ctx.needs_input_grad[4] else None
        grad_xa = (g @ b).mul_(s)  # [tokens, r]
        keep = None
        if ctx.stored:
            dropped, keep = kept
        elif p > 0:  # draw the forward's mask again from the generator state it was drawn with
            (x2,) = kept
            generator = _generator(x2.device)
            now = generator.get_state()
            generator.set_state(ctx.state)
            try:
                dropped, keep = draw_dropout(x2, p)
            finally:
                generator.set_state(now)
            dropped = dropped.to(dtype)
        else:
            dropped = kept[0].to(dtype)
        grad_a = (grad_xa.t() @ dropped).to(weight_a.dtype) if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[2]:
            grad_x = None
        elif ctx.base is None:
            grad_x = lora_input_grad(grad_xa, a, keep, p, ctx.x_dtype)
        else:
            # the base layer's part, in its compute dtype as bitsandbytes computes it, and the LoRA's added in
            base_dtype = ctx.base.compute_dtype or grad_out2.dtype
            grad_x = grad_out2.to(base_dtype) @ dequantized_weight(ctx.base, base_dtype)
            if keep is None and grad_x.dtype == dtype:
                grad_x.addmm_(grad_xa, a)
            else:
                grad_x.add_(lora_input_grad(grad_xa, a, keep, p, ctx.x_dtype).to(grad_x.dtype))
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype).view(ctx.shape_in)
        return None if ctx.base is not None else grad_out, None, grad_x, grad_a, grad_b, None, None, None, None


def lora_input_grad(grad_xa: torch.Tensor, a: torch.Tensor, keep: torch.Tensor | None, p: float, x_dtype):
    """The LoRA path's gradient of its input: through lora_A, cast back to the input's dtype, through the dropout."""
    grad = (grad_xa @ a).to(x_dtype)
    return dropout_backward(grad, keep, p) if keep is not None else grad


def fused_lora(result: torch.Tensor | None, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
               scaling: float, dropout_p: float, recompute: bool, base: nn.Module | None = None) -> torch.Tensor:
    """`result + scaling * lora_B(lora_A(dropout(x)))` as peft computes it, written into `result` (the base
    layer's output, which nothing else may hold on to), or with `result` None into `base(x)`, computed here
    (`base`: a frozen layer, see base_in_function). The LoRA matmuls run in autocast's dtype when autocast is
    on (as peft's nn.Linear calls would), else in the adapter weights' dtype."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight_a.dtype
    if result is not None and result._base is not None:  # a view: modifying it in place would alter another
        result = result.clone()
    with torch.autocast(device, enabled=False):
        return _FusedLora.apply(result, base, x, weight_a, weight_b, float(scaling), float(dropout_p), recompute,
                                dtype)


def base_in_function(base: nn.Module) -> bool:
    """Whether the fused function can compute this base layer itself: a bitsandbytes 4-bit layer whose weights
    are frozen (its output then does not depend on autocast, and its input gradient is output gradient @ W).
    Other bases (an nn.Linear under autocast) run as their own autograd nodes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(base, bnb.nn.Linear4bit) and not any(p.requires_grad for p in base.parameters())


class FusedLoraMixin:
    """peft's LoRA layer with its forward replaced by `fused_lora` where it applies (see the module docstring).
    `fused_recompute_dropout` says whether the dropout is drawn again in the backward pass."""

    fused_recompute_dropout: bool = False
    fused_with_base: bool = False  # compute the base inside the function (set by fuse_lora_layers: base_in_function)

    def _fused_adapter(self, kwargs, variant_keys) -> str | None:
        """The one adapter the fused path computes, or None when peft's forward must run."""
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None \
                or any(kwargs.get(k) is not None for k in variant_keys):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if (name in getattr(self, "lora_variant", {}) or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear
                or lora_a.bias is not None or lora_b.bias is not None
                or type(dropout) not in (nn.Dropout, nn.Identity)):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        variant_keys = _variant_keys()
        name = self._fused_adapter(kwargs, variant_keys)
        if name is None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        for key in ("adapter_names", *variant_keys):
            kwargs.pop(key, None)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        base = self.base_layer if self.fused_with_base and not args and not kwargs else None
        result = self.base_layer(x, *args, **kwargs) if base is None else None
        return fused_lora(result, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p,
                          self.fused_recompute_dropout, base)


def _variant_keys() -> tuple[str, ...]:
    """The keyword arguments peft's forward takes for its LoRA variants (not for the base layer)."""
    from peft.tuners.lora import layer

    return tuple(getattr(layer, "VARIANT_KWARG_KEYS", ()))


def _fused_classes() -> dict[type, type]:
    """peft's layer class -> its fused subclass (made once: a class made per call would not pickle)."""
    global _CLASSES
    if _CLASSES is None:
        from peft.tuners.lora import layer

        _CLASSES = {layer.Linear: type("FusedLoraLinear", (FusedLoraMixin, layer.Linear), {"__module__": __name__})}
        try:
            from peft.tuners.lora import bnb
            if hasattr(bnb, "Linear4bit"):
                _CLASSES[bnb.Linear4bit] = type("FusedLoraLinear4bit", (FusedLoraMixin, bnb.Linear4bit),
                                                {"__module__": __name__})
        except ImportError:  # no bitsandbytes: no 4-bit layers to fuse
            pass
        for cls in _CLASSES.values():
            globals()[cls.__name__] = cls
    return _CLASSES


_CLASSES: dict[type, type] | None = None


def fuse_lora_layers(model, recompute_dropout: bool) -> int:
    """Switch each of peft's plain LoRA layers (on an nn.Linear or a bitsandbytes 4-bit base) to the fused
    forward; returns how many. Layers of other kinds (8-bit, embeddings, convolutions) keep peft's."""
    classes = _fused_classes()
    fused = 0
    for module in model.modules():
        cls = classes.get(type(module))
        if cls is None and isinstance(module, FusedLoraMixin):
            cls = type(module)
        if cls is None:
            continue
        module.__class__ = cls  # the same object: its parameters, hooks and names stay as they are
        module.fused_recompute_dropout = recompute_dropout
        module.fused_with_base = base_in_function(module.base_layer)  # decided once, not on every call
        fused += 1
    return fused


def choose_fused_lora(cfg: Config) -> tuple[bool, str]:
    """Whether the LoRA layers use fused_lora, and why (or why not)."""
    setting = cfg.train.fused_lora
    if setting is False:
        return False, "off (train.fused_lora: false)"
    if setting is True:
        return True, "train.fused_lora: true"
    if not torch.cuda.is_available():
        return False, "auto: not used, no CUDA device (measured and made the default on GPUs only)"
    return True, "auto: CUDA"
