"""Variable-length attention for packed training: PyTorch's `varlen_attn` as a transformers attention.

Packed, padding-free batches are one long row of several examples, told apart by position ids that
restart at 0. sdpa needs a dense (tokens x tokens) document mask for that, so its cost grows with the
square of the micro-batch's tokens; `torch.nn.attention.varlen.varlen_attn` (FlashAttention inside
PyTorch, CUDA sm80+, bf16/fp16, no compile step) takes the document boundaries instead
(`cu_seqlens`: where each document starts in the flattened tokens) and does only the useful work.
On an H200 with a 7B model it trained 12,300 tokens/s against sdpa's 4,800-6,500 (docs/benchmarks.md).

It is registered with transformers under the name "varlen" (`register()`), with the flash-attention
mask function, so transformers builds no dense mask either. The boundaries come from the collator:
trl's padding-free collator already computes `cu_seq_lens_q` and `max_length_q` once per batch on
the CPU and the model passes them to every attention layer, as it does for flash_attention_2.
Without them (another collator), they are derived from the position ids, once per layer.

`varlen_attn` only runs on CUDA. On any other device the same function computes the same thing with
plain sdpa, one document at a time: slow, but it lets the CPU tests prove the wiring (boundaries,
layout, GQA) that the GPU kernel relies on.
"""

from __future__ import annotations

import inspect

import torch

NAME = "varlen"


