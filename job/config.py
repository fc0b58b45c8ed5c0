"""Configuration: typed sections, layered loading, and validation that reports every problem at once.

Precedence, lowest first: defaults < --config FILE < SageMaker hyperparameters.json (dotted keys)
< environment variables JOB_<SECTION>__<KEY> (and JOB_RUN_URI) < --set section.key=value.
A problem (unknown key, wrong type, missing required key, bad value) names its key and where it
came from; all problems are collected and raised together as one ConfigError (exit code 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from job.errors import ConfigError

log = logging.getLogger("job.config")

REDACTED = "***"


def secret(default=None, doc: str = ""):
    """A field whose value never appears in logs, config.yaml, markers or reports."""
    return field(default=default, metadata={"secret": True, "doc": doc})


def choice(default: str, choices: tuple):
    """A field whose value must be one of `choices` (checked by _check_field_rules when the config loads)."""
    assert default in choices, f"default {default!r} is not among {choices}"
    return field(default=default, metadata={"choices": tuple(choices)})


def at_least(default, minimum, note: str = ""):
    """A number field that must be >= `minimum` when set (None, for an Optional field, stays allowed).
    `note` is added to the refusal in parentheses, e.g. why the minimum is what it is."""
    return field(default=default, metadata={"at_least": minimum, "note": note})


@dataclass
class DataConfig:
    """The CSV to learn from and how its rows become prompt/completion records."""

    uri: str = ""
    """The data: a .csv, .tsv, .jsonl/.json (JSON lines) or .parquet file, optionally .gz or .zst, as a local path or
    s3://bucket/key; or a Hub dataset hf://datasets/ORG/NAME[@REVISION] (its Parquet files). Required."""
    format: str = choice("auto", ("auto", "csv", "tsv", "jsonl", "parquet"))
    """auto (from data.uri's extension), csv, tsv, jsonl or parquet: overrides the extension (compression still comes
    from .gz/.zst)."""
    split: str = "train"
    """Which split of an hf://datasets/... repo to read (train, validation, test, ...)."""
    label_column: str = "gold_label"
    """Column whose value selects the rows to keep."""
    label: Optional[str] = "contradiction"
    """Keep rows whose label_column equals this; null keeps every row."""
    source_column: str = "sentence1"
    """Column with the model's input (the sentence to negate)."""
    target_column: str = "sentence2"
    """Column with the gold output (the negation)."""
    eval_size: int = at_least(500, 0)
    """Rows held out for evaluation (seeded random choice). 0 disables evaluation data."""
    max_rows: Optional[int] = at_least(None, 1, "or null for all rows")
    """Use at most this many kept rows (seeded sample) before splitting; null uses all."""
    seed: int = 42
    """Seed for the eval split and the sample."""


@dataclass
class PromptConfig:
    """The Alpaca-style template shared by training, evaluation and `job predict`."""

    preamble: str = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request."
    )
    """First paragraph of every prompt."""
    instruction: str = (
        "Write the negation of the input sentence. Answer with a JSON object with the keys "
        '"original_sentence" (the input, copied exactly) and "negation" (a sentence that '
        "contradicts it)."
    )
    """The task, under `### Instruction:`."""
    original_key: str = "original_sentence"
    """JSON key that echoes the input."""
    output_key: str = "negation"
    """JSON key of the answer."""


@dataclass
class ModelConfig:
    """The base model: a Hugging Face model folder (config, safetensors weights, tokenizer)."""

    uri: str = ""
    """Hugging Face model folder: local path, s3://bucket/prefix, hf://ORG/NAME[@REVISION] (Hugging Face Hub; token
    from HF_TOKEN) or gguf:... Required."""
    cache_dir: str = ""
    """Where the model is downloaded once and reused on restart. Empty: $JOB_CACHE_DIR or ~/.cache/qlora-job."""
    attn_implementation: str = "auto"
    """auto, varlen, sdpa, eager, flex_attention, flash_attention_2 ... (auto: training uses varlen, PyTorch's
    variable-length FlashAttention, on a CUDA GPU with packed batches, else sdpa; inference uses sdpa. flex_attention
    compiles on first use, see docs/benchmarks.md)."""


@dataclass
class StorageConfig:
    """How to reach S3-compatible object storage (AWS, MinIO, R2, Ceph)."""

    endpoint_url: str = ""
    """Custom S3 endpoint. Empty: boto3's default (AWS, or $AWS_ENDPOINT_URL)."""
    max_attempts: int = at_least(10, 1)
    """Attempts per request, with exponential backoff on throttling, 5xx and dropped connections."""
    max_concurrency: int = at_least(8, 1)
    """Parallel parts and files per transfer."""
    multipart_chunk_mb: int = at_least(64, 1)
    """Files above this size go up and down in parts of this size."""
    lease_seconds: int = at_least(120, 3, "it is renewed every third")
    """Lease on run_uri (_lease.json) that keeps a second job out; renewed every third of this. A second job exits 4
    once it sees the holder renew, or takes over when it was not renewed this long (at once on the same machine when
    the holder's process is gone)."""
    lease: bool = True
    """true: take the lease above (on S3, only if the store honours conditional writes: one that ignores
    If-None-Match / If-Match is refused with exit 2). false: no lease at all, one writer by convention (a warning at
    start): for such stores."""
    access_key_id: str = secret("", "Access key; prefer the AWS_* environment variables or a role.")
    secret_access_key: str = secret("", "Secret key; prefer the AWS_* environment variables or a role.")
    session_token: str = secret("", "Session token, if the key is temporary.")


