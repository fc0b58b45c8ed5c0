"""GPU correctness of varlen attention and Liger kernels (issue 15), results as JSON in OUT_DIR.

    python bench/gpu_varlen_check.py OUT_DIR [--parts a,b,c] [--steps 30]

(a) logits and LoRA gradients of a small real-shape Llama (hidden 1024, 8 layers, 16 heads; and a GQA
    variant with 4 KV heads), bf16 on the GPU: one packed row of ~8k tokens in ~60 documents (one-token
    documents included) through job/attention.py's varlen against every document run alone with sdpa.
    The bf16 noise floor is the job's previous path, the same packed row through sdpa with its dense
    document mask, compared with the same per-document reference: varlen passes when its differences
    are at most twice that floor or under 2e-2 relative (bf16 keeps 8 bits: about 4e-3 per rounding,
    and eight layers add up).
(b) the loss curve of --steps steps of the 7B shape (NF4 base) through the job's train path
    (bench/train_throughput.py's job recipe: load_base_model, plan_batch's settings fixed to 2048 x 4
    without checkpointing so both see the same batches), varlen vs sdpa, same seed and data; a second
    varlen run gives the run-to-run noise.
(c) the same with Liger kernels (train.liger=true) vs without, both varlen.
Each training run is a fresh process (Liger patches the model code for the whole process). Writes
OUT_DIR/kernel_check.json (a), OUT_DIR/curves.json (b, c) and OUT_DIR/summary.json, and prints them.
Environment as for the bench: PYTHONPATH with the wheels (see ../shared/gpu/README.md) and this repo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

FIXED = ("train.packing_length=2048", "train.micro_batch_size=4", "train.gradient_checkpointing=false",
         "train.logging_steps=1")
CURVES = {  # name: settings on top of FIXED
    "sdpa": ("model.attn_implementation=sdpa", "train.liger=false"),
    "varlen": ("model.attn_implementation=varlen", "train.liger=false"),
    "varlen (again)": ("model.attn_implementation=varlen", "train.liger=false"),
    "varlen+liger": ("model.attn_implementation=varlen", "train.liger=true"),
}
CURVE_TOLERANCE = 0.02  # max relative difference of the loss at any step


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def document_lengths(total: int, generator: torch.Generator) -> list[int]:
    """Mostly SNLI-like lengths (20-300 tokens), some one- and two-token documents, one long one."""
    lengths = [1, 2, 1, 1024]
    while sum(lengths) < total:
        lengths.append(int(torch.randint(20, 300, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return [lengths[i] for i in order if lengths[i] > 0]


def set_attention(model, name: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(name)
    else:  # older transformers: every layer reads the shared config at call time
        base.config._attn_implementation = name


def loss_and_grads(model, lora_params, run) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = run()
    grads = {name: p.grad.float().clone() for name, p in lora_params}
    return logits, grads


def part_a(total_tokens: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from job.attention import document_boundaries, register, varlen_unavailable_reason

    problem = varlen_unavailable_reason()
    if problem:
        return {"error": problem}
    register()
    generator = torch.Generator().manual_seed(0)
    lengths = document_lengths(total_tokens, generator)
    ids = torch.randint(0, 32000, (1, sum(lengths)), generator=generator).cuda()
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    cu_seqlens, longest = document_boundaries(positions)
    # next-token targets inside each document (-100 at every document's last token)
    targets = ids.roll(-1, dims=1).clone()
    targets[0, (cu_seqlens[1:] - 1).long()] = -100
    results = {"documents": len(lengths), "tokens": int(ids.shape[1]), "longest": longest, "models": {}}
    for kv_heads in (16, 4):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=4096)
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        model.config.use_cache = False  # as in training: with a cache, sdpa would not see the packing
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would make every A gradient zero
                torch.nn.init.normal_(p, std=0.02)
        lora_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def packed(attn, with_boundaries):
            set_attention(model, attn)
            extra = ({"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest,
                      "max_length_k": longest} if with_boundaries else {})
            logits = model(input_ids=ids, position_ids=positions, **extra).logits[0].float()
            torch.nn.functional.cross_entropy(logits, targets[0], ignore_index=-100, reduction="sum").backward()
            return logits.detach()

        def alone():
            set_attention(model, "sdpa")
            parts = []
            for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
                logits = model(input_ids=ids[:, start:end]).logits[0].float()
                loss = torch.nn.functional.cross_entropy(logits, targets[0, start:end], ignore_index=-100,
                                                         reduction="sum")
                if end - start > 1:
                    loss.backward()
                parts.append(logits.detach())
            return torch.cat(parts)

        reference, ref_grads = loss_and_grads(model, lora_params, alone)
        entry = {}
        for label, run in (("varlen (collator boundaries)", lambda: packed("varlen", True)),
                           ("varlen (position ids)", lambda: packed("varlen", False)),
                           ("sdpa packed, dense mask (noise floor)", lambda: packed("sdpa", False))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits, grads = loss_and_grads(model, lora_params, run)
            torch.cuda.synchronize()
            per_param = {n: relative(grads[n], ref_grads[n]) for n, _ in lora_params}
            entry[label] = {
                "logits_rel": relative(logits, reference),
                "logits_max_abs": float((logits - reference).abs().max()),
                "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                "grads_rel": relative(torch.cat([g.flatten() for g in grads.values()]),
                                      torch.cat([g.flatten() for g in ref_grads.values()])),
                "grads_worst_param_rel": max(per_param.values()),
                "seconds_forward_backward": time.perf_counter() - t0,
            }
        floor = entry["sdpa packed, dense mask (noise floor)"]
        for label in ("varlen (collator boundaries)", "varlen (position ids)"):
            e = entry[label]
            e["pass"] = all(e[k] <= max(2 * floor[k], 2e-2) for k in ("logits_rel", "grads_rel"))
        results["models"][f"hidden 1024, 8 layers, 16 heads, {kv_heads} KV heads"] = entry
        del model
        torch.cuda.empty_cache()
    results["pass"] = all(e["pass"] for m in results["models"].values() for k, e in m.items() if "pass" in e)
    return results


def compare(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    diffs = [abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n])]
    worst = max(range(n), key=diffs.__getitem__) if n else None
    return {"steps": n, "max_rel_diff": max(diffs) if n else None, "at_step": worst + 1 if n else None,
            "mean_rel_diff": sum(diffs) / n if n else None, "pass": bool(n) and max(diffs) <= CURVE_TOLERANCE}


def part_bc(parts: str, steps: int, model_dir: Path, examples: int) -> dict:
    import train_throughput as bench

    names = [n for n in CURVES if ("b" in parts and "liger" not in n) or ("c" in parts and n in ("varlen", "varlen+liger"))]
    args = argparse.Namespace(shape="7b", steps=steps - 4, warmup=4, examples=examples, model_dir=model_dir, cap_gb=None)
    bench.make_model_in_subprocess(model_dir, "7b", None)
    runs = {}
    for index, name in enumerate(names):
        spec = {"name": name, "kind": "job", "sets": [*FIXED, *CURVES[name]]}
        result = bench.run_child(spec, args, index)
        runs[name] = result
        print(json.dumps({"curve": name, "losses": result.get("losses"), "tokens_per_s": result.get("tokens_per_s"),
                          "peak_gib": result.get("peak_gib"), "settings": result.get("settings"),
                          "error": result.get("error")}), flush=True)
    curves = {name: r.get("losses") or [] for name, r in runs.items()}
    out = {"runs": runs, "comparisons": {}}
    pairs = [("varlen vs sdpa", "varlen", "sdpa"), ("varlen run-to-run", "varlen (again)", "varlen"),
             ("varlen+liger vs varlen", "varlen+liger", "varlen")]
    for label, x, y in pairs:
        if x in curves and y in curves:
            out["comparisons"][label] = compare(curves[x], curves[y])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=8192, help="(a): tokens in the packed row")
    parser.add_argument("--examples", type=int, default=6000, help="(b, c): SNLI examples to pack")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model-7b"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__}
    if "a" in args.parts:
        a = part_a(args.tokens)
        (args.out_dir / "kernel_check.json").write_text(json.dumps(a, indent=2))
        print(json.dumps(a, indent=2), flush=True)
        summary["a_pass"] = a.get("pass")
        torch.cuda.empty_cache()
    if "b" in args.parts or "c" in args.parts:
        bc = part_bc(args.parts, args.steps, args.model_dir, args.examples)
        (args.out_dir / "curves.json").write_text(json.dumps(bc, indent=2))
        print(json.dumps(bc["comparisons"], indent=2), flush=True)
        summary["curves"] = bc["comparisons"]
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("summary:", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
