"""LoRA merged into the base model's safetensors shard by shard, tensor by tensor, in bounded memory.

The merge stage's weights path (job/stages/merge.py). Host memory is about one weight tensor in fp32
(a few of them while it is merged) plus the adapter, whatever the model's size: each tensor is read from
the base's safetensors with plain file reads (no mmap: pages of a 10 GB memory-mapped shard would count
in the resident set), merged, rounded once to the merge dtype and written straight into its output shard,
whose header is planned before any data (every output size is known from the input headers). A 70B merges
on a host with a few GB free; the GPU, when there is one, only does the B @ A products.

Math, per LoRA module: W' = round(fp32(W) + scale * fp32(B) @ fp32(A)), transposed for fan_in_fan_out
and for embeddings as peft does; scale = alpha / r (alpha / sqrt(r) with use_rslora, alpha_pattern and
rank_pattern honoured). One rounding, from the base's own precision (a GGUF-converted fp32 base is not
rounded to 16 bits first, unlike a 16-bit load then merge: the two differ by at most one rounding).

The check (verify_merged) reads every written tensor back from disk and compares it with the fp32
W + scale * B @ A recomputed from the base and the adapter: within one rounding of the merge dtype
(error <= 1 ulp; round to nearest gives <= 0.5), and tensors without LoRA equal to the base's in the
merge dtype.

Names: the adapter names modules as peft wrapped them (base_model.model.model.layers.0.self_attn.q_proj);
the checkpoint names tensors as the model was saved (model.layers.0.self_attn.q_proj.weight, sometimes
with another prefix). The prefix mapping is derived from the actual names (name_mapper) and every LoRA
module must land on a tensor (else exit 2). A tied output head (lm_head with tie_word_embeddings, absent
from the checkpoint) lands on the input embedding: peft's merge_and_unload merges into that shared tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from job.errors import InputError, JobError
from job.model_files import safetensors_header, tensors

PEFT_PREFIX = "base_model.model."
# safetensors dtype names (the header's "dtype") and torch's, both ways.
ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
FLOATS = ("BF16", "F16", "F32", "F64")
# adapter_config.json settings this merge does not implement: refused (exit 2) rather than merged wrong.
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "layer_replication": "layer_replication",
               "trainable_token_indices": "trainable_token_indices", "use_qalora": "QALoRA (use_qalora)",
               "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)"}
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


class MergeWeightsError(JobError):
    """A merged tensor is not base + adapter within one rounding, or not finite: nothing is kept (exit 1)."""


@dataclass
class LoraModule:
    """One LoRA module of the adapter (module path without peft's prefix) and how to merge it."""

    module: str
    a: object = None
    b: object = None
    b_bias: object = None
    embedding: bool = False
    scale: float = 0.0
    fan_in_fan_out: bool = False

    def delta(self, device: str):
        """scale * B @ A in fp32 on `device`, in the base weight's layout (out, in), or (vocab, dim) for an
        embedding, whose A is (r, vocab) and B (dim, r)."""
        a, b = self.a.to(device).float(), self.b.to(device).float()
        product = b @ a
        if self.embedding or self.fan_in_fan_out:
            product = product.T
        return product * self.scale


@dataclass
class Adapter:
    """adapter/ read for merging: LoRA modules, and whole tensors that replace the base's (bias="all" or
    "lora_only" biases, modules_to_save), keyed by the module path or tensor name without peft's prefix."""

    config: dict
    modules: dict = field(default_factory=dict)
    replacements: dict = field(default_factory=dict)


def read_adapter(adapter_dir: Path) -> Adapter:
    """adapter_config.json + adapter_model.safetensors -> Adapter, refusing what is not implemented."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    where = f"{adapter_dir.name}/adapter_config.json"
    if config.get("peft_type") != "LORA":
        raise InputError(f"{where}: peft_type {config.get('peft_type')!r}; the merge handles LoRA adapters only")
    refused = [label for key, label in UNSUPPORTED.items() if config.get(key)]
    if refused:
        raise InputError(f"{where}: {', '.join(refused)} is not supported by the merge; serve base+adapter "
                         "(merge.enabled: false) or train a plain LoRA adapter")
    adapter = Adapter(config)
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, slot, embedding in ((".lora_A.weight", "a", False), (".lora_B.weight", "b", False),
                                        (".lora_B.bias", "b_bias", False), (".lora_embedding_A", "a", True),
                                        (".lora_embedding_B", "b", True)):
            if name.endswith(suffix):
                module = adapter.modules.setdefault(name[:-len(suffix)], LoraModule(name[:-len(suffix)]))
                setattr(module, slot, tensor)
                module.embedding = module.embedding or embedding
                break
        else:
            if "lora_" in name:
                raise InputError(f"{adapter_dir.name}/adapter_model.safetensors: tensor {key} is a LoRA part "
                                 "the merge does not know (DoRA magnitude, a LoRA variant); it cannot be merged")
            # modules_to_save (peft saves the trained copy as <module>.<param>, older versions as
            # <module>.modules_to_save.<param>), biases trained with bias="all"/"lora_only", and, with an embedding
            # or a tied lm_head among the targets, the base layer (<module>.base_layer.<param>, loaded over the
            # base's by peft): each replaces the base tensor.
            adapter.replacements[name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")] = tensor
    for module in adapter.modules.values():
        if module.a is None or module.b is None:
            raise InputError(f"{adapter_dir.name}/adapter_model.safetensors: {module.module} has only half of its "
                             "LoRA pair (lora_A and lora_B); the adapter is damaged: rerun with --force train")
        module.scale = lora_scale(config, module.module, module.a.shape[0])
        module.fan_in_fan_out = bool(config.get("fan_in_fan_out")) and not module.embedding
    return adapter


def lora_scale(config: dict, module: str, rank: int) -> float:
    """peft's scaling for `module`: alpha / r, or alpha / sqrt(r) with use_rslora; alpha_pattern (regex
    on the module path, as peft matches it) overrides lora_alpha; r is the module's actual rank, which
    is what rank_pattern gave it."""
    from peft.utils.other import get_pattern_key

    alpha = config.get("lora_alpha", 8)
    patterns = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(patterns), module)
    if key in patterns:
        alpha = patterns[key]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ----------------------------------------------------------------------------------------------
# the base model's tensors


@dataclass
class SourceTensor:
    name: str
    file: Path
    offset: int  # absolute, in the file
    nbytes: int
    dtype: str  # safetensors name
    shape: list


def source_tensors(model_dir: Path) -> list[SourceTensor]:
    """Every tensor of the base's safetensors files, file by file in the index's order, each in file order
    (sequential reads)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = list(dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = []
    for name in files:
        path = model_dir / name
        header_len, header = safetensors_header(path)
        entries = sorted(tensors(header).items(), key=lambda kv: kv[1]["data_offsets"][0])
        for tensor, info in entries:
            start, end = info["data_offsets"]
            out.append(SourceTensor(tensor, path, 8 + header_len + start, end - start, info["dtype"], info["shape"]))
    return out


def read_tensor(src: SourceTensor):
    """The tensor's bytes, read (not mapped) into a fresh CPU tensor."""
    import torch

    buffer = torch.empty(src.nbytes, dtype=torch.uint8)
    with open(src.file, "rb") as f:
        f.seek(src.offset)
        if f.readinto(buffer.numpy()) != src.nbytes:
            raise InputError(f"{src.file}: tensor {src.name} is cut short; the file is truncated")
    return buffer.view(getattr(torch, ST_DTYPES[src.dtype])).reshape(src.shape)


def name_mapper(params: list[str], names: set[str]):
    """A function from a module parameter path (model.layers.0.self_attn.q_proj.weight) to the checkpoint's
    tensor name: identity, or one prefix stripped or added, whichever maps the most parameters (derived
    from the first parameter that has a match)."""
    candidates = [("", "")]
    for probe in params:
        for name in names:
            if name.endswith("." + probe):
                candidates.append(("", name[:-len(probe)]))
            elif probe.endswith("." + name):
                candidates.append((probe[:-len(name)], ""))
        if len(candidates) > 1:
            break

    def mapper(strip: str, add: str):
        return lambda p: add + p[len(strip):] if p.startswith(strip) else None

    best = max((mapper(*c) for c in candidates), key=lambda f: sum(f(p) in names for p in params))
    return best


def tied_embeddings(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


@dataclass
class TensorPlan:
    """What the merge does to one tensor: add a LoRA delta, and/or replace it (bias, modules_to_save)."""

    lora: list = field(default_factory=list)
    replacement: object = None


def plan_tensors(adapter: Adapter, sources: list[SourceTensor], model_dir: Path) -> dict[str, TensorPlan]:
    """Checkpoint tensor name -> TensorPlan; every LoRA module and replacement must find its tensor."""
    names = {s.name for s in sources}
    wanted = [m + ".weight" for m in adapter.modules] + list(adapter.replacements)
    mapped = name_mapper(wanted, names) if wanted else (lambda p: p)
    tied = tied_embeddings(model_dir)
    embedding = next((n for n in sorted(names) if n.endswith(EMBEDDING_NAMES)), None)
    plans: dict[str, TensorPlan] = {}
    missing = []

    def tensor_of(param: str) -> str:
        name = mapped(param)
        if name not in names and tied and embedding and param.split(".")[-2:-1] == ["lm_head"]:
            return embedding  # the tied head is the embedding matrix: peft merges into that shared tensor
        return name

    for module in adapter.modules.values():
        name = tensor_of(module.module + ".weight")
        if name not in names:
            missing.append(module.module)
            continue
        plans.setdefault(name, TensorPlan()).lora.append(module)
        if module.b_bias is not None:
            bias = mapped(module.module + ".bias")
            if bias not in names:
                raise InputError(f"adapter/: {module.module} has a LoRA bias (lora_bias) but the base model has no "
                                 f"{module.module}.bias tensor to merge it into")
            plans.setdefault(bias, TensorPlan()).lora.append(module)
    for key, tensor in adapter.replacements.items():
        name = tensor_of(key)
        if name not in names:
            missing.append(key)
            continue
        saved = adapter.config.get("modules_to_save") or []
        if tied and name == embedding and any(part in saved for part in key.split(".")):
            raise InputError(f"adapter/: {key} replaces the input embedding of a model with tied embeddings "
                             "(modules_to_save on a tied embedding or lm_head); the merge does not support it")
        plans.setdefault(name, TensorPlan()).replacement = tensor
    if missing:
        sample = ", ".join(sorted(names)[:4])
        raise InputError(f"adapter/ does not fit model.uri: {len(missing)} adapter module(s) match no tensor of the "
                         f"base model's safetensors, e.g. {', '.join(missing[:3])} (the base has e.g. {sample}). "
                         "The adapter was trained on another model: check model.uri, or rerun with --force train")
    return plans


# ----------------------------------------------------------------------------------------------
# merge and write


def merged_value(src: SourceTensor, plan: TensorPlan | None, device: str):
    """(fp32 merged tensor on the CPU, whether a LoRA delta or replacement changed it)."""
    import torch

    if plan is None:
        return read_tensor(src), False
    # A private fp32 copy (read_tensor's buffer, or a copy of the adapter's tensor), added to in place: the
    # largest temporaries are this tensor and one delta (a 70B's embedding: 4.2 GB each in fp32).
    value = (plan.replacement.to(torch.float32, copy=True) if plan.replacement is not None
             else read_tensor(src).float())
    for module in plan.lora:
        if src.name.endswith(".bias"):
            value += module.b_bias.float() * module.scale
            continue
        delta = module.delta(device)
        if tuple(delta.shape) != tuple(value.shape):
            raise InputError(f"adapter/: {module.module} gives a {tuple(delta.shape)} update for the base tensor "
                             f"{src.name} of shape {tuple(value.shape)}; the adapter does not fit model.uri")
        if device == "cpu":
            value += delta
        else:
            value = (value.to(device) + delta).cpu()
        del delta
    if not torch.isfinite(value).all():
        raise MergeWeightsError(f"merge: non-finite weights in {src.name} after merging the adapter; the adapter is "
                                "broken (NaN or inf in its weights)")
    return value, True


def out_dtype_name(src: SourceTensor, dtype) -> str:
    """Floating tensors go to the merge dtype, others (integer buffers) stay as they are."""
    if src.dtype in FLOATS:
        return {v: k for k, v in ST_DTYPES.items()}[str(dtype).removeprefix("torch.")]
    return src.dtype


def plan_shards(sources: list[SourceTensor], dtype, max_bytes: int) -> list[list[tuple]]:
    """[(source, output dtype, output bytes)] per output shard, in order, each at most max_bytes (a tensor
    larger than that gets a shard of its own), as save_pretrained splits."""
    import torch

    shards, current, size = [], [], 0
    for src in sources:
        out = out_dtype_name(src, dtype)
        nbytes = math.prod(src.shape) * torch.empty(0, dtype=getattr(torch, ST_DTYPES[out])).element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((src, out, nbytes))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shard(path: Path, entries: list[tuple], plans: dict, dtype, device: str) -> int:
    """One safetensors file: header (offsets planned from the sizes), then each tensor merged, rounded
    and written as it is made. Returns the number of tensors a LoRA delta or replacement changed."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for src, out, nbytes in entries:
        header[src.name] = {"dtype": out, "shape": src.shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    changed = 0
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for src, out, nbytes in entries:
            value, touched = merged_value(src, plans.get(src.name), device)
            changed += touched
            value = value.to(getattr(torch, ST_DTYPES[out])).contiguous()
            f.write(value.reshape(-1).view(torch.uint8).numpy())
            del value
    return changed


def merge_weights(model_dir: Path, adapter_dir: Path, out_dir: Path, dtype, device: str, max_shard_bytes: int) -> dict:
    """Write the merged weights (safetensors shards, and the index when there are several) into out_dir.
    Returns {"merged_tensors", "shards", "lora_modules", "tensors"}."""
    adapter = read_adapter(adapter_dir)
    sources = source_tensors(model_dir)
    plans = plan_tensors(adapter, sources, model_dir)
    shards = plan_shards(sources, dtype, max_shard_bytes)
    names = shard_names(len(shards))
    changed = 0
    for name, entries in zip(names, shards):
        changed += write_shard(out_dir / name, entries, plans, dtype, device)
    if len(shards) > 1:
        weight_map = {src.name: name for name, entries in zip(names, shards) for src, _, _ in entries}
        total = sum(nbytes for entries in shards for _, _, nbytes in entries)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return {"merged_tensors": changed, "shards": len(shards), "lora_modules": len(adapter.modules),
            "tensors": len(sources)}


# ----------------------------------------------------------------------------------------------
# the exact check


def rounding_error(got, expected) -> float:
    """Error of `got` against the fp32 `expected`, in units in the last place of got's dtype: 0 when exact,
    0.5 when every element is the correctly rounded value (the bound of round to nearest), else the largest
    error of the elements that are not (computed on those alone: cheap for a right merge)."""
    import torch

    rounded = expected.to(got.dtype)
    if torch.equal(got, rounded):
        return 0.0 if torch.equal(rounded.to(expected.dtype), expected) else 0.5
    differ = got != rounded  # NaN too
    return max(0.5, ulps(got[differ], expected[differ], got.dtype))


def ulps(result, expected, dtype):
    """max |result - expected| in units in the last place of `dtype` at |expected| (0 for exact)."""
    import torch

    info = torch.finfo(dtype)
    exponent = torch.frexp(expected.abs().clamp_min(info.smallest_normal))[1]
    spacing = torch.ldexp(torch.tensor(info.eps), (exponent - 1).float())  # eps x 2**floor(log2 |x|)
    return float(((result.float() - expected).abs() / spacing).max()) if expected.numel() else 0.0


def verify_merged(model_dir: Path, adapter_dir: Path, out_dir: Path, dtype, device: str) -> dict:
    """Read merged/'s tensors back from disk and compare each with fp32(W) + scale * B @ A recomputed
    from the base and the adapter: {"tensors_checked", "lora_tensors_checked", "max_error_ulps"}; raises
    MergeWeightsError past one rounding (1 ulp) or for a missing, extra or reshaped tensor."""
    import torch

    adapter = read_adapter(adapter_dir)
    sources = source_tensors(model_dir)
    plans = plan_tensors(adapter, sources, model_dir)
    written = {t.name: t for t in source_tensors(out_dir)}
    if set(written) != {s.name for s in sources}:
        extra = sorted(set(written) ^ {s.name for s in sources})
        raise MergeWeightsError(f"merge check: merged/ and the base model hold different tensors "
                                f"({', '.join(extra[:3])})")
    worst, lora_checked = 0.0, 0
    for src in sources:
        got = read_tensor(written[src.name])
        if list(got.shape) != list(src.shape) or got.dtype != getattr(torch, ST_DTYPES[out_dtype_name(src, dtype)]):
            raise MergeWeightsError(f"merge check: {src.name} was written as {got.dtype} {list(got.shape)}")
        expected, touched = merged_value(src, plans.get(src.name), device)
        lora_checked += touched
        if src.dtype in FLOATS and touched:
            error = rounding_error(got, expected)
            if not error <= 1.0:  # NaN fails too
                raise MergeWeightsError(f"merge check: {src.name} in merged/ differs from base + adapter by "
                                        f"{error:.3g} units in the last place of {got.dtype} (at most 1 allowed)")
            worst = max(worst, error)
        elif not torch.equal(got, expected.to(got.dtype)):  # untouched: the base's tensor in the merge dtype
            raise MergeWeightsError(f"merge check: {src.name} in merged/ differs from the base model's")
        del got, expected
    return {"tensors_checked": len(sources), "lora_tensors_checked": lora_checked, "max_error_ulps": worst}
