"""Inference shared by the evaluate stage and `job predict`: load a model, generate in batches, parse.

The prompt comes from `job.prompts.build_prompt` and is tokenized alone with the tokenizer's special
tokens, exactly as in training (job/stages/labels.py); the answer is read with the same tolerant parser.
Generation is batched with left padding (pad token never EOS), greedy unless sampling is asked for,
and stops at the tokenizer's EOS, which training appended to every example.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from job import hub
from job.config import Config, StorageConfig, home_problem, load_config
from job.dtypes import pick_dtype
from job.errors import InputError
from job.hub_uri import is_hf_uri
from job.model import attn_implementation, fetch_model, load_tokenizer
from job.model_files import weights_bytes
from job.platform import cache_dir
from job.prompts import build_prompt, parse_response
from job.storage import is_s3, open_store, split_uri

log = logging.getLogger("job.predict")

ADAPTER_CONFIG = "adapter_config.json"


# ----------------------------------------------------------------------------------------------
# loading


def load_model(model_dir: Path, adapter_dir: Optional[Path], cfg: Config, dtype=None, four_bit: bool = False):
    """A model for generation: the folder as is (merged or base), or base + adapter (not merged).

    four_bit: the base in 4 bits as training loaded it (train.quant_type, train.double_quant), with the
    adapter on top: the model as trained, in about a quarter of the 16-bit memory (inference_plan)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or pick_dtype("auto", "inference")[0]
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation(cfg)}
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.train.quant_type,
            bnb_4bit_use_double_quant=cfg.train.double_quant, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"{model_dir}: cannot load the model: {exc}") from None
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"{adapter_dir}: cannot apply the adapter to {model_dir}: {exc}") from None
    return model.eval()


# Beyond the weights: the CUDA context, cuBLAS workspace and the allocator's slack.
RESERVE_BYTES = int(1.5 * 2**30)


def sequence_bytes(config: dict, prompt_tokens: int, new_tokens: int, value_bytes: int = 2) -> int:
    """Memory one sequence needs while it generates: its KV cache over prompt + new tokens, the prefill's
    activations of one layer at a time (attention and MLP inputs/outputs) and fp32 logits of one step.
    A rough upper estimate from config.json, for planning only: an OOM still halves the batch."""
    config = config.get("text_config", config)
    hidden = int(config.get("hidden_size", 4096))
    layers = int(config.get("num_hidden_layers", 32))
    heads = int(config.get("num_attention_heads", 32))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size", 4 * hidden))
    vocab = int(config.get("vocab_size", 32000))
    kv = 2 * layers * kv_heads * head_dim * (prompt_tokens + new_tokens) * value_bytes
    prefill = prompt_tokens * (4 * hidden + 3 * inter) * value_bytes
    return kv + prefill + 3 * vocab * 4


def inference_plan(setting: str, model_dir: Path, prompt_tokens: int, new_tokens: int,
                   adapter: bool = True) -> tuple[bool, str]:
    """(load the base in 4 bits?, why) for evaluate.model (auto | merged | adapter) on this machine.

    auto: 16 bits when the weights plus one sequence fit the GPU's free memory, else 4 bits (the base as
    trained, with the adapter). On the CPU auto is 16 bits (plenty of host memory, no bitsandbytes kernels
    needed). `adapter` false (job predict with a merged model and no --adapter): 4 bits quantizes the
    model itself, a lossy last resort that is logged as such."""
    import torch

    if setting == "adapter":
        return True, "evaluate.model=adapter"
    if setting == "merged":
        return False, "evaluate.model=merged"
    if not torch.cuda.is_available():
        return False, "evaluate.model=auto on the CPU: 16 bits"
    from job.platform import free_gpu_memory

    free_gpu_memory()
    free, _total = torch.cuda.mem_get_info()
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    needed = weights_bytes(model_dir, 2) + sequence_bytes(config, prompt_tokens, new_tokens) + RESERVE_BYTES
    if needed <= free:
        return False, f"16 bits fit the GPU (needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free)"
    what = "the base in 4 bits with the adapter, as trained" if adapter else "the model quantized to 4 bits (NF4)"
    return True, (f"16 bits do not fit the GPU (need about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free): "
                  f"{what}")


