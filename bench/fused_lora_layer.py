"""One LoRA layer on a 4-bit base, forward + backward, peft's forward against the fused one (job/fused_lora.py):
time per call (CUDA events, median of N after warm-up) and the memory the forward keeps for the backward.
Fused: the 4-bit base as its own autograd node (fused_with_base False) or inside the function (the default),
the dropout stored or drawn again in the backward pass.

    python bench/fused_lora_layer.py [--tokens 10240] [--rank 64] [--repeats 30]

The 7B shape's two layer sizes (4096 -> 4096 as q/k/v/o, 4096 -> 11008 as gate/up), bf16 autocast as in
training, LoRA weights in fp32 as peft makes them, dropout 0 and 0.1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.fused_lora import fuse_lora_layers  # noqa: E402


def lora_layer(fan_in: int, fan_out: int, rank: int, dropout: float):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(fan_in, fan_out, bias=False, compute_dtype=torch.bfloat16,
                                          quant_type="nf4", quant_storage=torch.bfloat16)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(One().cuda(), LoraConfig(r=rank, lora_alpha=16, lora_dropout=dropout,
                                                   target_modules=["proj"]))
    return model.train()


def measure(model, x, repeats: int) -> dict:
    grad = torch.randn(x.shape[0], x.shape[1], model.base_model.model.proj.out_features, device="cuda",
                       dtype=torch.bfloat16)
    times = []
    for i in range(repeats + 5):
        x.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
        del out
    return {"ms": statistics.median(times), "kept_mib": kept / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=10240)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens, r={args.rank}, bf16 autocast, NF4 base")
    print("| layer | dropout | peft ms | fused, base its own node, ms | fused, base inside, ms "
          "| fused, base inside, dropout recomputed, ms | kept MiB: same order |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for fan_in, fan_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
        for dropout in (0.0, 0.1):
            model = lora_layer(fan_in, fan_out, args.rank, dropout)
            x = torch.randn(1, args.tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            peft = measure(model, x, args.repeats)
            fuse_lora_layers(model, recompute_dropout=False)
            layer = model.base_model.model.proj
            layer.fused_with_base = False
            own_node = measure(model, x, args.repeats)
            layer.fused_with_base = True
            stored = measure(model, x, args.repeats)
            fuse_lora_layers(model, recompute_dropout=True)
            recomputed = measure(model, x, args.repeats)
            print(f"| {fan_in} -> {fan_out} | {dropout} | {peft['ms']:.3f} | {own_node['ms']:.3f} | "
                  f"{stored['ms']:.3f} | {recomputed['ms']:.3f} | {peft['kept_mib']:.0f} / "
                  f"{own_node['kept_mib']:.0f} / {stored['kept_mib']:.0f} / {recomputed['kept_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
