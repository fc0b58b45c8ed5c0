"""Read a written GGUF back tensor by tensor and compare every tensor with merged/'s, in bounded memory.

    result = check_tensors(plan, "model.q8_0.gguf", "q8_0")   # {"passed", "problems", "types", ...}

Why per tensor: comparing logits needs both whole models in memory (transformers' GGUF loader
dequantizes the whole file into float32 on the host: 37 GB for a 7B), and on random or near-tied
weights a correct export still flips top tokens. A per-tensor comparison is exact about what an
exporter can get wrong (a name, a permutation, a type, a dropped tensor) at any model size.

How: the GGUF is memory-mapped (gguf.GGUFReader); each tensor is dequantized (gguf.quants) a slice of
rows at a time and compared with the same rows of merged/ (safetensors slices), so the peak is a few
slices plus one q/k projection, not the model. The reference side is built independently of the
exporter's plan: merged/'s own safetensors headers, gguf's name map, and an inverse of llama.cpp's q/k
row permutation written here (not the exporter's function), so a bug in either is caught.

Tolerances (per block of 32 values along a row, `amax` the block's largest |value| in merged/):
- F32, F16, BF16: bit-exact with merged/'s values cast to that type (the exporter casts, nothing else).
- Q8_0: |error| <= amax * (0.5/127 + 2^-10): half a quantization step, plus the fp16 rounding of the
  block scale times the largest code (127 * 2^-11 of the step).
- Q4_0: |error| <= amax * (1/8 + 2^-8): a full step (the code opposite the extreme clamps at 7, not 8),
  plus the fp16 scale rounding.
A wrong permutation or a swapped tensor misses these bounds by far (errors of the size of amax).

Intentionally absent from the file (and reported as such): lm_head.weight of a model with tied
embeddings (llama.cpp reuses token_embd) and rotary inv_freq buffers (every runtime recomputes them).
"""

from __future__ import annotations

import math
from pathlib import Path

from job.model_files import safetensors_header, tensors

ROWS_PER_SLICE_ELEMENTS = 1 << 24  # 64 MB of float32 per slice on each side
BOUNDS = {"Q8_0": 0.5 / 127 + 2 ** -10, "Q4_0": 1 / 8 + 2 ** -8}  # x amax of the block
MAX_PROBLEMS = 20


def merged_tensors(model_dir: Path) -> dict:
    """merged/'s tensors from the safetensors headers: name -> (file, shape). The first file wins, as
    transformers does for a name repeated across shards."""
    found = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in tensors(safetensors_header(path)[1]).items():
            found.setdefault(name, (path, tuple(info["shape"])))
    return found


def dropped_reason(name: str, config: dict) -> str | None:
    if name == "lm_head.weight" and config.get("tie_word_embeddings", False):
        return "tied to the embedding: llama.cpp computes the logits with token_embd"
    if name.endswith("rotary_emb.inv_freq"):
        return "recomputed from rope_theta by every runtime"
    return None


def unpermute_qk(w, n_head: int):
    """The inverse of llama.cpp's q/k row permutation: the file's interleaved pairs (row 2*i + half of a
    head) back to Hugging Face's rotate-half layout (row half * rows_per_head/2 + i)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _exact(expected_dtype):
    """A comparison that demands bit-equality with merged/'s values cast to the stored type."""
    def compare(ref, got):
        import torch

        want = ref.to(expected_dtype).float() if expected_dtype is not None else ref
        same = torch.equal(want, got) or bool(((want == got) | (want.isnan() & got.isnan())).all())
        return 0.0 if same else math.inf, float((want - got).abs().max())
    return compare


def _blockwise(ggml_name: str):
    bound = BOUNDS[ggml_name]

    def compare(ref, got):
        blocks_ref = ref.reshape(-1, 32)
        amax = blocks_ref.abs().amax(dim=1)
        err = (blocks_ref - got.reshape(-1, 32)).abs().amax(dim=1)
        limit = amax * bound * 1.0001 + 1e-30
        ratio = float((err / limit).max()) if err.numel() else 0.0
        if not math.isfinite(ratio):
            ratio = math.inf
        return ratio, float(err.max()) if err.numel() else 0.0
    return compare


def comparison(ggml_type):
    """(ggml type) -> compare(ref_rows, gguf_rows) -> (error / allowed, max abs error); <= 1 passes."""
    import torch

    name = ggml_type.name
    if name in BOUNDS:
        return _blockwise(name)
    return _exact({"F32": None, "F16": torch.float16, "BF16": torch.bfloat16}[name])


def _gguf_rows(tensor, start: int, stop: int):
    """Rows [start, stop) of a GGUF tensor, dequantized to float32 (a 1-D tensor is one row)."""
    import gguf
    import torch

    data = tensor.data if tensor.data.ndim == 1 and len(tensor.shape) == 1 else tensor.data[start:stop]
    values = gguf.quants.dequantize(data, tensor.tensor_type)
    return torch.from_numpy(values.astype("float32", copy=False).copy())