def varlen_kernel():
    """PyTorch's varlen_attn, or None when this torch lacks it (added in 2.10/2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_unavailable_reason() -> str | None:
    """Why varlen_attn cannot run here (None when it can): it needs CUDA, sm80+ and a torch that has it."""
    if varlen_kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch 2.11 or newer has it)"
    if not torch.cuda.is_available():
        return "no CUDA device (varlen_attn runs on NVIDIA GPUs only)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"{torch.cuda.get_device_name()} is compute capability {major}.{minor}; "
                "varlen_attn needs 8.0 (A100) or newer")
    return None


def unavailable_reason(name: str) -> str | None:
    """Why the attention `name` cannot run on this machine, checked before a model loads (None: it can, as
    far as can be told without running it). Without this, a missing flash-attn is an ImportError inside
    from_pretrained and flex_attention on a CPU a NotImplementedError at the first training step."""
    import importlib.util

    if name == NAME:
        return varlen_unavailable_reason()
    if name in ("flash_attention_2", "flash_attention_3"):
        package, module = (("flash-attn", "flash_attn") if name.endswith("2")
                           else ("flash-attn 3", "flash_attn_interface"))
        if importlib.util.find_spec(module) is None:
            return f"the {package} package is not installed (it builds against CUDA: NVIDIA GPUs only)"
        if not torch.cuda.is_available():
            return "no CUDA device (FlashAttention runs on NVIDIA GPUs only)"
    if name == "flex_attention" and not torch.cuda.is_available():
        return "no CUDA device (flex_attention compiles GPU kernels; on a CPU it fails at the first step)"
    return None


def document_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, starting at 0 and ending at the token count) and the longest document's length.

    A document starts where its position id is 0, and at the start of every row (a row never
    continues the previous one; a row that starts mid-document, position 7 say, starts a document
    there: its earlier tokens are not in this batch). Works on (rows, tokens) or flat position ids.
    """
    rows = position_ids.reshape(-1, position_ids.shape[-1]) if position_ids.dim() > 1 else position_ids[None]
    starts = rows == 0
    starts[:, 0] = True
    flat = starts.reshape(-1)
    indices = flat.nonzero().flatten()
    total = torch.tensor([flat.numel()], device=indices.device, dtype=indices.dtype)
    cu_seqlens = torch.cat([indices, total]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers' attention signature: query (batch, heads, tokens, dim), key/value (batch, kv_heads,
    tokens, dim); returns (batch, tokens, heads, dim) and no attention weights."""
    if attention_mask is not None:
        # flash_attention_mask returns a 2D mask only when there is padding: that is an unpacked batch
        raise ValueError("varlen attention needs packed, padding-free batches (train.packing: true); "
                         "this batch has an attention mask with padding")
    if dropout:
        raise ValueError(f"varlen attention has no attention dropout (the model asks for {dropout})")
    if kwargs.get("softcap") is not None:
        raise ValueError("varlen attention does not support attention logit softcapping")
    batch, heads, tokens, dim = query.shape
    cu_seqlens, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None or max_len is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(tokens, device=query.device).expand(batch, tokens)
        cu_seqlens, max_len = document_boundaries(position_ids)
    cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
    max_len = int(max_len)

    groups = heads // key.shape[1]
    # varlen layout: (total tokens, heads, dim)
    q, k, v = (x.transpose(1, 2).reshape(batch * tokens, x.shape[1], dim) for x in (query, key, value))
    sliding = kwargs.get("sliding_window")
    # causal, and for sliding-window models (Mistral) at most sliding_window - 1 tokens back, as their masks do
    window = (sliding - 1 if sliding else -1, 0)
    if q.is_cuda:
        out = _cuda_varlen(q, k, v, cu_seqlens, max_len, scaling, window, groups)
    else:
        out = reference_varlen(q, k, v, cu_seqlens, scaling, window, groups)
    return out.reshape(batch, tokens, heads, dim), None


def _cuda_varlen(q, k, v, cu_seqlens, max_len, scaling, window, groups):
    kernel = varlen_kernel()
    kwargs = {"scale": scaling, "window_size": window}
    if groups > 1:
        if "enable_gqa" in _parameters(kernel):
            kwargs["enable_gqa"] = True
        else:  # torch 2.11: repeat the KV heads (what sdpa's math path does too)
            k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    # PEFT can hand fp32 activations to a bf16 model (LoRA outputs); the kernel needs one 16-bit dtype
    dtype = next((x.dtype for x in (v, k, q) if x.dtype in (torch.bfloat16, torch.float16)), torch.bfloat16)
    out = kernel(q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)
    return out.to(q.dtype)


def reference_varlen(q, k, v, cu_seqlens, scaling, window, groups):
    """The same attention with sdpa, one document at a time (any device; what the CPU tests run)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (heads, len, dim)
        if groups > 1:
            kd, vd = (x.repeat_interleave(groups, dim=0) for x in (kd, vd))
        if window[0] < 0:  # plain causal: the very call sdpa makes for one unpadded example
            o = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scaling)
        else:
            length = end - start
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril().triu(-window[0])
            o = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scaling)
        out[start:end] = o.transpose(0, 1)
    return out


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def register() -> None:
    """Make attn_implementation="varlen" known to transformers (idempotent). The mask function is
    flash attention's: it returns no mask for padding-free batches, so no dense mask is built."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def choose_training_attention(requested: str, packing: bool) -> tuple[str, str]:
    """The attention for training and why: model.attn_implementation as set, or for "auto" varlen where
    it can run (CUDA sm80+, a torch with varlen_attn, packed batches), else sdpa.

    Raises ValueError (a configuration problem) for an explicit "varlen" that cannot run here."""
    if requested == NAME:
        problem = varlen_unavailable_reason() or (
            None if packing else "train.packing is false (varlen needs packed batches)")
        if problem:
            raise ValueError(f"model.attn_implementation: varlen cannot run here: {problem}; "
                             "use auto or sdpa")
        return NAME, "set by model.attn_implementation"
    if requested != "auto":
        if problem := unavailable_reason(requested):
            raise ValueError(f"model.attn_implementation: {requested} cannot run here: {problem}; use auto or sdpa")
        return requested, "set by model.attn_implementation"
    problem = varlen_unavailable_reason()
    if problem is None and not packing:
        problem = "train.packing is false (varlen needs packed batches)"
    if problem:
        return "sdpa", f"auto: sdpa, because {problem}"
    return NAME, f"auto: varlen on {torch.cuda.get_device_name()} (packed batches, torch {torch.__version__})"
