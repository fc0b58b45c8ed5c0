"""Merge stage: adapter/ + the 16-bit base model -> merged/, proven equal to base+adapter first.

setup (dtype, device) -> load the base in 16 bits and apply the adapter -> reference logits on a few
real examples (base+adapter, and the base alone, to measure what the adapter changes) -> merge every
LoRA layer in fp32 math -> the same logits from the merged model -> compare against a tolerance suited
to the dtype -> save merged/ (sharded safetensors, tokenizer, generation config) -> upload.

Why this way:
- The merge goes into a 16-bit copy of the base loaded from its original weights, never into the
  4-bit training model: merging into NF4 weights would bake the quantization error into every layer
  and the result could not be saved as an ordinary 16-bit model.
- Memory, "about one copy of the 16-bit model": the base is loaded once in the merge dtype (transformers
  5 loads weights straight into place, no second copy); the adapter stays separate in fp32 (small);
  each LoRA layer is merged in place with one fp32 temporary the size of one weight matrix. The
  reference logits are computed before the merge, so no second model is ever needed for the check.
- Math: W16 <- round16(float32(W16) + scale * float32(B) @ float32(A)). One rounding per weight, done
  in fp32 on both devices. On CPU this also avoids bf16 matmuls, which are pathologically slow on
  CPUs without native bf16 support. (A shard-by-shard safetensors rewrite would use even less memory
  but must re-implement peft's key mapping for every adapter variant, and still needs a loaded model
  for the logit check; loading once is simpler and meets the budget.)
- Device: the GPU when the 16-bit model fits in its free memory with headroom, else the CPU.
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

from job.config import Config, shard_size_bytes
from job.dtypes import dtype_name, pick_dtype
from job.errors import JobError
from job.layout import ADAPTER, EVAL_DATA, MERGED, TRAIN_DATA, local_merged
from job.model import attn_implementation, fetch_model, load_tokenizer
from job.model_files import weights_bytes
from job.platform import free_gpu_memory
from job.run_files import check_adapter, download_run_folder, read_jsonl
from job.stages.merged import forget_local_merged, stamp_local_merged

# Auto tolerance: max |merged - (base+adapter)| over every logit of the check examples, relative to the
# largest reference logit (logit scales differ by model: about 1 for a random tiny model, 10-40 for a
# trained 7B). Both sides run in the same dtype, so the difference is rounding: the merged weight is
# rounded once to 16 bits where base+adapter rounds the two products separately; the error then grows
# through the layers. Unit roundoff is 2**-8 for bf16, 2**-11 for fp16, 2**-24 for fp32; the factors
# give room for accumulation through a deep network (measured on the tiny model: bf16 about 0.3-1 %
# of the scale, fp32 about 1e-6; see tests/test_merge.py). A wrong merge (adapter missing, wrong
# scale, wrong layer) moves logits by the adapter's own effect, reported next to it as adapter_effect.
RELATIVE_TOLERANCE = {"bfloat16": 0.08, "float16": 0.01, "float32": 1e-4}


class MergeCheckError(JobError):
    """The merged model does not reproduce base+adapter: it is not saved (exit code 1)."""

    @classmethod
    def logits_differ(cls, check: dict, dtype: str, examples: int) -> "MergeCheckError":
        """The refusal for a check over the tolerance, with the likely cause and what to do."""
        if check["max_logit_diff"] > 0.5 * check["adapter_effect"]:
            advice = (f"The gap is most of the adapter's own effect: its weight updates are mostly smaller than "
                      f"{dtype} can represent next to the base weights (typical of an adapter trained for few "
                      f"steps), so a {dtype} merge would silently drop them. Use merge.dtype=fp32, train "
                      f"longer, or serve base+adapter (merge.enabled: false).")
        else:
            advice = ("If the gap is rounding, raise merge.tolerance or use merge.dtype=fp32; otherwise the adapter "
                      "does not fit this base model (check model.uri).")
        return cls(f"merge check failed: the merged model's logits differ from base+adapter by up to "
                   f"{check['max_logit_diff']:.4g}, over the tolerance {check['tolerance']:.4g} for {dtype} "
                   f"(logit scale {check['logit_scale']:.3g}, adapter effect {check['adapter_effect']:.3g}, "
                   f"{check['tokens']} tokens of {examples} examples). {MERGED}/ was not written. " + advice)


def run(cfg: Config, ctx) -> dict:
    """fetch base and adapter/ -> load base+adapter -> reference logits -> merge -> check -> save and upload."""
    forget_local_merged(ctx.work_root)  # stamped again once merged/ is complete and uploaded
    model_dir, adapter_dir, tokenizer = fetch_inputs(cfg, ctx)
    dtype, model_bytes, device, why = plan_merge(cfg, ctx, model_dir)

    from peft import PeftModel  # noqa: F401 - imported before measuring, so the peak is the model's
    from transformers import AutoModelForCausalLM  # noqa: F401

    memory = PeakMemory(device)
    with ctx.timer("load"):
        model = load_with_adapter(model_dir, adapter_dir, dtype, device, attn_implementation(cfg))
    examples = check_examples(ctx.store, tokenizer, max(1, cfg.merge.check_prompts))
    reference = logits_of(model, examples)
    with model.disable_adapter():
        base_only = logits_of(model, examples)
    with ctx.timer("merge"):
        merged, merged_layers = merge_in_fp32(model)
    del model
    check = compare_logits(reference, logits_of(merged, examples), base_only, dtype, cfg.merge.tolerance)
    refuse_unless_equal(check, dtype, len(examples), merged_layers, ctx)

    with ctx.timer("save_upload"):
        save_merged(merged, tokenizer, local_merged(ctx.work_root), cfg.merge.max_shard_size)
        peak = memory.stop()
        del merged
        free_gpu_memory()  # the evaluate stage that follows needs it
        files = upload_merged(ctx)
    shards = [f for f in files if f.endswith(".safetensors")]
    ctx.log.info("merge: %s/ written (%d safetensors shards); peak memory %s", MERGED, len(shards), peak)
    return {
        **check,
        "dtype": dtype_name(dtype),
        "device": device,
        "device_reason": why,
        "model_bytes": model_bytes,
        "merged_layers": merged_layers,
        "check_examples": len(examples),
        "shards": len(shards),
        "files": files,
        **peak,
        "load_seconds": ctx.seconds("load"),
        "merge_seconds": ctx.seconds("merge"),
        "save_upload_seconds": ctx.seconds("save_upload"),
        "stage_seconds": ctx.elapsed(),
    }


def fetch_inputs(cfg: Config, ctx) -> tuple[Path, Path, object]:
    """(base model folder, adapter/ downloaded and checked, tokenizer: the adapter's when it has one)."""
    model_dir = fetch_model(cfg.model.uri, cfg)
    adapter_dir = ctx.work_dir / ADAPTER
    shutil.rmtree(adapter_dir, ignore_errors=True)
    download_run_folder(ctx.store, ADAPTER, adapter_dir, "train")
    check_adapter(adapter_dir, ctx.store.uri_of(ADAPTER))
    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_dir,
                               cfg.model.uri)
    return model_dir, adapter_dir, tokenizer


