"""A merged Hugging Face folder -> one GGUF file for llama.cpp, Ollama and LM Studio, written with
the `gguf` package (no llama.cpp checkout, no compiler), tensor by tensor.

    plan = inspect_model(merged_dir)               # refuses what it cannot export, before any write
    write_gguf(plan, "model.q8_0.gguf", "q8_0")

What it does, following llama.cpp's convert_hf_to_gguf.py for the Llama family:
- Architectures: llama and mistral (GGUF arch `llama`, q/k rows permuted for llama.cpp's interleaved
  rope; k with the KV-head count), qwen2 and qwen3 (NEOX rope, no permutation; qwen2's q/k/v biases,
  qwen3's q/k norms). Anything else is refused (exit 2) before a file is opened.
- Tensor names through `gguf.get_tensor_name_map`; tied embeddings write no `output.weight`
  (llama.cpp then uses `token_embd` for the logits).
- Types: 1-D tensors (norms, biases) always F32; 2-D weights F16, BF16, Q8_0 or Q4_0. Q8_0/Q4_0 need
  rows that are a multiple of 32 values; a tensor whose rows are not falls back to F16 (as llama.cpp's
  converter does). Q4_0 keeps `token_embd`/`output` at Q8_0: those two are the most sensitive to
  rounding (llama-quantize keeps them at a higher type too).
- Rope scaling: linear (type + factor) and Llama-3's (the `rope_freqs` tensor of per-frequency
  factors, computed exactly as llama.cpp does). YaRN, dynamic NTK and longrope are refused.
- Tokenizer from tokenizer.json: byte-level BPE -> `gpt2` with merges and `tokenizer.ggml.pre` chosen
  from the pre-tokenizer's own definition (see PRE_TOKENIZERS); SentencePiece-style BPE (byte fallback,
  the Llama/Mistral layout) -> `llama` with scores (-id, the order SentencePiece merges in). Special
  token ids, add_bos/add_eos (what the tokenizer really does on a sample text) and the chat template.

Memory: the tensor table and metadata are written first from the safetensors headers, then each
tensor is read alone (safe_open per tensor, so no shard stays mapped), converted and appended.
Peak memory is a few copies of the largest tensor, not the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from job.errors import InputError
from job.model_files import safetensors_header, tensors

TYPES = ("f16", "bf16", "q8_0", "q4_0")


class ExportRefused(InputError):
    """The model (architecture, tokenizer, rope scaling, tensors) cannot be exported faithfully: exit 2."""


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # general.architecture in the file (and the key prefix of its hyperparameters)
    name_map_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's llama rope is interleaved (GPT-J style): HF's q/k rows must be permuted


ARCHES = {
    "llama": ArchSpec("llama", "LLAMA", True),
    "mistral": ArchSpec("llama", "LLAMA", True),  # llama.cpp runs Mistral as `llama`
    "qwen2": ArchSpec("qwen2", "QWEN2", False),
    "qwen3": ArchSpec("qwen3", "QWEN3", False),
}

# tokenizer.ggml.pre names llama.cpp knows, identified here by the pre-tokenizer definition in
# tokenizer.json rather than llama.cpp's hash of one sample text (get_vocab_base_pre): that hash table
# lives in llama.cpp's source (not in the `gguf` package) and changes with it. The definition is what
# llama.cpp re-implements per name, so matching it is the direct test; anything else is refused.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # ByteLevel with its built-in GPT-2 regex, nothing before it.
    "gpt-2": "bytelevel",
    # SmolLM / SmolLM2: every digit alone, then the GPT-2 regex.
    "smollm": "digits+bytelevel",
    "llama-bpe": _LLAMA3_REGEX,
    "qwen2": _QWEN2_REGEX,
}


@dataclass
class TensorSpec:
    hf_name: str
    gguf_name: str
    shape: tuple  # HF order (rows, cols)
    file: Path
    kind: str = ""  # "q" / "k" for the llama permutation


@dataclass
class ModelPlan:
    model_dir: Path
    model_type: str
    arch: ArchSpec
    config: dict
    tensors: list = field(default_factory=list)
    rope_factors: list | None = None  # Llama-3 rope_freqs
    rope_linear: float | None = None
    tokenizer_kind: str = ""  # gpt2 | llama
    pre: str | None = None

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


# ----------------------------------------------------------------------------------------------
# inspection: everything that can refuse happens here, before anything is written


def inspect_model(model_dir: Path) -> ModelPlan:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportRefused("export: the `gguf` package is not installed; pip install gguf (pure Python, "
                            "a dependency of the job)") from None
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportRefused(f"{config_path}: cannot read the model config: {exc}") from None
    model_type = config.get("model_type", "")
    if model_type not in ARCHES:
        raise ExportRefused(f"{config_path}: model_type {model_type!r} cannot be exported to GGUF by this job "
                            f"(supported: {', '.join(ARCHES)}); nothing was written. Use llama.cpp's "
                            "convert_hf_to_gguf.py on merged/ for other architectures.")
    plan = ModelPlan(model_dir, model_type, ARCHES[model_type], config)
    _check_rope(plan)
    _plan_tensors(plan)
    _check_tokenizer(plan)
    return plan


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4 (rope_scaling) or 5 (rope_parameters) config."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_rope_factors(config: dict, scaling: dict) -> list[float]:
    """llama.cpp's rope_freqs for Llama-3.x rope scaling (LlamaModel.generate_extra_tensors)."""
    theta, dim = rope_settings(config)[0], head_dim(config)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, dim, 2):
        freq = 1.0 / (theta ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(float(factor))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def _check_rope(plan: ModelPlan) -> None:
    _theta, scaling = rope_settings(plan.config)
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        plan.rope_factors = llama3_rope_factors(plan.config, scaling)
    elif kind == "linear":
        plan.rope_linear = float(scaling["factor"])
    else:
        raise ExportRefused(f"{plan.model_dir / 'config.json'}: rope scaling {kind!r} is not exported by this job "
                            "(supported: none, linear, llama3); nothing was written")


def _plan_tensors(plan: ModelPlan) -> None:
    import gguf

    files = sorted(plan.model_dir.glob("*.safetensors"))
    if not files:
        raise ExportRefused(f"{plan.model_dir}: no .safetensors files to export")
    n_layers = int(plan.config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, plan.arch.name_map_arch), n_layers)
    tied = bool(plan.config.get("tie_word_embeddings", False))
    seen = {}
    for path in files:
        for name, info in tensors(safetensors_header(path)[1]).items():
            if name in seen:
                continue
            seen[name] = (path, tuple(info["shape"]))
    if tied:
        seen.pop("lm_head.weight", None)  # the same values as the embedding: llama.cpp reuses token_embd
    for name, (path, shape) in seen.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta by every runtime
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportRefused(f"{path}: tensor {name} has no GGUF name for {plan.model_type}; nothing was written")
        kind = ""
        if plan.arch.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            kind = "q"
        elif plan.arch.permute_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            kind = "k"
        plan.tensors.append(TensorSpec(name, gguf_name, shape, path, kind))
    if not tied and "lm_head.weight" not in seen:
        raise ExportRefused(f"{plan.model_dir}: untied model without lm_head.weight; nothing was written")
    # llama.cpp's own order: embeddings, then block by block, then the output norm and head.
    def order(t: TensorSpec):
        m = re.match(r"blk\.(\d+)\.", t.gguf_name)
        return (1, int(m.group(1)), t.gguf_name) if m else ((0 if t.gguf_name.startswith("token_embd") else 2), 0,
                                                            t.gguf_name)
    plan.tensors.sort(key=order)


