"""Merge stage: adapter/ + the base model's weights -> merged/, every tensor checked, then the logits.

fetch base and adapter -> merge shard by shard (job/stream_merge.py) into a temporary folder -> read every
written tensor back and check it is W + scale * B @ A within one rounding -> config, generation config and
tokenizer -> the logits check where it is affordable -> rename the folder into place -> upload.

Why this way:
- The merge goes into the base's original weights (16/32-bit safetensors), never into the 4-bit training
  model: merging into NF4 would bake the quantization error into every layer.
- Memory: shard by shard, tensor by tensor (stream_merge), so host memory is about one weight matrix in
  fp32 plus the adapter, whatever the model's size (a 7B merged on CPU peaked at 15.6 GB RSS when the
  whole model was loaded, issue 20). The GPU, when there is one, only does the B @ A products.
- The check is exact and cheap: each tensor on disk against fp32 W + scale * B @ A (max error in units in
  the last place). The end-to-end logits check (base+adapter vs merged/ on check_prompts eval examples)
  needs the whole model once, so it runs where that is affordable (check_logits_plan) and is reported as
  skipped, with the reason, elsewhere.
- A base that is not plain safetensors (pytorch_model.bin, a pre-quantized checkpoint) is merged the older
  way: loaded whole with the adapter, merged layer by layer in fp32 (merge_in_fp32), logits checked.
- Nothing half-written is mistaken for finished: shards go to merged.partial/, renamed at the end; the
  stage's marker is written after the upload.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from job.config import Config, shard_size_bytes
from job.dtypes import dtype_name, pick_dtype
from job.errors import JobError
from job.layout import ADAPTER, EVAL_DATA, MERGED, TRAIN_DATA, local_merged
from job.memory import host_available_bytes
from job.memory_plan import CPU_CHECK_MAX_BYTES  # the logits check on the CPU: small models only
from job.model import attn_implementation, fetch_model, load_tokenizer
from job.model_files import weights_bytes
from job.peaks import reset_gpu_peak, reset_host_peak, rss_peak_bytes, status_kib
from job.platform import free_gpu_memory
from job.run_files import check_adapter, download_run_folder, read_jsonl
from job.stages.merged import forget_local_merged, stamp_local_merged
from job.stream_merge import merge_weights, verify_merged

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
    """fetch base and adapter/ -> merge into merged.partial/ -> checks -> rename into place -> upload."""
    forget_local_merged(ctx.work_root)  # stamped again once merged/ is complete and uploaded
    model_dir, adapter_dir, tokenizer = fetch_inputs(cfg, ctx)
    dtype, model_bytes, device, why = plan_merge(cfg, ctx, model_dir)
    out = local_merged(ctx.work_root)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a merge killed midway left it: start over
    partial.mkdir(parents=True)
    examples = check_examples(ctx.store, tokenizer, max(1, cfg.merge.check_prompts))

    memory = PeakMemory(device)
    streaming_problem = not_streamable(model_dir)
    try:
        if streaming_problem is None:
            metrics = merge_streaming(cfg, ctx, model_dir, adapter_dir, tokenizer, partial, dtype, device,
                                      model_bytes, examples)
        else:
            if device == "cuda" and cfg.merge.device == "auto" and not gpu_room(model_bytes)[0]:
                device, why = "cpu", gpu_room(model_bytes)[1]  # the whole model goes where it fits
            ctx.log.info("merge: loading the whole model on %s to merge it (%s)", device, streaming_problem)
            metrics = merge_loaded(cfg, ctx, model_dir, adapter_dir, tokenizer, partial, dtype, device, examples)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    peak = memory.stop()
    free_gpu_memory()  # the evaluate stage that follows needs it
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)

    with ctx.timer("upload"):
        files = upload_merged(ctx)
    shards = [f for f in files if f.endswith(".safetensors")]
    ctx.log.info("merge: %s/ written (%d safetensors shards); peak memory %s", MERGED, len(shards), peak)
    return {
        **metrics,
        "method": "streaming" if streaming_problem is None else "loaded",
        "method_reason": streaming_problem or "safetensors base: merged shard by shard",
        "dtype": dtype_name(dtype),
        "device": device,
        "device_reason": why,
        "model_bytes": model_bytes,
        "check_examples": len(examples),
        "shards": len(shards),
        "files": files,
        **peak,
        "merge_seconds": ctx.seconds("merge"),
        "upload_seconds": ctx.seconds("upload"),
        "stage_seconds": ctx.elapsed(),
    }


def merge_streaming(cfg: Config, ctx, model_dir: Path, adapter_dir: Path, tokenizer, out_dir: Path, dtype,
                    device: str, model_bytes: int, examples: list) -> dict:
    """stream_merge into out_dir, the per-tensor check, the model files, and the logits check if affordable."""
    with ctx.timer("merge"):
        written = merge_weights(model_dir, adapter_dir, out_dir, dtype, device,
                                shard_size_bytes(cfg.merge.max_shard_size))
    with ctx.timer("weights_check"):
        weights = verify_merged(model_dir, adapter_dir, out_dir, dtype, device)
    ctx.log.info("merge: %d LoRA modules merged into %d of %d tensors in %.1f s; every tensor read back: base + "
                 "adapter within %.2f units in the last place of %s (%.1f s)", written["lora_modules"],
                 written["merged_tensors"], written["tensors"], ctx.seconds("merge"), weights["max_error_ulps"],
                 dtype_name(dtype), ctx.seconds("weights_check"))
    write_model_files(model_dir, tokenizer, out_dir, dtype)

    check_device, reason = check_logits_plan(cfg.merge.check_logits, model_bytes)
    if check_device is None:
        ctx.log.info("merge: logits check skipped: %s", reason)
        check = {**SKIPPED_CHECK, "logits_check": "skipped", "logits_check_reason": reason}
    else:
        with ctx.timer("logits_check"):
            check = check_logits(cfg, model_dir, adapter_dir, out_dir, dtype, check_device, examples)
        refuse_unless_equal(check, dtype, len(examples), written["lora_modules"], ctx)
        check.update(logits_check=check_device, logits_check_reason=reason)
    return {**check, **weights, "merged_layers": written["lora_modules"], "merged_tensors": written["merged_tensors"],
            "weights_check_seconds": ctx.seconds("weights_check"), "logits_check_seconds": ctx.seconds("logits_check")}


SKIPPED_CHECK = dict.fromkeys(("max_logit_diff", "tolerance", "tolerance_source", "logit_scale", "adapter_effect",
                               "top1_agreement", "tokens"))


def check_logits(cfg: Config, model_dir: Path, adapter_dir: Path, merged_dir: Path, dtype, device: str,
                 examples: list) -> dict:
    """base+adapter, then merged/ as any user loads it, one model at a time on `device`: compare_logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = load_with_adapter(model_dir, adapter_dir, dtype, device, attn_implementation(cfg))
    reference = logits_of(model, examples)
    with model.disable_adapter():
        base_only = logits_of(model, examples)
    del model
    free_gpu_memory()
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation(cfg)}
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, **kwargs).eval()
    got = logits_of(merged, examples)
    del merged
    free_gpu_memory()
    return compare_logits(reference, got, base_only, dtype, cfg.merge.tolerance)


