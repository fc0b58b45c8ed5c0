"""The LoRA dropout recomputed in the backward pass (job/lora_dropout.py) computes what peft computes:
the same loss, the same gradients, the same adapter names, on the tiny Llama with LoRA on all seven
linear kinds. Its memory saving is measured on a GPU (docs/benchmarks.md), not asserted here."""

from __future__ import annotations

import copy

import pytest
import torch

from job.config import load_config
from job.lora_dropout import DropoutRecomputedLinear, choose_recompute, fold_lora_dropout

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_models(tiny_model_dir):
    """(peft's model, the same model folded), identical weights, in training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=KINDS,
                                            task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # lora_B starts at zero: make the adapter's effect visible
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    folded = copy.deepcopy(model)
    layers = fold_lora_dropout(folded)
    assert layers == len(KINDS) * base.config.num_hidden_layers
    model.train(), folded.train()
    return model, folded


def loss_and_grads(model, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_loss_and_gradients_as_peft(lora_models):
    model, folded = lora_models
    for seed in (1, 2):
        loss, grads = loss_and_grads(model, seed)
        folded_loss, folded_grads = loss_and_grads(folded, seed)
        assert torch.equal(loss, folded_loss), (loss, folded_loss)
        assert sorted(grads) == sorted(folded_grads)
        worst = max((grads[n] - folded_grads[n]).abs().max().item() for n in grads)
        assert worst <= 1e-6 * max(g.abs().max().item() for g in grads.values()), worst
        assert all(folded_grads[n].abs().sum() > 0 for n in folded_grads if "lora_A" in n)
    # the dropout is really applied: another seed draws other masks, another loss
    assert not torch.equal(loss_and_grads(folded, 1)[0], loss_and_grads(folded, 3)[0])


def test_evaluation_has_no_dropout_and_the_adapter_keeps_its_names(lora_models):
    model, folded = lora_models
    ids = torch.arange(20).unsqueeze(0)
    model.eval(), folded.eval()
    try:
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, folded(input_ids=ids).logits)
    finally:
        model.train(), folded.train()
    assert list(model.state_dict()) == list(folded.state_dict())
    lora_a = [m for n, m in folded.named_modules() if n.endswith("lora_A.default")]
    assert lora_a and all(type(m) is DropoutRecomputedLinear and m.dropout_p == 0.1 for m in lora_a)


def test_choice_and_its_reason():
    def cfg(*sets):
        return load_config(None, ("run_uri=/r", "data.uri=d.csv", "model.uri=/m", *sets), environ={})

    assert cfg().train.recompute_lora_dropout == "auto"
    # auto: drawn again by the fused LoRA function when nothing else recomputes the layers
    assert choose_recompute(cfg(), checkpointing=False, fused=True) == (
        True, "auto: no activation checkpointing, so the masks and dropped inputs would be stored")
    assert choose_recompute(cfg(), checkpointing=True, fused=True) == (
        False, "auto: not needed, activation checkpointing recomputes each layer anyway")
    assert choose_recompute(cfg(), checkpointing=False, fused=False) == (
        False, "auto: not without the fused LoRA function (peft's own forward stores them)")
    off = "train.recompute_lora_dropout=false"
    assert choose_recompute(cfg(off), False, True) == (False, "off (train.recompute_lora_dropout: false)")
    assert choose_recompute(cfg("train.recompute_lora_dropout=true"), True, False)[0] is True
    assert choose_recompute(cfg("train.lora_dropout=0"), False, True) == (
        False, "no LoRA dropout (train.lora_dropout: 0)")