def _pre_tokenizer_signature(pre: dict | None) -> str | None:
    if pre is None:
        return None
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "bytelevel"
    if kind == "Sequence":
        items = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in items]
        if (kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits")
                and items[1].get("use_regex", True)):
            return "digits+bytelevel"
        if kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
            pattern = items[0].get("pattern", {})
            return pattern.get("Regex") or pattern.get("String")
    return None


def _check_tokenizer(plan: ModelPlan) -> None:
    path = plan.model_dir / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportRefused(f"{path}: a fast tokenizer file is needed for the GGUF vocabulary: {exc}") from None
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ExportRefused(f"{path}: tokenizer model {model.get('type')!r} is not exported by this job "
                            "(supported: byte-level BPE and SentencePiece-style BPE with byte fallback)")
    if model.get("byte_fallback"):
        plan.tokenizer_kind = "llama"
        return
    signature = _pre_tokenizer_signature(tok.get("pre_tokenizer"))
    for name, known in PRE_TOKENIZERS.items():
        if signature == known:
            plan.tokenizer_kind, plan.pre = "gpt2", name
            return
    raise ExportRefused(f"{path}: this byte-level BPE pre-tokenizer ({json.dumps(tok.get('pre_tokenizer'))[:300]}) "
                        f"matches none llama.cpp knows by name here ({', '.join(PRE_TOKENIZERS)}); a GGUF without "
                        "the right tokenizer.ggml.pre would split text differently from training, so nothing was "
                        "written")