def plan_merge(cfg: Config, ctx, model_dir: Path) -> tuple[object, int, str, str]:
    """(dtype, the model's bytes in it, device, why that device)."""
    import torch

    dtype, dtype_reason = pick_dtype(cfg.merge.dtype, "merge")
    model_bytes = weights_bytes(model_dir, torch.tensor([], dtype=dtype).element_size())
    device, why = choose_device(cfg.merge.device, model_bytes)
    ctx.log.info("merge: %s model (%.2f GB in %s, %s) on %s (%s)", cfg.model.uri, model_bytes / 1e9,
                 dtype_name(dtype), dtype_reason, device, why)
    return dtype, model_bytes, device, why


def refuse_unless_equal(check: dict, dtype, examples: int, merged_layers: int, ctx) -> None:
    """Log the check; raise MergeCheckError when the merged logits are over the tolerance (NaN too)."""
    ctx.log.info("merge: %d LoRA layers merged in %.1f s; max logit difference merged vs base+adapter %.3g "
                 "(tolerance %.3g, logit scale %.3g), the adapter itself moves logits by up to %.3g",
                 merged_layers, ctx.seconds("merge"), check["max_logit_diff"], check["tolerance"],
                 check["logit_scale"], check["adapter_effect"])
    if not check["max_logit_diff"] <= check["tolerance"]:  # NaN fails too
        raise MergeCheckError.logits_differ(check, dtype_name(dtype), examples)
    if check["adapter_effect"] <= check["tolerance"]:
        ctx.log.warning("merge: the adapter changes logits by at most %.3g, within the tolerance: it is "
                        "(nearly) a no-op, so the check cannot tell a wrong merge from a right one",
                        check["adapter_effect"])