@dataclass
class TrainConfig:
    """QLoRA training: the notebook's method (NF4 base, LoRA r=64, alpha 16, dropout 0.1), done right."""

    load_in_4bit: bool = True
    """Quantize the frozen base to 4-bit NF4 (QLoRA). false trains plain LoRA on a 16/32-bit base."""
    quant_type: str = choice("nf4", ("nf4", "fp4"))
    """bitsandbytes 4-bit type: nf4 or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bit per parameter)."""
    compute_dtype: str = choice("auto", ("auto", "bf16", "fp16", "fp32"))
    """auto (bf16 where the GPU supports it, else fp16; fp32 on CPU), bf16, fp16 or fp32."""
    lora_r: int = at_least(64, 1)
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input."""
    target_modules: Union[str, list] = "all-linear"
    """LoRA targets: "all-linear" or a list of module names such as [q_proj, v_proj]; each must match a module of the
    model (checked when it loads)."""
    learning_rate: float = 2e-4
    """Peak learning rate of the LoRA weights."""
    lr_scheduler: str = "cosine"
    """linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup or inverse_sqrt."""
    warmup_steps: int = at_least(10, 0)
    """Linear warm-up steps."""
    weight_decay: float = at_least(0.0, 0)
    """AdamW weight decay."""
    max_grad_norm: float = at_least(0.3, 0)
    """Gradient clipping norm (the QLoRA paper's 0.3)."""
    optimizer: str = "auto"
    """auto (fused AdamW on CUDA, AdamW on CPU) or any transformers `optim` name."""
    epochs: float = 1.0
    """Passes over the training data (when max_steps is -1)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 runs `epochs`."""
    micro_batch_size: Union[int, str] = "auto"
    """Sequences per device per step ("auto": chosen from free GPU memory)."""
    gradient_accumulation: int = at_least(1, 1)
    """Micro-batches per optimizer step, per GPU: the effective batch is micro batch x this x GPUs."""
    max_seq_length: int = at_least(512, 1)
    """Longer examples are dropped and counted in the metrics (never silently truncated)."""
    packing: bool = True
    """Pack examples into rows without cross-example attention (padding-free, position ids)."""
    packing_length: Union[int, str] = "auto"
    """Tokens per packed row ("auto": chosen from free GPU memory)."""
    gradient_checkpointing: Union[bool, str] = "auto"
    """Recompute activations to save memory ("auto": from free GPU memory)."""
    liger: Union[bool, str] = "auto"
    """Liger kernels for RoPE, RMSNorm and SwiGLU (package liger-kernel, in the image and the `gpu` extra): auto uses
    them on CUDA when installed and the architecture is supported; true requires them (exit 2 if they cannot be
    used); false: off."""
    fused_lora: Union[bool, str] = "auto"
    """Compute each LoRA layer as one autograd function added in place to the base layer's output (job/fused_lora.py:
    the same forward and gradients as peft's, without peft's copies of each layer's output): auto uses it on CUDA;
    true always; false: peft's own forward."""
    recompute_lora_dropout: Union[bool, str] = "auto"
    """Draw the LoRA dropout's masks again in the backward pass instead of storing them and the dropped inputs (the
    same forward and gradients, less activation memory, so the planner takes a larger micro-batch): auto does it
    when activation checkpointing is off and the fused LoRA function is on (train.fused_lora; measured faster
    than storing); true always (without the fused function by folding the dropout into lora_A, 7% slower than
    peft at the same batch); false: stored, as peft does."""
    seed: int = 42
    """Seed for LoRA initialisation, shuffling and dropout."""
    logging_steps: int = at_least(10, 1)
    """Log loss and learning rate every N steps (also into the trackers and the loss curve)."""
    report_to: Union[str, list] = "tensorboard"
    """Experiment trackers: none, tensorboard (event files uploaded to tensorboard/), mlflow, wandb, or a list such
    as [tensorboard, mlflow]. Settings come from their environment variables (MLFLOW_TRACKING_URI, WANDB_API_KEY,
    WANDB_MODE, ...); a failing tracker only warns."""
    checkpoint_every_steps: int = at_least(100, 0)
    """Save and upload a checkpoint every N optimizer steps (0: off)."""
    checkpoint_every_minutes: float = at_least(30.0, 0)
    """... and/or every M minutes of training (0: off)."""
    keep_checkpoints: int = at_least(2, 1)
    """Checkpoints kept in storage (the newest K)."""
    background_upload: bool = True
    """Upload checkpoints while training continues."""
    dataloader_workers: int = at_least(0, 0)
    """Worker processes feeding batches (data is pre-tokenized, so 0 is usually enough)."""
    distributed_timeout_minutes: float = at_least(60.0, 1)
    """Multi-GPU runs: how long a GPU process waits for the others (covers rank 0's format stage and model download)."""


@dataclass
class MergeConfig:
    """Merging the adapter into a 16-bit copy of the base model (never into the 4-bit training model)."""

    enabled: bool = True
    """false: stop at the adapter (no merged/ folder; evaluate then uses base+adapter)."""
    dtype: str = choice("auto", ("auto", "bf16", "fp16", "fp32"))
    """auto (bf16, or fp16 on a GPU without bf16), bf16, fp16 or fp32: the merged model's weights."""
    device: str = choice("auto", ("auto", "cuda", "cpu"))
    """Where the B @ A products of the merge run: auto (the GPU when there is one, else the CPU), cuda or cpu. The
    weights stream through host memory either way (a few GB whatever the model's size)."""
    max_shard_size: str = "2GB"
    """Largest safetensors file in merged/: bytes, or digits with GB, MB, KB, GiB, MiB, KiB (e.g. 2GB, 500MB)."""
    check_prompts: int = at_least(4, 1)
    """Eval examples (prompt and gold answer) run through base+adapter and the merged model to compare logits."""
    tolerance: float = at_least(0.0, 0)
    """Max allowed logit difference between merged and base+adapter; 0 picks one suited to the dtype
    (bf16 0.08, fp16 0.01, fp32 1e-4, times the largest logit when above 1)."""
    check_logits: Union[bool, str] = "auto"
    """Compare merged vs base+adapter logits on check_prompts examples: auto runs it on the GPU when the 16-bit model
    fits its free memory, else on the CPU for a model of at most 4 GiB (and a quarter of free RAM), else skips it
    (the per-tensor weights check always runs); true always (CPU if need be); false never."""


@dataclass
class ExportConfig:
    """GGUF files for llama.cpp / Ollama / LM Studio, written from merged/ (job/export_gguf.py)."""

    enabled: bool = False
    """true: after merge, write export/<name>.<type>.gguf and an Ollama Modelfile (needs merge.enabled)."""
    gguf: list = field(default_factory=lambda: ["q8_0"])
    """GGUF types to write, any of f16, bf16, q8_0, q4_0 (K-quants: llama-quantize on the f16 file)."""
    name: str = "model"
    """File name stem: export/<name>.<type>.gguf."""
    check_prompts: int = at_least(4, 0, "0 skips the tokenizer and logits checks")
    """Eval examples each GGUF's tokenizer (and, for models up to 1B parameters, logits: transformers' GGUF
    loader) is compared to merged/ on; 0 skips those. Every tensor is read back and compared regardless."""
    min_agreement: float = 0.0
    """Least share of positions where the GGUF's top token equals merged/'s; 0 picks one per type
    (f16 0.98, bf16 0.95, q8_0 0.9, q4_0 0.5)."""


@dataclass
class EvaluateConfig:
    """Generation on the held-out rows and the report."""

    enabled: bool = True
    """false: no evaluation and no report/."""
    max_new_tokens: int = at_least(128, 1)
    """Generation stops at EOS or after this many new tokens (counted in eos_stop_rate)."""
    batch_size: int = at_least(16, 1)
    """Prompts generated together (left padding), at most: on a GPU lowered to what the free memory holds,
    and halved whenever CUDA runs out of memory."""
    model: str = choice("auto", ("auto", "merged", "adapter"))
    """The fine-tuned model to generate with (also `job predict`'s): merged: merged/ in 16 bits (the base with
    adapter/ in 16 bits when merge is disabled); adapter: the base in 4 bits (train.quant_type) with adapter/,
    the model as trained, in about a quarter of the GPU memory; auto: merged when its 16 bits fit the GPU's
    free memory (always on the CPU), else adapter. The report says which was used and why."""
    compare_base: bool = True
    """Also run the untouched base model on the same prompts (in the same precision), for a side-by-side report."""
    max_examples: Optional[int] = at_least(None, 1, "or null for all")
    """Evaluate at most this many eval rows; null: all."""
    do_sample: bool = False
    """false: greedy decoding (reproducible); true: sampling at `temperature`."""
    temperature: float = 1.0
    """Sampling temperature (only with do_sample: true)."""


@dataclass
class Config:
    """The whole job."""

    run_uri: str = ""
    """Where the run writes: local folder or s3://bucket/prefix. Required."""
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


SECTIONS = {f.name for f in dataclasses.fields(Config) if f.name != "run_uri"}
# Dotted names of the secret fields ("storage.secret_access_key", ...). Their values are taken
# literally from the environment, --set and hyperparameters (YAML would turn 0123 into 83 or cut a
# "#..." tail off), and a problem with one never shows its value.
SECRET_KEYS = frozenset(f"{name}.{f.name}" for name in SECTIONS
                        for f in dataclasses.fields(getattr(Config(), name)) if f.metadata.get("secret"))
REQUIRED = ("run_uri", "data.uri", "model.uri")
ENV_PREFIX = "JOB_"
# Top-level JOB_* variables that are settings of the job but not config keys (the entry point, logging
# and the cache read them). Any other JOB_* name without two underscores is not ours and is ignored.
ENV_SETTINGS = ("JOB_CACHE_DIR", "JOB_NPROC", "JOB_EXIT_CODE_FILE", "JOB_SAGEMAKER_HYPERPARAMETERS",
                "JOB_LOG_FORMAT", "JOB_SHUTDOWN_TIMEOUT")
SAGEMAKER_HYPERPARAMETERS = "/opt/ml/input/config/hyperparameters.json"


# ----------------------------------------------------------------------------------------------
# Layers: each becomes a flat {"section.key": (value, source)} mapping, applied in order.


def _flatten(tree: dict, source: str, problems: list, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "" and key in SECTIONS:
            flat.update(_flatten(value, source, problems, prefix=f"{key}."))
        else:
            flat[dotted] = (value, source)
    return flat


def _file_layer(path: str, problems: list) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        problems.append(f"--config {path}: cannot read ({exc.strerror})")
        return {}
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        problems.append(f"--config {path}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                        "re-save the file as UTF-8")
        return {}
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        # Not str(exc): PyYAML quotes the offending lines, which may be the secret_access_key line.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"--config {path}: not valid YAML{where}: {getattr(exc, 'problem', None) or 'parse error'}")
        return {}
    if not isinstance(tree, dict):
        problems.append(f"--config {path}: the top level must be a mapping of sections")
        return {}
    return _flatten(tree, f"config file {path}", problems)


def _hyperparameters_layer(path: str, problems: list) -> dict:
    """SageMaker passes hyperparameters as a JSON object of strings; keys are dotted (train.lora_r)."""
    if not Path(path).is_file():
        return {}
    try:
        tree = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: not valid JSON ({exc})")
        return {}
    if not isinstance(tree, dict):
        problems.append(f"{path}: must be a JSON object of \"section.key\": value pairs, got a JSON "
                        f"{type(tree).__name__}")
        return {}
    return {key: (_parse_scalar(value) if isinstance(value, str) and key not in SECRET_KEYS else value, path)
            for key, value in tree.items()
            # SageMaker adds its own sagemaker_* entries for script mode: not ours.
            if not key.startswith("sagemaker_")}


def _env_layer(environ: dict, problems: list) -> dict:
    """JOB_<SECTION>__<KEY> and JOB_RUN_URI are configuration; ENV_SETTINGS are read elsewhere. Any other
    JOB_* name belongs to someone else (Jenkins sets JOB_NAME, JOB_URL, JOB_BASE_NAME) and is ignored,
    with a debug note. A name with the documented shape (two underscores, JOB_TRAN__LR) is always read,
    so a misspelt section or key is an error, not a silently ignored setting."""
    flat = {}
    top_level = {f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_SETTINGS:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if "__" in rest:
            dotted = rest.replace("__", ".", 1)
        elif rest in top_level:
            dotted = rest
        else:
            log.debug("environment variable %s: not a JOB_<SECTION>__<KEY> or JOB_RUN_URI setting; ignored", name)
            continue
        bad = _not_utf8(value)
        if bad:
            problems.append(f"environment variable {name}: {bad}")
            continue
        flat[dotted] = (value if dotted in SECRET_KEYS else _parse_scalar(value), f"environment variable {name}")
    return flat


def _not_utf8(text: str) -> str:
    """'' for proper text, else what is wrong: Python turns bytes that are not UTF-8 in arguments and
    environment variables into lone surrogates (surrogateescape), which would crash the first write."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as exc:
        raw = text[exc.start].encode("utf-8", "surrogateescape") if "\udc80" <= text[exc.start] <= "\udcff" else b""
        byte = f"byte 0x{raw[0]:02x}" if raw else "a lone surrogate"
        return f"not valid UTF-8 ({byte} at character {exc.start + 1}); pass UTF-8 text"


def _set_layer(assignments: tuple, problems: list) -> dict:
    flat = {}
    for item in assignments:
        if "=" not in item:
            problems.append(f"--set {item}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
            continue
        key, value = item.split("=", 1)
        key = key.strip()
        bad = _not_utf8(key) or _not_utf8(value)
        if bad:  # named by key only: the value may be a secret
            problems.append(f"--set {key.encode('utf-8', 'backslashreplace').decode()}: {bad}")
            continue
        flat[key] = (value if key in SECRET_KEYS else _parse_scalar(value), f"--set {key}")
    return flat


def _parse_scalar(text: str) -> Any:
    """Strings from env/--set/hyperparameters are parsed as YAML scalars (1e-4, true, null, [a, b])."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------------------------
# Types: coerce a layered value to the field's declared type, or explain why not.


def _coerce(value: Any, annotation: Any) -> Any:
    """Return value converted to `annotation`, or raise TypeError with the expected type's name."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except TypeError:
                continue
        raise TypeError(" or ".join(_type_name(o) for o in options))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError("an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. max_shard_size: 2000 or a numeric label
        raise TypeError("a string")
    if annotation is list:
        if isinstance(value, list):
            return value
        raise TypeError("a list")
    raise TypeError(_type_name(annotation))


def _type_name(annotation) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", type(None): "null"}.get(annotation, str(annotation))


_HINTS_CACHE: dict = {}


def _field_types(cls) -> dict:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


# ----------------------------------------------------------------------------------------------


def load_config(config_file: Optional[str] = None, assignments: tuple = (),
                environ: Optional[dict] = None, hyperparameters: Optional[str] = None,
                literal: Optional[dict] = None) -> Config:
    """Build the Config from every layer; raise one ConfigError listing every problem. `literal` is
    {key: (text, source)} applied last as given, never read as YAML: a path from an argument such as
    `job predict --model 0123` is that folder, not the number 83."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    layers = []
    if config_file:
        layers.append(_file_layer(config_file, problems))
    elif config_file is not None:  # `--config ""` (an unset shell variable): not "no file"
        problems.append("--config: the path is empty; give a YAML file, or leave --config out")
    hp_path = hyperparameters or environ.get("JOB_SAGEMAKER_HYPERPARAMETERS", SAGEMAKER_HYPERPARAMETERS)
    layers.append(_hyperparameters_layer(hp_path, problems))
    layers.append(_env_layer(environ, problems))
    layers.append(_set_layer(assignments, problems))
    layers.append(literal or {})

    cfg = Config()
    for layer in layers:
        for dotted, (value, source) in layer.items():
            _assign(cfg, dotted, value, source, problems)

    for key in REQUIRED:
        if not get_key(cfg, key):
            env = ENV_PREFIX + key.upper().replace(".", "__", 1)
            problems.append(f"{key}: required but not set (config file, {env}, or --set {key}=...)")
    problems.extend(_check_values(cfg))
    if problems:
        raise ConfigError(["invalid configuration:"] + [f"  - {p}" for p in problems])
    return cfg


def _assign(cfg: Config, dotted: str, value: Any, source: str, problems: list) -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        section, name = cfg, parts[0]
    elif len(parts) == 2 and parts[0] in SECTIONS:
        section, name = getattr(cfg, parts[0]), parts[1]
    else:
        problems.append(f"{dotted}: unknown key (from {source}); sections are {', '.join(sorted(SECTIONS))}")
        return
    if dataclasses.is_dataclass(getattr(section, name, None)):
        problems.append(f"{dotted}: is a section; set its keys, e.g. {dotted}.<key> (from {source})")
        return
    known = {f.name for f in dataclasses.fields(section)}
    if name not in known:
        close = [k for k in known if k.startswith(name[:4])]
        hint = f"; did you mean {', '.join(sorted(close))}?" if close else ""
        problems.append(f"{dotted}: unknown key (from {source}){hint}")
        return
    if dotted in SECRET_KEYS:
        # A secret is a string; a number here is YAML's reading of an unquoted key (0123 -> 83) and would
        # be sent mangled. The value is never shown.
        if isinstance(value, str):
            setattr(section, name, value)
        else:
            problems.append(f"{dotted}: expected a string (quote it in YAML), got {type(value).__name__}; "
                            f"value not shown, it is a secret (from {source})")
        return
    try:
        setattr(section, name, _coerce(value, _field_types(type(section))[name]))
    except TypeError as exc:
        problems.append(f"{dotted}: expected {exc}, got {value!r} (from {source})")


# Float keys whose own rule (at_least, or a special rule below) also refuses nan and inf, so the generic
# "must be a finite number" rule in _check_run_values leaves them alone. YAML reads .nan and .inf as numbers.
_OWN_FINITE_RULE = ("train.learning_rate", "train.weight_decay", "train.max_grad_norm",
                    "train.checkpoint_every_minutes", "train.epochs", "train.lora_dropout", "merge.tolerance")


def _check_field_rules(cfg: Config) -> list[str]:
    """The rules the fields carry in their metadata: choice(...) and at_least(...)."""
    problems = []
    for section in (f.name for f in dataclasses.fields(Config) if f.name in SECTIONS):  # in file order
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            key, value = f"{section}.{f.name}", getattr(values, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                problems.append(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
            minimum = f.metadata.get("at_least")
            if minimum is None or value is None:
                continue
            # nan is not below the minimum by `<`; it is refused here only where this rule owns finiteness
            # (else the finite-number rule reports it, once).
            if value < minimum or (key in _OWN_FINITE_RULE and not math.isfinite(value)):
                wording = {0: ">= 0", 1: "positive"}.get(minimum, f"at least {minimum}")
                note = f" ({f.metadata['note']})" if f.metadata["note"] else ""
                problems.append(f"{key}: must be {wording}{note}, got {value}")
    return problems


# model.attn_implementation: transformers' kernels, "varlen" (job/attention.py) and "auto". Whether the chosen
# one can run on this machine (flash-attn installed, a GPU) is checked before a model loads (job/attention.py).
ATTENTION_NAMES = ("auto", "varlen", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def _check_values(cfg: Config) -> list[str]:
    problems = _check_field_rules(cfg)
    for key in ("train.micro_batch_size", "train.packing_length"):
        value = get_key(cfg, key)
        if isinstance(value, str) and value != "auto" or isinstance(value, int) and value < 1:
            problems.append(f"{key}: must be a positive integer or \"auto\", got {value!r}")
    if isinstance(cfg.train.gradient_checkpointing, str) and cfg.train.gradient_checkpointing != "auto":
        problems.append(f"train.gradient_checkpointing: must be true, false or \"auto\", "
                        f"got {cfg.train.gradient_checkpointing!r}")
    if isinstance(cfg.train.liger, str) and cfg.train.liger != "auto":
        problems.append(f"train.liger: must be true, false or \"auto\", got {cfg.train.liger!r}")
    if isinstance(cfg.train.fused_lora, str) and cfg.train.fused_lora != "auto":
        problems.append(f"train.fused_lora: must be true, false or \"auto\", got {cfg.train.fused_lora!r}")
    if isinstance(cfg.train.recompute_lora_dropout, str) and cfg.train.recompute_lora_dropout != "auto":
        problems.append("train.recompute_lora_dropout: must be true, false or \"auto\", got "
                        f"{cfg.train.recompute_lora_dropout!r}")
    if isinstance(cfg.merge.check_logits, str) and cfg.merge.check_logits != "auto":
        problems.append(f"merge.check_logits: must be true, false or \"auto\", got {cfg.merge.check_logits!r}")
    if cfg.evaluate.temperature <= 0:
        problems.append(f"evaluate.temperature: must be positive, got {cfg.evaluate.temperature}")
    if not 0 <= cfg.train.lora_dropout < 1:
        problems.append(f"train.lora_dropout: must be in [0, 1), got {cfg.train.lora_dropout}")
    attention = cfg.model.attn_implementation
    if attention not in ATTENTION_NAMES and "/" not in str(attention):
        problems.append(f"model.attn_implementation: unknown attention {attention!r}; use one of "
                        f"{', '.join(ATTENTION_NAMES)} (or a Hub kernel repo such as kernels-community/flash-attn)")
    if cfg.data.source_column == cfg.data.target_column:
        problems.append("data.source_column and data.target_column: must name different columns")
    if cfg.prompt.original_key == cfg.prompt.output_key:
        problems.append("prompt.original_key and prompt.output_key: must differ")
    problems.extend(_check_run_values(cfg))
    problems.extend(_check_uris(cfg))
    problems.extend(tracker_problems(cfg.train.report_to))
    return problems


# train.report_to's names (job/trackers.py makes the callbacks); checked here so config needs no tracker code.
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")


def tracker_problems(report_to) -> list[str]:
    """Config validation: known names, and "none" alone."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        return [f"train.report_to: must be one of {', '.join(TRACKERS)} or a list of them, got {report_to!r}"]
    if "none" in names and len(names) > 1:
        return [f"train.report_to: \"none\" cannot be combined with other trackers, got {report_to!r}"]
    return []


# transformers' SchedulerType and OptimizerNames values (transformers 5.x), kept as literals because
# importing transformers' enums costs seconds (it imports torch) and `job config` must stay fast;
# tests/test_config_checks.py checks that these lists still equal the installed transformers' enums.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
# Scheduler names transformers knows that this job cannot run: they need settings it has no key for.
UNSUPPORTED_SCHEDULERS = {
    "reduce_lr_on_plateau": "needs evaluation during training",
    "greedy": "needs evaluation during training",
    "cosine_with_min_lr": "needs lr_scheduler_kwargs (min_lr)",
    "cosine_warmup_with_min_lr": "needs lr_scheduler_kwargs (min_lr)",
    "warmup_stable_decay": "needs lr_scheduler_kwargs (num_decay_steps)",
}
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit",
    "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit",
    "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
    "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
    "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
    "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
)
SEED_MAX = 2**32 - 1  # numpy's RandomState (pandas' sample) takes seeds in 0..2**32-1


def shard_size_bytes(value: str) -> int:
    """merge.max_shard_size in bytes, with transformers' convert_file_size_to_int semantics: a byte count
    (2000000000) or digits and a unit: GB/MB/KB (powers of 10), GiB/MiB/KiB (powers of 2), lower-case
    b for bits (2Gb = 250000000 bytes). ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([GMK]i?[Bb])?\s*", value, flags=re.IGNORECASE)
    if not match:
        raise ValueError(value)
    number, unit = int(match.group(1)), match.group(2)
    if unit is None:
        return number
    power = {"G": 3, "M": 2, "K": 1}[unit[0].upper()]
    if unit[1] in "iI":
        return number * 2 ** (10 * power)
    return number * 10 ** (3 * power) // (8 if unit.endswith("b") else 1)


def _check_run_values(cfg: Config) -> list[str]:
    """Values that would otherwise fail (or silently do nothing) only inside a stage, after the expensive
    work before it: every rule here is listed in the README's "Configuration" section."""
    problems = []
    d, t, m = cfg.data, cfg.train, cfg.merge
    for section in SECTIONS:  # YAML reads .nan and .inf as numbers: no setting of the job means either
        for f in dataclasses.fields(getattr(cfg, section)):
            value, key = getattr(getattr(cfg, section), f.name), f"{section}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value) and key not in _OWN_FINITE_RULE:
                problems.append(f"{key}: must be a finite number, got {value}")
    for key in ("data.seed", "train.seed"):
        if not 0 <= get_key(cfg, key) <= SEED_MAX:
            problems.append(f"{key}: must be between 0 and {SEED_MAX} (2**32-1), got {get_key(cfg, key)}")
    if d.label is not None:
        for other in ("source_column", "target_column"):
            if d.label_column == getattr(d, other):
                problems.append(f"data.label_column and data.{other}: must name different columns (both "
                                f"{d.label_column!r}); or set data.label: null to keep every row")
    if d.eval_size == 0 and cfg.evaluate.enabled:
        problems.append("data.eval_size: is 0, but evaluate.enabled is true and evaluation needs held-out rows; "
                        "set data.eval_size above 0, or evaluate.enabled: false")
    for key in ("train.learning_rate", "train.lora_alpha"):
        value = get_key(cfg, key)
        if not (value > 0 and math.isfinite(value)):
            problems.append(f"{key}: must be a positive number, got {value}")
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"train.max_steps: must be positive, or -1 to run train.epochs, got {t.max_steps}")
    if t.max_steps == -1 and not (t.epochs > 0 and math.isfinite(t.epochs)):
        problems.append(f"train.epochs: must be positive when train.max_steps is -1, got {t.epochs}")
    if t.lr_scheduler in UNSUPPORTED_SCHEDULERS:
        problems.append(f"train.lr_scheduler: {t.lr_scheduler!r} {UNSUPPORTED_SCHEDULERS[t.lr_scheduler]}, which "
                        f"this job does not set; choose one of {', '.join(SCHEDULERS)}")
    elif t.lr_scheduler not in SCHEDULERS:
        problems.append(f"train.lr_scheduler: must be one of {', '.join(SCHEDULERS)}, got {t.lr_scheduler!r}")
    if t.optimizer != "auto" and t.optimizer not in OPTIMIZERS:
        close = [name for name in OPTIMIZERS if name.startswith(t.optimizer[:5])] or [
            "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "sgd"]
        problems.append(f"train.optimizer: must be auto or a transformers optimizer name "
                        f"(e.g. {', '.join(close[:6])}), got {t.optimizer!r}")
    if isinstance(t.target_modules, list):
        if not t.target_modules or not all(isinstance(n, str) and n.strip() for n in t.target_modules):
            problems.append(f"train.target_modules: must be \"all-linear\" or a non-empty list of module names "
                            f"(e.g. [q_proj, v_proj]), got {t.target_modules!r}")
    elif not t.target_modules.strip():
        problems.append("train.target_modules: must be \"all-linear\" or a list of module names, got ''")
    elif t.target_modules != "all-linear":  # PEFT reads any other string as a regular expression
        try:
            re.compile(t.target_modules)
        except re.error as exc:
            problems.append(f"train.target_modules: {t.target_modules!r} is neither \"all-linear\" nor a valid "
                            f"regular expression ({exc}); for names use a list, e.g. [q_proj, v_proj]")
    if t.packing and isinstance(t.packing_length, int) and 0 < t.packing_length < t.max_seq_length:
        problems.append(f"train.packing_length ({t.packing_length}) is shorter than train.max_seq_length "
                        f"({t.max_seq_length}): an example of train.max_seq_length tokens would not fit in a packed "
                        "row; raise train.packing_length or lower train.max_seq_length")
    problems.extend(_check_export(cfg))
    try:
        if shard_size_bytes(m.max_shard_size) < 1:
            raise ValueError(m.max_shard_size)
    except ValueError:
        problems.append(f"merge.max_shard_size: must be a size such as 2GB, 500MB, 4GiB or a number of bytes, "
                        f"got {m.max_shard_size!r}")
    return problems


EXPORT_NAME_MAX = 200


def _check_export(cfg: Config) -> list[str]:
    """export.*: known GGUF types, a usable file name, and merge enabled when export is."""
    e, problems = cfg.export, []
    types = ("f16", "bf16", "q8_0", "q4_0")
    if (not isinstance(e.gguf, list) or not e.gguf or any(t not in types for t in e.gguf)
            or len(set(e.gguf)) < len(e.gguf)):
        problems.append(f"export.gguf: must be a non-empty list of distinct types from {', '.join(types)} "
                        f"(K-quants such as q4_k_m: run llama-quantize on the f16 file), got {e.gguf!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", e.name or ""):
        problems.append(f"export.name: must be a file name stem (letters, digits, . _ -), got {e.name!r}")
    elif len(e.name) > EXPORT_NAME_MAX:  # <name>.<type>.gguf and its temporary name must fit a file name
        problems.append(f"export.name: {len(e.name)} characters, at most {EXPORT_NAME_MAX} (file names stop at 255 "
                        f"bytes and the export writes {e.name[:12]}....<type>.gguf); got {e.name[:40]!r}...")
    if e.enabled:
        # The Ollama Modelfile holds the training prompt in TEMPLATE """...""": a prompt with """ cannot be
        # written there. Refused only when the export runs: training and evaluation take any prompt.
        quoted = [f"prompt.{k}" for k in ("preamble", "instruction") if '"""' in str(getattr(cfg.prompt, k))]
        if quoted:
            problems.append(f"{', '.join(quoted)}: contains \"\"\", which the Ollama Modelfile's "
                            "TEMPLATE \"\"\"...\"\"\" cannot hold; change the text or set export.enabled: false")
    if not 0 <= e.min_agreement <= 1:
        problems.append(f"export.min_agreement: must be between 0 and 1 (0: per-type default), got {e.min_agreement}")
    if e.enabled and not cfg.merge.enabled:
        problems.append("export.enabled: is true, but merge.enabled is false and the export reads merged/; "
                        "enable the merge or set export.enabled: false")
    return problems


def home_problem(path: str) -> str:
    """What is wrong with a local path that no file system call can take ("" when nothing is): a NUL
    character (ValueError), a name longer than 255 bytes (ENAMETOOLONG), `~user/...` whose user has no
    home folder (RuntimeError from Path.expanduser): each failed deep in whatever read the path first."""
    if "\x00" in path:
        return "contains a NUL character, which no file name can hold"
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in path.split("/")):
        return "has a name longer than 255 bytes, more than a file system allows"
    if not path.startswith("~"):
        return ""
    try:
        Path(path).expanduser()
    except RuntimeError:
        return (f"{path!r} starts with ~{path[1:].split('/', 1)[0]}, but there is no such user whose home folder "
                "it could mean; give the full path (or ./ before a folder really named so)")
    return ""


def _check_uris(cfg: Config) -> list[str]:
    """URIs the storage layer understands: a path, file://, s3:// (and http(s):// for the endpoint).
    Anything else would be taken for a local path and fail later with a confusing "no such file"."""
    problems = []
    for key in ("run_uri", "data.uri", "model.uri"):
        value = get_key(cfg, key)
        scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", value)
        if scheme and scheme.group(1) == "hf" and key != "run_uri":
            problems.extend(_check_hub_uri(key, value))
        elif scheme and scheme.group(1) not in ("s3", "file"):
            problems.append(f"{key}: {scheme.group(1)}:// URLs are not supported ({_mask_userinfo(value)}); use a "
                            f"local path, file://PATH or s3://bucket/{'key' if key == 'data.uri' else 'prefix'}")
    for key in ("run_uri", "data.uri", "model.uri", "model.cache_dir"):
        value = get_key(cfg, key)
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", value) and not value.startswith("file://"):
            value = value.split("://", 1)[1] if "\x00" in value else ""  # a key or prefix, not a local path
        problem = home_problem(value.removeprefix("file://"))
        if problem:
            problems.append(f"{key}: {problem}")
    endpoint = cfg.storage.endpoint_url
    if endpoint and not re.match(r"https?://[^/\s]", endpoint):
        # botocore would raise a ValueError quoting the whole value (exit 1, a traceback, any password in it).
        problems.append(f"storage.endpoint_url: must start with http:// or https://, got {_mask_userinfo(endpoint)!r}")
    return problems


def _check_hub_uri(key: str, value: str) -> list[str]:
    """hf://ORG/NAME[@REV] is a model, hf://datasets/ORG/NAME[@REV] a dataset (job/hub.py fetches them)."""
    from job.hub_uri import parse_hf_uri

    try:
        ref = parse_hf_uri(value, key)
    except ConfigError as exc:
        return exc.problems
    if key == "data.uri" and ref.repo_type != "dataset":
        return [f"data.uri: {value} names a model repo; a Hub dataset is hf://datasets/ORG/NAME[@REVISION]"]
    if key == "model.uri" and ref.repo_type != "model":
        return [f"model.uri: {value} names a dataset repo; a Hub model is hf://ORG/NAME[@REVISION]"]
    return []


def _mask_userinfo(url: str) -> str:
    """redact_text, also for a URL written without its scheme (user:pass@host:9000)."""
    masked = redact_text(url)
    if "://" not in masked and "@" in masked.split("/", 1)[0]:
        masked = f"{REDACTED}@{masked.split('@', 1)[1]}"
    return masked


def get_key(cfg: Config, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Any, redact: bool = True) -> dict:
    """The config as plain data; secret fields (and credentials inside URLs) replaced by ***."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value, redact)
        elif redact and f.metadata.get("secret") and value:
            value = REDACTED
        elif redact and isinstance(value, str):
            value = redact_text(value)
        out[f.name] = value
    return out


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact_text(text: str) -> str:
    """Hide user:password@ in URLs."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def secret_values(cfg: Config) -> list[str]:
    """Every secret the config holds, so a log filter can mask them wherever they appear: the secret
    fields, and the user:password part of any URL-like value (also where a message quotes it without
    its scheme)."""
    values = [get_key(cfg, key) for key in sorted(SECRET_KEYS) if get_key(cfg, key)]
    for key in ("run_uri", "data.uri", "model.uri", "storage.endpoint_url"):
        optional = "?" if key == "storage.endpoint_url" else ""  # paths may hold an '@'; an endpoint is a host
        userinfo = re.match(rf"(?:[a-zA-Z][a-zA-Z0-9+.-]*://){optional}([^/@\s]+)@", get_key(cfg, key))
        if userinfo:
            values.append(userinfo.group(1))
            values.append(userinfo.group(1).partition(":")[2])  # the password alone
    return [v for v in values if v]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=100)


def section_digest(*sections: Any) -> str:
    """A stable hash of config sections, used in stage fingerprints."""
    payload = json.dumps([to_dict(s, redact=True) if dataclasses.is_dataclass(s) else s for s in sections],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
