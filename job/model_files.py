"""What a Hugging Face model folder holds, read from its files alone: is it usable (config, weights,
tokenizer, every shard whole), and how big are its weights. Shared by the model fetch, the GGUF
conversion, merge, evaluate, export and the checkpoint checks; nothing here loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from job.errors import InputError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


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
        header_len, header = safetensors_header(path)
        end = max((t["data_offsets"][1] for t in tensors(header).values()), default=0)
    except NotSafetensors:
        return "is not a safetensors file"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "is damaged (its header does not parse)"
    size = path.stat().st_size
    if size != 8 + header_len + end:
        return f"is truncated or damaged ({size:,} bytes, its header says {8 + header_len + end:,})"
    return None


class NotSafetensors(ValueError):
    """The first 8 bytes announce a header larger than safetensors allows."""


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, reading the header only: tensor name ->
    {"dtype", "shape", "data_offsets"}, plus "__metadata__" when present."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > 100 * 2**20:  # safetensors caps headers at 100 MB: this is not one
            raise NotSafetensors(path)
        return header_len, json.loads(f.read(header_len))


def tensors(header: dict) -> dict:
    """The header's tensors, without its "__metadata__"."""
    return {name: info for name, info in header.items() if name != "__metadata__"}


def weights_bytes(model_dir: Path, bytes_per_param: int) -> int:
    """The model's size at `bytes_per_param`, from the safetensors headers (nothing is loaded)."""
    total_params = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for path in files:
        for info in tensors(safetensors_header(path)[1]).values():
            count = 1
            for dim in info["shape"]:
                count *= dim
            total_params += count
    if not files:  # pytorch_model.bin: assume fp32 on disk
        total_params = sum(p.stat().st_size for p in Path(model_dir).glob("*.bin")) // 4
    return total_params * bytes_per_param
