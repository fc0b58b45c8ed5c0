"""Export stage: merged/ -> export/<name>.<type>.gguf + an Ollama Modelfile, each file read back first.

merged/ (this machine's merge folder, or downloaded) -> refuse what cannot be exported (exit 2, nothing
written) -> for each type: write the GGUF locally (tensor by tensor, job/export_gguf.py; time and peak
memory measured), then check it -> every check passed: replace export/ in the run with the new files
(each upload is atomic: a local rename or one S3 object), then the marker.

The checks (any failure fails the stage, exit 1, nothing uploaded):
- tensors (always, any model size, bounded memory: job/export_check.py): every tensor of merged/ is in
  the file under its llama.cpp name, with the expected type and shape, and equal to merged/'s values
  within the type's rounding (f16/bf16 bit-exact, q8_0/q4_0 per-block bounds), after undoing the q/k
  permutation; nothing else is in the file. This is the test of the weights.
- tokenizer (export.check_prompts > 0): the GGUF's tokenizer (transformers reads only its metadata)
  tokenizes the eval examples like merged/'s, adds the same special tokens and keeps the chat template.
- logits (export.check_prompts > 0, models up to LOGITS_CHECK_MAX_PARAMS whose float32 copies fit in
  the host memory available): transformers' GGUF loader dequantizes the whole file into float32 on
  the host, so this costs about 8 bytes per parameter; it is skipped (the reason is in the marker)
  beyond that. Its top token must agree with merged/'s on at least the type's share of positions
  (AGREEMENT; export.min_agreement overrides). Why these values: they bound what rounding can do on a
  trained small model. Measured on SmolLM2-135M over every position of prompt + answer: f16 100%, q8_0
  94-100%, q4_0 about 60-90%; a wrong export (q/k not permuted, wrong tokenizer) lands near 0-10%. On
  random weights (benchmark models) top tokens are near-ties and flip under any rounding, which is
  one more reason the large-model gate is the per-tensor check.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

from job.config import Config
from job.errors import JobError
from job.layout import EXPORT

AGREEMENT = {"f16": 0.98, "bf16": 0.95, "q8_0": 0.90, "q4_0": 0.50}
LOGITS_CHECK_MAX_PARAMS = 1_000_000_000  # the logits check's float32 copies: ~8 GB of host memory at 1B
LOGITS_CHECK_BYTES_PER_PARAM = 8  # merged/ in float32, then the GGUF dequantized in float32 (one at a time,
# but the loader's numpy arrays and the model overlap while it loads)


class ExportCheckError(JobError):
    """A GGUF did not read back like merged/: nothing is uploaded (exit code 1)."""


def gguf_name(cfg: Config, out_type: str) -> str:
    return f"{cfg.export.name}.{out_type}.gguf"


def logits_check_plan(n_params: int, available_bytes: int | None) -> str:
    """Empty when the logits check runs, else why it is skipped (kept in the marker and logged)."""
    if n_params > LOGITS_CHECK_MAX_PARAMS:
        return (f"skipped: {n_params / 1e9:.1f}B parameters is above {LOGITS_CHECK_MAX_PARAMS / 1e9:.0f}B; "
                "transformers' GGUF loader would hold the whole model in float32 on the host. The per-tensor "
                "check covers the weights at any size")
    need = n_params * LOGITS_CHECK_BYTES_PER_PARAM
    if available_bytes is not None and need > available_bytes // 2:
        return (f"skipped: needs about {need / 2**30:.1f} GiB of host memory, {available_bytes / 2**30:.1f} GiB "
                "available. The per-tensor check covers the weights")
    return ""


def run(cfg: Config, ctx) -> dict:
    import torch

    from job.export_check import check_tensors
    from job.export_gguf import inspect_model, write_gguf
    from job.gguf_parse_once import parse_once
    from job.memory import host_available_bytes
    from job.stages.merge import PeakMemory, check_examples, logits_of
    from job.stages.merged import merged_folder

    merged_dir = merged_folder(ctx, ctx.upstream["merge"])
    plan = inspect_model(merged_dir)  # exit 2 here, before anything is written
    ctx.log.info("export: %s (%s, %.0fM parameters, tokenizer %s%s) -> %s", merged_dir, plan.model_type,
                 plan.n_params / 1e6, plan.tokenizer_kind, f", pre {plan.pre}" if plan.pre else "",
                 ", ".join(cfg.export.gguf))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    examples, reference, logits_skipped = [], [], "skipped: export.check_prompts is 0"
    if cfg.export.check_prompts > 0:
        examples = check_examples(ctx.store, tokenizer, cfg.export.check_prompts)
        logits_skipped = logits_check_plan(plan.n_params, host_available_bytes())
        if not logits_skipped:
            model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
            reference = logits_of(model, examples)
            del model
            gc.collect()
        else:
            ctx.log.info("export: logits check %s", logits_skipped)
    else:
        ctx.log.warning("export: export.check_prompts is 0: the tokenizer and logits are not read back "
                        "(every tensor still is)")

    out_dir = ctx.work_dir / EXPORT
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    files, failures = {}, []
    for out_type in cfg.export.gguf:
        path = out_dir / gguf_name(cfg, out_type)
        tmp = path.with_name(path.name + ".partial")
        memory = PeakMemory("cpu")
        t0 = time.monotonic()
        written = write_gguf(plan, tmp, out_type, name=cfg.export.name)
        os.replace(tmp, path)
        peak = memory.stop()
        record = {"file": f"{EXPORT}/{path.name}", "bytes": path.stat().st_size,
                  "write_seconds": round(time.monotonic() - t0, 2), "peak_rss_gb": peak["peak_rss_gb"],
                  "peak_rss_measure": peak["peak_rss_measure"], "tensor_types": written["tensor_types"]}
        # One parse of the file's metadata for the tensor check and the read-back below (parse_once): for
        # a 49k-token vocabulary each parse is seconds of pure Python.
        with parse_once():
            memory, t0 = PeakMemory("cpu"), time.monotonic()
            tensors = check_tensors(plan, path, out_type)
            tensors.update(seconds=round(time.monotonic() - t0, 2), peak_rss_gb=memory.stop()["peak_rss_gb"])
            record["tensor_check"] = tensors
            ctx.log.info("export: %s: %.1f MB in %.1f s (peak RSS %.2f GB); read back tensor by tensor: %d tensors %s "
                         "in %.1f s (peak RSS %.2f GB)%s", path.name, record["bytes"] / 1e6, record["write_seconds"],
                         record["peak_rss_gb"], tensors["tensors_checked"],
                         "match merged/" if tensors["passed"] else "DIFFER", tensors["seconds"], tensors["peak_rss_gb"],
                         "".join(f"; {k} worst {v['worst_ratio']:.2f} of the allowed error ({v['worst_tensor']})"
                                 for k, v in tensors["types"].items() if k in ("Q8_0", "Q4_0")))
            if not tensors["passed"]:
                failures.append(f"{path.name}: tensors differ from merged/: " + "; ".join(tensors["problems"]))
            if examples:
                if logits_skipped:
                    check = {**tokenizer_check(path, tokenizer, examples), "logits": logits_skipped}
                else:
                    check = read_back(path, out_type, plan, tokenizer, examples, reference, cfg.export.min_agreement)
                    ctx.log.info("export: %s: logits read back: argmax agreement %.4f (min %.2f), max logit diff %.3g",
                                 path.name, check["argmax_agreement"], check["min_agreement"], check["max_logit_diff"])
                record["check"] = check
                ctx.log.info("export: %s: tokenization %s, special tokens %s, chat template %s", path.name,
                             "identical" if check["same_tokens"] else "DIFFERENT",
                             "identical" if check["same_special_tokens"] else "DIFFERENT",
                             "identical" if check["same_chat_template"] else "DIFFERENT")
                if not check["passed"]:
                    failures.append(f"{path.name}: {check['problem']}")
        files[out_type] = record

    if failures:
        raise ExportCheckError("export check failed, nothing was uploaded: " + "; ".join(failures)
                               + ". A wrong export (not rounding) is a bug in the exporter for this model: report it "
                               "with the model's config.json; to accept lossier files lower export.min_agreement.")

    modelfile = write_modelfile(cfg, out_dir, gguf_name(cfg, cfg.export.gguf[0]), written)
    ctx.store.delete(EXPORT)  # last run's files go only now that the new ones are complete and checked
    uploaded = ctx.store.move_dir(out_dir, EXPORT)  # nothing here reads them again: no second copy
    return {"files": files, "uploaded": uploaded, "modelfile": f"{EXPORT}/{modelfile.name}",
            "arch": written["arch"], "tokenizer_model": written["tokenizer_model"],
            "tokenizer_pre": written["tokenizer_pre"], "add_bos_token": written["add_bos_token"],
            "tied_embeddings": written["tied_embeddings"], "rope_freqs": written["rope_freqs"],
            "n_params": written["n_params"], "check_examples": len(examples),
            "logits_check": logits_skipped or "ran", "stage_seconds": ctx.elapsed()}


def tokenizer_check(path: Path, tokenizer, examples) -> dict:
    """The GGUF's tokenizer against merged/'s: transformers builds it from the file's metadata alone
    (the tensors stay on disk), so this is cheap at any model size."""
    from transformers import AutoTokenizer

    from job.gguf_parse_once import parse_once

    with parse_once():
        g_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        in_file = special_tokens_in_file(path)  # the same parse (the reader is read-only)
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in examples]
    same_tokens = all(g_tok(t, add_special_tokens=False)["input_ids"]
                      == tokenizer(t, add_special_tokens=False)["input_ids"]
                      for t in texts)
    # BOS/EOS: what the file tells llama.cpp (its metadata), against what merged/'s tokenizer really does.
    # Not through transformers' GGUF loader: whether it honours tokenizer.ggml.add_bos_token depends on its
    # version (5.17 ignores it for gpt2-style vocabularies, 5.25 does not), and llama.cpp reads the flag.
    in_merged = special_tokens_added(tokenizer)
    same_bos = in_file == in_merged
    same_template = ((getattr(g_tok, "chat_template", None) or None)
                     == (getattr(tokenizer, "chat_template", None) or None))
    problem = ("tokenizes the examples differently from merged/" if not same_tokens else
               f"adds special tokens (BOS/EOS) differently from merged/: the GGUF says {in_file}, merged/'s "
               f"tokenizer does {in_merged}" if not same_bos else
               "chat template differs from merged/'s" if not same_template else "")
    return {"passed": not problem, "problem": problem, "same_tokens": same_tokens, "same_special_tokens": same_bos,
            "same_chat_template": same_template}


def special_tokens_added(tokenizer) -> dict:
    """Which special tokens merged/'s tokenizer puts around a text, and their ids."""
    plain, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] and plain[:1] != full[:1]
    eos = tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] and plain[-1:] != full[-1:]
    return {"add_bos": bool(bos), "add_eos": bool(eos), "bos_id": tokenizer.bos_token_id if bos else None,
            "eos_id": tokenizer.eos_token_id if eos else None}