def check_tensors(plan, gguf_path: Path, out_type: str) -> dict:
    """Compare every tensor of `gguf_path` with merged/ (`plan.model_dir`). Never loads a whole model."""
    import gguf
    import torch
    from safetensors import safe_open

    from job.export_gguf import TensorSpec, head_dim, llama3_rope_factors, rope_settings, tensor_type

    cfg = plan.config
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    reader = gguf.GGUFReader(str(gguf_path), "r")  # memory-mapped: tensors are read when sliced
    in_file = {t.name: t for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, plan.arch.name_map_arch),
                                        int(cfg["num_hidden_layers"]))
    problems, dropped, matched = [], {}, set()
    types: dict[str, dict] = {}  # ggml type -> {"tensors", "worst_ratio", "worst_tensor", "max_abs_error"}

    def record(ggml_name, gname, ratio, max_err):
        entry = types.setdefault(ggml_name, {"tensors": 0, "worst_ratio": 0.0, "worst_tensor": "",
                                             "max_abs_error": 0.0})
        entry["tensors"] += 1
        entry["max_abs_error"] = max(entry["max_abs_error"], max_err)
        if ratio >= entry["worst_ratio"]:
            entry["worst_ratio"], entry["worst_tensor"] = ratio, gname

    for name, (file, shape) in merged_tensors(plan.model_dir).items():
        reason = dropped_reason(name, cfg)
        if reason:
            dropped[name] = reason
            continue
        gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        tensor = in_file.get(gname) if gname else None
        if tensor is None:
            problems.append(f"{name}: missing from the file" + (f" (expected as {gname})" if gname else
                                                               " (no GGUF name for it)"))
            continue
        matched.add(gname)
        file_shape = tuple(int(d) for d in reversed(list(tensor.shape)))
        if file_shape != shape:
            problems.append(f"{gname} ({name}): shape {list(file_shape)} in the file, {list(shape)} in merged/")
            continue
        wanted = tensor_type(TensorSpec(name, gname, shape, file), out_type)
        if tensor.tensor_type != wanted:
            problems.append(f"{gname}: stored as {tensor.tensor_type.name}, expected {wanted.name} for {out_type}")
            continue
        compare = comparison(tensor.tensor_type)
        qk = plan.arch.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias",
                                                     "self_attn.k_proj.weight", "self_attn.k_proj.bias"))
        ratio, max_err = 0.0, 0.0
        with safe_open(file, framework="pt") as f:
            if qk or len(shape) == 1:  # whole (q/k rows move within a head; 1-D tensors are small)
                ref = f.get_tensor(name).float()
                got = _gguf_rows(tensor, 0, shape[0]).reshape(shape)
                if qk:
                    got = unpermute_qk(got, n_head if ".q_proj." in name else n_kv)
                ratio, max_err = compare(ref, got)
            else:
                step = max(1, ROWS_PER_SLICE_ELEMENTS // max(1, math.prod(shape[1:])))
                source = f.get_slice(name)
                for start in range(0, shape[0], step):
                    stop = min(shape[0], start + step)
                    ref = source[start:stop].float()
                    r, e = compare(ref, _gguf_rows(tensor, start, stop).reshape(ref.shape))
                    ratio, max_err = max(ratio, r), max(max_err, e)
                    del ref
        record(tensor.tensor_type.name, gname, ratio, max_err)
        if ratio > 1.0:
            problems.append(f"{gname} ({name}, {tensor.tensor_type.name}): differs from merged/ by up to "
                            f"{max_err:.3g}, {'beyond rounding' if math.isfinite(ratio) else 'not bit-exact'}"
                            f"{f' ({ratio:.1f}x the allowed error)' if math.isfinite(ratio) else ''}"
                            + (" - a wrong q/k permutation?" if qk else ""))

    if plan.rope_factors is not None or "rope_freqs.weight" in in_file:
        tensor = in_file.get("rope_freqs.weight")
        _theta, scaling = rope_settings(cfg)
        expected = (llama3_rope_factors(cfg, scaling) if scaling is not None
                    and scaling.get("rope_type", scaling.get("type")) == "llama3" else None)
        if tensor is None or expected is None:
            problems.append("rope_freqs.weight: " + ("missing (Llama-3 rope scaling needs it)" if tensor is None
                                                     else "in the file, but merged/ has no Llama-3 rope scaling"))
        else:
            matched.add("rope_freqs.weight")
            got = _gguf_rows(tensor, 0, len(expected))
            if got.shape[0] != len(expected) or got.shape[0] != head_dim(cfg) // 2 or not torch.allclose(
                    got, torch.tensor(expected, dtype=torch.float32)):
                problems.append("rope_freqs.weight: values differ from the Llama-3 factors of merged/'s config")
    for extra in sorted(set(in_file) - matched):
        problems.append(f"{extra}: in the file but not from any tensor of merged/")

    shown = problems[:MAX_PROBLEMS] + ([f"... and {len(problems) - MAX_PROBLEMS} more"]
                                       if len(problems) > MAX_PROBLEMS else [])
    return {"passed": not problems, "problems": shown, "tensors_checked": sum(t["tensors"] for t in types.values()),
            "tensors_in_file": len(in_file), "dropped": dropped, "types": types}
