"""Export stage: merged/ -> export/<name>.<type>.gguf + an Ollama Modelfile, each file read back first.

merged/ (this machine's merge folder, or downloaded) -> refuse what cannot be exported (exit 2, nothing
written) -> reference logits of merged/ on a few eval examples -> for each type: write the GGUF locally
(tensor by tensor, job/export_gguf.py; time and peak memory measured), read it back with transformers'
GGUF loader, compare tokenization, chat template and logits -> every check passed: replace export/ in
the run with the new files (each upload is atomic: a local rename or one S3 object), then the marker.

The read-back check fails the stage (exit 1, nothing uploaded) when the GGUF tokenizes the examples
differently, lost the chat template, gives non-finite logits, or its top token agrees with merged/'s on
fewer positions than the type's threshold (AGREEMENT; export.min_agreement overrides). Why these values:
they bound what rounding can do, not what a wrong export does. Measured on SmolLM2-135M over every
position of prompt + answer (including prompt positions where the model is unsure): f16 100%, q8_0
94-100%, q4_0 about 60-90%; a wrong export (q/k not permuted, wrong tokenizer) lands near 0-10%.
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


class ExportCheckError(JobError):
    """A GGUF did not read back like merged/: nothing is uploaded (exit code 1)."""


def gguf_name(cfg: Config, out_type: str) -> str:
    return f"{cfg.export.name}.{out_type}.gguf"


def run(cfg: Config, ctx) -> dict:
    import torch

    from job.export_gguf import inspect_model, write_gguf
    from job.stages.merge import PeakMemory, check_examples, logits_of
    from job.stages.merged import merged_folder

    merged_dir = merged_folder(ctx, ctx.upstream["merge"])
    plan = inspect_model(merged_dir)  # exit 2 here, before anything is written
    ctx.log.info("export: %s (%s, %.0fM parameters, tokenizer %s%s) -> %s", merged_dir, plan.model_type,
                 plan.n_params / 1e6, plan.tokenizer_kind, f", pre {plan.pre}" if plan.pre else "",
                 ", ".join(cfg.export.gguf))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    examples, reference = [], []
    if cfg.export.check_prompts > 0:
        examples = check_examples(ctx.store, tokenizer, cfg.export.check_prompts)
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        reference = logits_of(model, examples)
        del model
        gc.collect()
    else:
        ctx.log.warning("export: export.check_prompts is 0, the GGUF files are not read back")

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
        if examples:
            check = read_back(path, out_type, plan, tokenizer, examples, reference, cfg.export.min_agreement)
            record["check"] = check
            ctx.log.info("export: %s: %.1f MB in %.1f s (peak RSS %.2f GB); read back: argmax agreement %.4f "
                         "(min %.2f), max logit diff %.3g, tokenization %s, chat template %s", path.name,
                         record["bytes"] / 1e6, record["write_seconds"], record["peak_rss_gb"],
                         check["argmax_agreement"], check["min_agreement"], check["max_logit_diff"],
                         "identical" if check["same_tokens"] else "DIFFERENT",
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
    uploaded = ctx.store.upload_dir(out_dir, EXPORT)
    return {"files": files, "uploaded": uploaded, "modelfile": f"{EXPORT}/{modelfile.name}",
            "arch": written["arch"], "tokenizer_model": written["tokenizer_model"],
            "tokenizer_pre": written["tokenizer_pre"], "add_bos_token": written["add_bos_token"],
            "tied_embeddings": written["tied_embeddings"], "rope_freqs": written["rope_freqs"],
            "n_params": written["n_params"], "check_examples": len(examples),
            "stage_seconds": ctx.elapsed()}


def read_back(path: Path, out_type: str, plan, tokenizer, examples, reference, min_agreement: float) -> dict:
    """Load the GGUF with transformers (dequantized) and compare it to merged/ on the examples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    with parse_once():  # transformers would parse the file's metadata four times (job/gguf_parse_once.py)
        g_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **extra)
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in examples]
    same_tokens = all(g_tok(t, add_special_tokens=False)["input_ids"]
                      == tokenizer(t, add_special_tokens=False)["input_ids"]
                      for t in texts)
    same_bos = g_tok("a")["input_ids"] == tokenizer("a")["input_ids"]
    same_template = ((getattr(g_tok, "chat_template", None) or None)
                     == (getattr(tokenizer, "chat_template", None) or None))
    logits = logits_of(model, examples)
    del model
    gc.collect()
    agree = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(reference, logits)])
    diff = max(float((r - g).abs().max()) for r, g in zip(reference, logits))
    finite = all(bool(torch.isfinite(g).all()) for g in logits)
    threshold = min_agreement if min_agreement > 0 else AGREEMENT[out_type]
    agreement = float(agree.mean())
    problem = ("non-finite logits" if not finite else
               "tokenizes the examples differently from merged/" if not same_tokens else
               "adds special tokens (BOS/EOS) differently from merged/" if not same_bos else
               "chat template differs from merged/'s" if not same_template else
               f"top-token agreement {agreement:.4f} is below {threshold}" if agreement < threshold else "")
    return {"passed": not problem, "problem": problem, "argmax_agreement": agreement, "min_agreement": threshold,
            "max_logit_diff": diff, "logit_scale": max(float(r.abs().max()) for r in reference),
            "tokens": int(agree.numel()), "same_tokens": same_tokens, "same_special_tokens": same_bos,
            "same_chat_template": same_template}


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