def special_tokens_in_file(path: Path) -> dict:
    """The same, from the GGUF's metadata (what llama.cpp reads); the file is memory-mapped, nothing loaded."""
    import gguf

    fields = gguf.GGUFReader(path).fields

    def value(key):
        field = fields.get(key)
        return None if field is None or not field.data else field.parts[field.data[0]][0].item()

    bos, eos = bool(value("tokenizer.ggml.add_bos_token")), bool(value("tokenizer.ggml.add_eos_token"))
    return {"add_bos": bos, "add_eos": eos, "bos_id": value("tokenizer.ggml.bos_token_id") if bos else None,
            "eos_id": value("tokenizer.ggml.eos_token_id") if eos else None}


def read_back(path: Path, out_type: str, plan, tokenizer, examples, reference, min_agreement: float) -> dict:
    """Load the GGUF with transformers (dequantized, float32 on the CPU) and compare it to merged/ on the
    examples: tokenizer (tokenizer_check), then logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.export_gguf import head_dim, rope_settings
    from job.gguf_parse_once import parse_once
    from job.stages.merge import logits_of

    extra = {}
    _theta, scaling = rope_settings(plan.config)
    if scaling is not None:
        # transformers' GGUF reader ignores rope scaling (llama.cpp reads rope_freqs / rope.scaling.*): give
        # it merged/'s, so the logits compare the weights; the rope_freqs values are tested separately.
        extra["rope_parameters"] = {**scaling, "rope_theta": _theta}
    cfg = plan.config
    if head_dim(cfg) != cfg["hidden_size"] // cfg["num_attention_heads"]:
        # The file says it (attention.key_length, which llama.cpp reads); transformers' qwen3 reader skips it.
        extra["head_dim"] = head_dim(cfg)
    # transformers would parse the file's metadata four times, the BOS/EOS check once more: once in all
    # (job/gguf_parse_once.py), or not at all here when the caller's parse_once() has the file already.
    with parse_once():
        tokens = tokenizer_check(path, tokenizer, examples)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **extra)
    logits = logits_of(model, examples)
    del model
    gc.collect()
    agree = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(reference, logits)])
    diff = max(float((r - g).abs().max()) for r, g in zip(reference, logits))
    finite = all(bool(torch.isfinite(g).all()) for g in logits)
    threshold = min_agreement if min_agreement > 0 else AGREEMENT[out_type]
    agreement = float(agree.mean())
    problem = ("non-finite logits" if not finite else tokens["problem"] if tokens["problem"] else
               f"top-token agreement {agreement:.4f} is below {threshold}" if agreement < threshold else "")
    return {**tokens, "passed": not problem, "problem": problem, "argmax_agreement": agreement,
            "min_agreement": threshold, "max_logit_diff": diff,
            "logit_scale": max(float(r.abs().max()) for r in reference), "tokens": int(agree.numel())}


def _go_literal(text: str) -> str:
    """Text placed verbatim in an Ollama (Go) template: `{{` would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def write_modelfile(cfg: Config, out_dir: Path, gguf_file: str, written: dict) -> Path:
    """An Ollama Modelfile whose TEMPLATE is the job's training prompt with the user's input as
    {{ .Prompt }}, stopping at the EOS training appended (and the text end marker), greedy by default."""
    from job.prompts import RESPONSE_END, build_prompt

    marker = "\x00INPUT\x00"
    prompt = build_prompt(marker, cfg.prompt)
    before, after = prompt.split(marker)
    template = _go_literal(before) + "{{ .Prompt }}" + _go_literal(after)
    if '"""' in template:
        raise JobError('export: the prompt contains """, which an Ollama Modelfile TEMPLATE cannot hold')
    lines = [f"# Ollama: ollama create {cfg.export.name} -f Modelfile && "
             f"ollama run {cfg.export.name} \"A man plays a guitar.\"",
             "# The prompt is the one the model was trained on (job/prompts.py); the answer is JSON, then EOS.",
             f"FROM ./{gguf_file}",
             f'TEMPLATE """{template}"""',
             f"PARAMETER stop {json.dumps(written['eos_token'])}",
             f"PARAMETER stop {json.dumps(RESPONSE_END.strip())}",
             "PARAMETER temperature 0",
             "PARAMETER num_ctx 2048",
             ""]
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