# ----------------------------------------------------------------------------------------------
# tokenizer metadata


def add_tokenizer(writer, plan: ModelPlan, n_vocab: int) -> dict:
    """Vocabulary, merges/scores, special ids, add_bos/add_eos and chat template. Returns a summary."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.model_dir)
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    special_ids = set(tokenizer.all_special_ids)
    for token, tid in added.items():
        decoder = tokenizer.added_tokens_decoder.get(tid)
        if decoder is not None and decoder.special:
            special_ids.add(tid)
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")  # embedding rows past the tokenizer (padded vocab): never produced
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        if i in special_ids:
            kind = gguf.TokenType.CONTROL
        elif text in added:
            kind = gguf.TokenType.USER_DEFINED
        elif plan.tokenizer_kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        if i == tokenizer.unk_token_id and plan.tokenizer_kind == "llama":
            kind = gguf.TokenType.UNKNOWN
        tokens.append(text)
        types.append(kind)
        # SentencePiece merges the pair whose result scores highest; a tokenizer.json converted from (or
        # trained like) SentencePiece numbers pieces in that order, so -id reproduces it.
        scores.append(-float(i) if kind == gguf.TokenType.NORMAL else 0.0)
    missing = len(vocab) - sum(1 for i in reverse if i < n_vocab)
    if missing:
        raise ExportRefused(f"{plan.model_dir}: the tokenizer has {missing} token ids beyond the model's "
                            f"{n_vocab} embedding rows")

    writer.add_tokenizer_model(plan.tokenizer_kind)
    if plan.pre:
        writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if plan.tokenizer_kind == "llama":
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(plan.model_dir, load_merges=plan.tokenizer_kind == "gpt2", n_vocab=n_vocab)
    # What the tokenizer really does, not what a config flag may claim: encode a sample and look.
    sample = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and sample[:1] == [tokenizer.bos_token_id]
    add_eos = tokenizer.eos_token_id is not None and sample[-1:] == [tokenizer.eos_token_id]
    special.add_special_token = {"bos": add_bos, "eos": add_eos}
    if getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            special.special_token_ids[kind] = tid
    special.add_to_gguf(writer, quiet=True)
    if plan.tokenizer_kind == "llama":
        # Metaspace "first"/"always" prepends the space marker, as SentencePiece's add_dummy_prefix does.
        writer.add_add_space_prefix(_adds_space_prefix(plan.model_dir))
    return {"tokenizer_model": plan.tokenizer_kind, "tokenizer_pre": plan.pre, "n_tokens": n_vocab,
            "add_bos_token": add_bos, "add_eos_token": add_eos,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}


def _adds_space_prefix(model_dir: Path) -> bool:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    text = json.dumps([tok.get("pre_tokenizer"), tok.get("normalizer")])
    return '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text or '"Prepend"' in text


# ----------------------------------------------------------------------------------------------
# tensors


def tensor_type(spec: TensorSpec, out_type: str):
    """The GGML type a tensor is stored as (see the module docstring for the rules)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(spec.shape) == 1 or spec.gguf_name == "rope_freqs.weight":
        return T.F32
    wanted = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[out_type]
    if wanted == T.Q4_0 and spec.gguf_name.startswith(("token_embd", "output.")):
        wanted = T.Q8_0
    if wanted in (T.Q8_0, T.Q4_0) and spec.shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0]:
        wanted = T.F16
    return wanted