def plan_batch_size(model, longest_prompt: int, max_new_tokens: int, batch_size: int) -> tuple[int, str]:
    """The generation batch that the GPU memory left after loading holds (at most `batch_size`), and why."""
    import torch

    free, _total = torch.cuda.mem_get_info()
    per_sequence = sequence_bytes(model.config.to_dict(), longest_prompt, max_new_tokens)
    fit = max(1, int(0.8 * max(0, free - RESERVE_BYTES // 3) // per_sequence))
    if fit >= batch_size:
        return batch_size, ""
    return fit, (f"batch size {batch_size} lowered to {fit}: about {per_sequence / 2**20:.0f} MiB a sequence "
                 f"({longest_prompt} prompt + {max_new_tokens} new tokens), {free / 2**30:.1f} GiB free on the GPU")


def load_inference_tokenizer(folder: Path, uri: str):
    """The training tokenizer (pad token that is not EOS), padding on the left for generation."""
    tokenizer = load_tokenizer(folder, uri)
    tokenizer.padding_side = "left"
    return tokenizer


def fetch_adapter(uri: str, cfg: Config) -> Path:
    """A local folder with the adapter at `uri`: the folder itself, or a cached download."""
    if is_hf_uri(uri):  # an adapter repo on the Hugging Face Hub: its json and safetensors files
        path = hub.fetch_model(uri, cache_dir(cfg), max_attempts=cfg.storage.max_attempts, key="--adapter")
        if not (path / ADAPTER_CONFIG).is_file():
            raise InputError(f"--adapter {uri}: not a PEFT adapter repo (no {ADAPTER_CONFIG})")
        return path
    if not is_s3(uri):
        if problem := home_problem(uri.removeprefix("file://")):
            raise InputError(f"--adapter {problem}")
        path = Path(uri.removeprefix("file://")).expanduser()
        if not (path / ADAPTER_CONFIG).is_file():
            raise InputError(f"--adapter {uri}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        return path
    target = cache_dir(cfg) / "adapters" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    open_store(uri, cfg.storage).download_dir("", partial)  # small: always fetched fresh
    if not (partial / ADAPTER_CONFIG).is_file():
        raise InputError(f"--adapter {uri}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


# ----------------------------------------------------------------------------------------------
# generation


@dataclass
class Generation:
    text: str
    """The answer: new tokens up to (not including) EOS, special tokens skipped."""
    new_tokens: int
    """Tokens generated, EOS included."""
    eos_stop: bool
    """Generation ended with EOS before max_new_tokens (False: cut off at the limit)."""


@dataclass
class GenerationStats:
    seconds: float
    new_tokens: int
    batches: int
    batch_size: int = 0
    """The batch size generation ended with (lowered by the memory plan or halved after an OOM)."""
    oom_halvings: int = 0
    """How many times CUDA ran out of memory and the batch was halved."""
    batch_note: str = ""
    """Why the batch size is not the configured one (empty when it is)."""


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if token is not None and token not in ids:
            ids.append(token)
    return ids


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
             progress: Optional[logging.Logger] = None) -> tuple[list[Generation], GenerationStats]:
    """Generate for every prompt, in batches of similar length (less padding), results in input order.

    On a GPU the batch is first lowered to what the memory left holds (plan_batch_size); if CUDA still runs
    out of memory, the batch is halved and the same prompts are tried again, down to one prompt (whose OOM
    is the stage's: exit 5). Greedy answers do not depend on the batch, up to padding rounding."""
    import torch

    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    encoded = tokenizer(prompts)["input_ids"]  # special tokens included: the prompt as in training
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first: OOM shows early
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": 1,
               "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    if do_sample:
        options.update(temperature=temperature, top_p=1.0, top_k=0)
        torch.manual_seed(seed)
    else:  # the base model's generation_config may ask for sampling; greedy overrides it, quietly
        options.update(temperature=None, top_p=None, top_k=None)

    results: list[Optional[Generation]] = [None] * len(prompts)
    seconds, total_new, batches, halvings, notes = 0.0, 0, 0, 0, []
    if device.type == "cuda":
        batch_size, note = plan_batch_size(model, len(encoded[order[0]]) if order else 0, max_new_tokens, batch_size)
        if note:
            notes.append(note)
            (progress or log).info("generate: %s", note)
    done = 0
    while done < len(order):
        index = order[done:done + batch_size]
        try:
            tokens_out, took = _generate_batch(model, tokenizer, [encoded[i] for i in index], options, device)
        except Exception as exc:  # noqa: BLE001 - only CUDA's out of memory is handled; the rest re-raised
            if len(index) == 1 or not _is_cuda_oom(exc):
                raise
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:  # outside the except block: its traceback holds the failed batch's tensors
            halvings += 1
            batch_size = max(1, len(index) // 2)
            _release(device)
            note = f"CUDA out of memory with {len(index)} prompts: batch size halved to {batch_size}"
            notes.append(note)
            (progress or log).warning("generate: %s", note)
            continue
        seconds += took
        for i, tokens in zip(index, tokens_out):
            stop = next((k for k, t in enumerate(tokens) if t in eos), None)
            answer = tokens if stop is None else tokens[:stop]
            results[i] = Generation(text=tokenizer.decode(answer, skip_special_tokens=True),
                                    new_tokens=len(tokens) if stop is None else stop + 1,
                                    eos_stop=stop is not None)
            total_new += results[i].new_tokens
        done += len(index)
        batches += 1
        if progress is not None:
            progress.info("generated batch %d (%d prompts, %d/%d done, %.1f s so far)", batches, len(index), done,
                          len(order), seconds)
    return results, GenerationStats(seconds=seconds, new_tokens=total_new, batches=batches, batch_size=batch_size,
                                    oom_halvings=halvings, batch_note="; ".join(notes))


def _generate_batch(model, tokenizer, ids: list[list[int]], options: dict, device) -> tuple[list[list[int]], float]:
    """(the new tokens of each prompt, seconds): one model.generate call on a left-padded batch."""
    import torch

    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, **options)
    _sync(device)
    return out[:, batch["input_ids"].shape[1]:].tolist(), time.perf_counter() - t0


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# `job predict`


PLACEHOLDER = "(not used by job predict)"


def predict_config(config_file: Optional[str], assignments: tuple, model_uri: str,
                   environ: Optional[dict] = None) -> Config:
    """The config for `job predict`: prompt, evaluate (generation) and storage settings from the usual
    layers. run_uri and data.uri are not needed here, so they get a placeholder unless set."""
    environ = dict(os.environ if environ is None else environ)
    environ.setdefault("JOB_RUN_URI", PLACEHOLDER)
    environ.setdefault("JOB_DATA__URI", PLACEHOLDER)
    return load_config(config_file, tuple(assignments), environ=environ,
                       literal={"model.uri": (model_uri, "--model")})  # a path, never read as YAML


def read_inputs(sentences: tuple, input_file: Optional[str], column: str, storage: StorageConfig) -> list[str]:
    """Sentences from the arguments, then from --input: a .csv (one column) or text, one a line ('-': stdin)."""
    inputs = [s.strip() for s in sentences]
    if any(not s for s in inputs):
        raise InputError("job predict: an empty SENTENCE argument was given")
    if input_file:
        text = _read_input_file(input_file, storage)
        if input_file.lower().endswith(".csv"):
            found = _csv_column(text, input_file, column)
        else:
            found = [line.strip() for line in text.splitlines() if line.strip()]
        if not found:
            raise InputError(f"--input {input_file}: no sentences in the file")
        inputs += found
    if not inputs:
        raise InputError("job predict: nothing to predict; give sentences as arguments or --input FILE "
                         "(one sentence a line, or a .csv with --column)")
    return inputs


def _read_input_file(input_file: str, storage: StorageConfig) -> str:
    import sys

    if input_file == "-":
        data = sys.stdin.buffer.read()  # bytes: a text read would crash on the first byte that is not UTF-8
    elif is_s3(input_file):
        parent, name = split_uri(input_file)
        data = open_store(parent, storage).read_bytes(name)
    elif problem := home_problem(input_file):
        raise InputError(f"--input {problem}")
    else:
        try:
            data = Path(input_file).expanduser().read_bytes()
        except OSError as exc:
            raise InputError(f"--input {input_file}: cannot read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        where = f"stdin line {line}" if input_file == "-" else f"--input {input_file} line {line}"
        raise InputError(f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "give UTF-8 text (re-save the file as UTF-8)") from None


def _csv_column(text: str, name: str, column: str) -> list[str]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
        if column not in header:
            raise InputError(f"--input {name}: no column {column!r}; the file has "
                             f"{', '.join(header) or 'no header'}. Choose one with --column")
        values = []
        for line, row in enumerate(reader, start=2):
            value = row.get(column)
            if value is None:
                raise InputError(f"--input {name}: row {line - 1} (line {line}) has no {column!r} field")
            if value.strip():
                values.append(value.strip())
        return values
    except csv.Error as exc:
        raise InputError(f"--input {name}: malformed CSV: {exc}") from None


def predict(cfg: Config, model_uri: str, adapter_uri: Optional[str], inputs: list[str],
            max_new_tokens: int, batch_size: int) -> Iterator[dict]:
    """One {"input", "negation", "raw", "valid"} per input, in input order."""
    local = not is_s3(model_uri) and not model_uri.startswith("gguf:") and not is_hf_uri(model_uri)
    if local and not Path(model_uri.removeprefix("file://")).expanduser().is_dir():
        raise InputError(f"--model {model_uri}: no such folder "
                         "(give a Hugging Face model folder, e.g. a run's merged/)")
    model_dir = fetch_model(model_uri, cfg)
    adapter_dir = fetch_adapter(adapter_uri, cfg) if adapter_uri else None
    has_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_inference_tokenizer(adapter_dir if has_tokenizer else model_dir, model_uri)
    prompts = [build_prompt(s, cfg.prompt) for s in inputs]
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    setting = cfg.evaluate.model
    if setting == "adapter" and adapter_dir is None:
        raise InputError("evaluate.model=adapter: job predict needs --adapter (the base model in --model is then "
                         "loaded in 4 bits with the adapter, as trained)")
    four_bit, why = inference_plan(setting, model_dir, longest, max_new_tokens, adapter=adapter_dir is not None)
    model = load_model(model_dir, adapter_dir, cfg, four_bit=four_bit)
    log.info("predict: %d inputs, %s%s (%s: %s), batches of %d, at most %d new tokens", len(inputs), model_uri,
             f" + adapter {adapter_uri}" if adapter_uri else "", "4 bits" if four_bit else "16 bits", why,
             batch_size, max_new_tokens)
    e = cfg.evaluate
    generations, stats = generate(model, tokenizer, prompts, max_new_tokens, batch_size, e.do_sample,
                                  e.temperature, cfg.data.seed)
    log.info("predict: %d tokens in %.1f s (%.1f tokens/s)", stats.new_tokens, stats.seconds,
             stats.new_tokens / stats.seconds if stats.seconds else 0.0)
    for sentence, generation in zip(inputs, generations):
        parsed = parse_response(generation.text, cfg.prompt)
        yield {"input": sentence, "negation": parsed.output, "raw": generation.text, "valid": parsed.schema_valid}


def to_json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)