def merge_loaded(cfg: Config, ctx, model_dir: Path, adapter_dir: Path, tokenizer, out_dir: Path, dtype,
                 device: str, examples: list) -> dict:
    """The whole base loaded with the adapter on `device`, merged in place, logits checked, saved."""
    with ctx.timer("load"):
        model = load_with_adapter(model_dir, adapter_dir, dtype, device, attn_implementation(cfg))
    reference = logits_of(model, examples)
    with model.disable_adapter():
        base_only = logits_of(model, examples)
    with ctx.timer("merge"):
        merged, merged_layers = merge_in_fp32(model)
    del model
    check = compare_logits(reference, logits_of(merged, examples), base_only, dtype, cfg.merge.tolerance)
    refuse_unless_equal(check, dtype, len(examples), merged_layers, ctx)
    save_merged(merged, tokenizer, out_dir, cfg.merge.max_shard_size)
    del merged
    return {**check, "logits_check": device, "logits_check_reason": "the whole model is loaded to merge it",
            "merged_layers": merged_layers, "tensors_checked": None, "max_error_ulps": None,
            "load_seconds": ctx.seconds("load")}


def not_streamable(model_dir: Path) -> str | None:
    """None when the base is plain safetensors the streaming merge reads, else why not."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        return f"the base model is saved quantized ({method}); it is dequantized by loading it"
    if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
        return "the base model has no safetensors weights (pytorch_model.bin)"
    return None


def write_model_files(model_dir: Path, tokenizer, out_dir: Path, dtype) -> None:
    """config.json (the merge dtype), generation_config.json and the tokenizer next to the merged shards."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    config.dtype = dtype
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the model config's defaults
        generation = GenerationConfig.from_model_config(config)
    stop_at_trained_eos(generation, tokenizer)
    generation.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)


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
    device, why = choose_device(cfg.merge.device)
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
    """Replace the run's merged/ with the local copy. A run folder on this machine gets the files moved
    in (one copy on the disk: 140 GB for a 70B, not 280); evaluate and export read them there. Else the
    local copy is stamped for evaluate and export on this machine, which reuse it instead of downloading
    merged/ again."""
    ctx.store.delete(MERGED)
    if ctx.store.local_folder(MERGED) is not None:
        return ctx.store.move_dir(local_merged(ctx.work_root), MERGED)
    files = ctx.store.upload_dir(local_merged(ctx.work_root), MERGED)
    stamp_local_merged(ctx.work_root, ctx.fingerprint)
    return files