def permute_qk(w, n_head: int):
    """llama.cpp's permutation of HF's q/k rows (rotate-half pairs -> interleaved pairs)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def convert_tensor(w, ggml_type):
    """A float32 torch tensor -> the bytes GGUF stores (numpy, uint8 or float dtype).

    F16/BF16/Q8_0 are done in torch (multi-threaded, about 10x numpy on a 7B model), bit-identical
    to gguf.quants (tests/test_export.py checks); Q4_0 uses gguf.quants."""
    import gguf
    import numpy as np
    import torch

    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return w.float().numpy()
    if ggml_type == T.F16:
        return w.to(torch.float16).numpy()
    if ggml_type == T.BF16:
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(*w.shape[:-1], -1)
    if ggml_type == T.Q8_0:
        blocks = w.float().reshape(-1, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        x = blocks * inv
        qs = (torch.sign(x) * torch.floor(x.abs() + 0.5)).to(torch.int8)  # round half away from zero
        out = torch.cat([d.to(torch.float16).view(torch.uint8), qs.view(torch.uint8)], dim=1)
        return out.numpy().reshape(*w.shape[:-1], -1)
    return gguf.quants.quantize(w.float().numpy(), ggml_type)


def _nbytes(shape, ggml_type) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _load(spec: TensorSpec):
    from safetensors import safe_open

    with safe_open(spec.file, framework="pt") as f:  # opened per tensor: no shard stays mapped
        return f.get_tensor(spec.hf_name)


def write_gguf(plan: ModelPlan, out_path: Path, out_type: str, name: str = "") -> dict:
    """Write `out_path` (the caller renames a temporary name into place). Returns what was written."""
    import gguf
    import numpy as np
    import torch

    if out_type not in TYPES:
        raise ExportRefused(f"export.gguf: unknown type {out_type!r} (supported: {', '.join(TYPES)})")
    cfg, arch = plan.config, plan.arch
    n_head, n_kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    embed = next(t for t in plan.tensors if t.gguf_name == "token_embd.weight")
    n_vocab = embed.shape[0]
    theta, _ = rope_settings(cfg)

    writer = gguf.GGUFWriter(str(out_path), arch.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or plan.model_dir.name)
    if plan.model_type == "mistral":
        writer.add_string("general.basename", "mistral")
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(n_vocab)
    dim = head_dim(cfg)
    writer.add_rope_dimension_count(dim)
    if dim != cfg["hidden_size"] // n_head:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if plan.rope_linear is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(plan.rope_linear)
    if cfg.get("sliding_window") and plan.model_type == "mistral":
        pass  # llama.cpp's llama arch has no sliding window; Mistral-7B-v0.2+ sets none (null) anyway
    tokenizer_info = add_tokenizer(writer, plan, n_vocab)

    rope_spec = None
    if plan.rope_factors is not None:
        rope_spec = TensorSpec("", "rope_freqs.weight", (len(plan.rope_factors),), Path())
    specs = ([rope_spec] if rope_spec else []) + plan.tensors
    types = [tensor_type(s, out_type) for s in specs]
    for spec, ggml_type in zip(specs, types):
        shape = spec.shape
        if ggml_type == gguf.GGMLQuantizationType.F32:
            nbytes, dtype, raw = math.prod(shape) * 4, np.float32, None
        elif ggml_type == gguf.GGMLQuantizationType.F16:
            nbytes, dtype, raw = math.prod(shape) * 2, np.float16, None
        else:
            nbytes, dtype, raw = _nbytes(shape, ggml_type), np.uint8, ggml_type
            shape = gguf.quant_shape_to_byte_shape(shape, ggml_type)
        writer.add_tensor_info(spec.gguf_name, shape, dtype, nbytes, raw_dtype=raw)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    try:
        for spec, ggml_type in zip(specs, types):
            if spec is rope_spec:
                w = torch.tensor(plan.rope_factors, dtype=torch.float32)
            else:
                w = _load(spec).float()
                if spec.kind == "q":
                    w = permute_qk(w, n_head)
                elif spec.kind == "k":
                    w = permute_qk(w, n_kv)
            data = convert_tensor(w, ggml_type)
            del w
            writer.write_tensor_data(data)
            del data
            counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1
    finally:
        writer.close()
    return {"tensors": len(specs), "tensor_types": counts, "n_params": plan.n_params,
            "tied_embeddings": not any(s.gguf_name == "output.weight" for s in specs),
            "rope_freqs": rope_spec is not None, "arch": arch.gguf_arch, **tokenizer_info}