def upload_merged(ctx) -> list[str]:
    """Replace the run's merged/ with the local copy, then stamp that copy for evaluate and export on
    this machine (they reuse it instead of downloading it again)."""
    ctx.store.delete(MERGED)
    files = ctx.store.upload_dir(local_merged(ctx.work_root), MERGED)
    stamp_local_merged(ctx.work_root, ctx.fingerprint)
    return files


# ----------------------------------------------------------------------------------------------
# setup


def choose_device(setting: str, model_bytes: int) -> tuple[str, str]:
    import torch

    if setting == "cpu":
        return "cpu", "merge.device=cpu"
    if not torch.cuda.is_available():
        if setting == "cuda":
            raise JobError("merge.device=cuda but no CUDA device is visible; use merge.device=auto or cpu")
        return "cpu", "no GPU"
    free_gpu_memory()  # memory the train stage left cached in this process is free for us
    free, _total = torch.cuda.mem_get_info()
    # The model, the fp32 adapter and one fp32 weight temporary, activations of the check examples.
    needed = model_bytes * 1.15 + 1.5 * 2**30
    if setting == "cuda" or needed < free:
        return "cuda", f"needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return "cpu", f"needs about {needed / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free on the GPU"


def load_with_adapter(model_dir: Path, adapter_dir: Path, dtype, device: str, attn: str):
    """The base in `dtype` on `device` with the adapter applied (adapter weights kept in fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    # autocast_adapter_dtype (the default) keeps LoRA weights in fp32 next to a 16-bit base.
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False, autocast_adapter_dtype=True)
    return model.eval()


def check_examples(store, tokenizer, n: int) -> list[list[int]]:
    """Token ids of `n` eval examples exactly as training saw them: prompt (with special tokens) +
    completion + EOS, so the check covers the answer positions the adapter was trained on."""
    records = []
    for path in (EVAL_DATA, TRAIN_DATA):
        if store.exists(path):
            records = read_jsonl(store, path, "format", keys=("prompt", "completion"), allow_empty=True)[:n]
        if records:
            break
    examples = []
    for r in records:
        prompt = tokenizer(r["prompt"])["input_ids"]
        completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        examples.append(prompt + completion + [tokenizer.eos_token_id])
    if not examples:  # no data at all (cannot happen after format): a fixed text still checks the weights
        examples.append(tokenizer("The merge check.")["input_ids"])
    return examples


# ----------------------------------------------------------------------------------------------
# merge and check


def logits_of(model, examples: list[list[int]]) -> list:
    """fp32 CPU logits, one example at a time (no padding to get wrong, and little memory)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in examples:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits
            out.append(logits[0].float().cpu())
    return out


def merge_in_fp32(model) -> tuple[object, int]:
    """Merge every LoRA layer into its base weight in fp32 math; return (plain model, layers merged)."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import transpose

    merged = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for adapter in module.active_adapters:
                vanilla = (isinstance(module, LoraLinear) and adapter in module.lora_A
                           and adapter not in getattr(module, "lora_variant", {})
                           and not module.lora_bias.get(adapter, False))
                if not vanilla:
                    # DoRA, embedding LoRA, LoRA bias ...: peft's own merge, with its NaN check.
                    module.merge(safe_merge=True, adapter_names=[adapter])
                    merged += 1
                    continue
                weight = module.get_base_layer().weight
                a = module.lora_A[adapter].weight.float()
                b = module.lora_B[adapter].weight.float()
                update = weight.float() + transpose(b @ a, module.fan_in_fan_out) * module.scaling[adapter]
                if not torch.isfinite(update).all():
                    raise MergeCheckError(f"merge: non-finite weights after merging the adapter into {name}; "
                                          "the adapter is broken (NaN or inf in its weights)")
                weight.copy_(update.to(weight.dtype))
                del update
                merged += 1
    # Every adapter is now inside the base weights: drop the LoRA modules without merging again.
    return model.unload(), merged


def compare_logits(reference: list, merged: list, base_only: list, dtype, tolerance: float) -> dict:
    import torch

    diff = max(float((r - m).abs().max()) for r, m in zip(reference, merged))
    effect = max(float((r - b).abs().max()) for r, b in zip(reference, base_only))
    scale = max(float(r.abs().max()) for r in reference)
    agree = torch.cat([(r.argmax(-1) == m.argmax(-1)).float() for r, m in zip(reference, merged)])
    auto = RELATIVE_TOLERANCE[dtype_name(dtype)] * max(1.0, scale)
    return {
        "max_logit_diff": diff,
        "tolerance": tolerance if tolerance > 0 else auto,
        "tolerance_source": "merge.tolerance" if tolerance > 0 else
                            f"auto: {RELATIVE_TOLERANCE[dtype_name(dtype)]:g} x max(1, logit scale) "
                            f"for {dtype_name(dtype)}",
        "logit_scale": scale,
        "adapter_effect": effect,
        "top1_agreement": float(agree.mean()),
        "tokens": int(agree.numel()),
    }


# ----------------------------------------------------------------------------------------------
# save


def save_merged(model, tokenizer, out_dir: Path, max_shard_size: str) -> None:
    """Sharded safetensors, the tokenizer (pad token set, left padding for inference) and a generation
    config whose EOS is the token training appended to every example, so generation stops there."""
    shutil.rmtree(out_dir, ignore_errors=True)
    eos = [tokenizer.eos_token_id]
    existing = model.generation_config.eos_token_id
    for token in existing if isinstance(existing, list) else [existing]:
        if token is not None and token not in eos:
            eos.append(token)
    model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # In bytes: transformers reads a str such as "2000" (a YAML number) as a malformed size.
    model.save_pretrained(out_dir, max_shard_size=shard_size_bytes(max_shard_size))
    tokenizer.save_pretrained(out_dir)
    # Batched generation pads on the left: make that the saved default for whoever serves merged/
    # (transformers writes padding_side only when it was given at load time, so set it in the file).
    config_path = out_dir / "tokenizer_config.json"
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    settings.update(padding_side="left", pad_token=tokenizer.pad_token)
    config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class PeakMemory:
    """Peak memory of what runs between start and stop: GPU allocations on CUDA, resident set on CPU.

    On Linux the resident-set high-water mark is reset first (/proc/self/clear_refs), so a training
    stage earlier in the same process does not count; elsewhere ru_maxrss (process lifetime) is used.
    """

    def __init__(self, device: str):
        import torch

        self.device = device
        self.reset = False
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            pass
        self.rss_start = _status_kb("VmRSS")

    def stop(self) -> dict:
        import torch

        peak_kb = _status_kb("VmHWM") if self.reset else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        result = {"peak_rss_gb": round(peak_kb / 2**20, 3),
                  "rss_before_load_gb": round((self.rss_start or 0) / 2**20, 3),
                  "peak_rss_measure": "VmHWM since load" if self.reset else "ru_maxrss (process lifetime)"}
        result["peak_gpu_memory_gb"] = (round(torch.cuda.max_memory_allocated() / 2**30, 3)
                                        if self.device == "cuda" else None)
        return result


def _status_kb(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None