# ----------------------------------------------------------------------------------------------
# setup


def choose_device(setting: str) -> tuple[str, str]:
    """Where the B @ A products run: the GPU when there is one (they need little memory), else the CPU."""
    import torch

    if setting == "cpu":
        return "cpu", "merge.device=cpu"
    if not torch.cuda.is_available():
        if setting == "cuda":
            raise JobError("merge.device=cuda but no CUDA device is visible; use merge.device=auto or cpu")
        return "cpu", "no GPU"
    return "cuda", "merge.device=cuda" if setting == "cuda" else "a GPU is visible"


def gpu_room(model_bytes: int) -> tuple[bool, str]:
    """(whether the whole 16-bit model fits in the GPU's free memory, the figures that say so)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no GPU"
    free_gpu_memory()  # memory the train stage left cached in this process is free for us
    free, _total = torch.cuda.mem_get_info()
    needed = model_bytes * 1.15 + 1.5 * 2**30  # the model, the fp32 adapter, activations of the check examples
    if needed < free:
        return True, f"needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on the GPU"
    return False, f"the model needs about {needed / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free on the GPU"


def check_logits_plan(setting, model_bytes: int) -> tuple[str | None, str]:
    """(device for the logits check or None to skip it, why), from merge.check_logits and free memory."""
    if setting is False:
        return None, "merge.check_logits: false"
    fits, gpu = gpu_room(model_bytes)
    if fits:
        return "cuda", gpu
    available = host_available_bytes()  # within the container's memory limit, unlike /proc/meminfo alone
    if setting is True:
        return "cpu", f"merge.check_logits: true ({gpu})"
    if model_bytes <= CPU_CHECK_MAX_BYTES and (available is None or model_bytes * 4 <= available):
        return "cpu", f"{gpu}; a {model_bytes / 2**30:.2f} GiB model is checked on the CPU"
    return None, (f"{gpu}, and a {model_bytes / 2**30:.1f} GiB model is too large to check on the CPU (at most "
                  f"{CPU_CHECK_MAX_BYTES / 2**30:.0f} GiB and a quarter of free RAM); every tensor was checked; "
                  "merge.check_logits: true runs it on the CPU anyway")


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
    """A loaded merged model: sharded safetensors, the tokenizer and generation config (save_tokenizer,
    stop_at_trained_eos)."""
    stop_at_trained_eos(model.generation_config, tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # In bytes: transformers reads a str such as "2000" (a YAML number) as a malformed size.
    model.save_pretrained(out_dir, max_shard_size=shard_size_bytes(max_shard_size))
    save_tokenizer(tokenizer, out_dir)


def stop_at_trained_eos(generation, tokenizer) -> None:
    """EOS is the token training appended to every example (first, so generation stops there), then the
    base's own; pad is the tokenizer's (not EOS)."""
    eos = [tokenizer.eos_token_id]
    existing = generation.eos_token_id
    for token in existing if isinstance(existing, list) else [existing]:
        if token is not None and token not in eos:
            eos.append(token)
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    generation.pad_token_id = tokenizer.pad_token_id


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """The tokenizer with its pad token, left padding saved as the default for batched generation
    (transformers writes padding_side only when it was given at load time, so set it in the file)."""
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    settings.update(padding_side="left", pad_token=tokenizer.pad_token)
    config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class PeakMemory:
    """Peak memory of what runs between start and stop (the merge itself, after the inputs are fetched):
    GPU allocations on CUDA, the resident set (job/peaks.py's measures, reset here)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            reset_gpu_peak()  # the stage's own peak is kept (job/peaks.py)
        self.reset = reset_host_peak()
        self.rss_start = status_kib("VmRSS")

    def stop(self) -> dict:
        import torch

        result = {"peak_rss_gb": round(rss_peak_bytes() / 2**30, 3),
                  "rss_before_load_gb": round((self.rss_start or 0) / 2**20, 3),
                  "peak_rss_measure": "VmHWM since load" if self.reset else "process lifetime"}
        result["peak_gpu_memory_gb"] = (round(torch.cuda.max_memory_allocated() / 2**30, 3)
                                        if self.device == "cuda" else None)
        return result

