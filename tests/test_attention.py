"""Variable-length attention (job/attention.py) on the CPU: the document boundaries taken from packed
position ids, and the wiring through transformers (registered name, no dense mask, kwargs from trl's
padding-free collator, GQA) with the reference backend, which runs sdpa one document at a time from
the same cu_seqlens the GPU kernel gets. Also the choice of attention and Liger kernels, and the
batch planner's arithmetic for the 7B shape on 140, 80 and 16 GiB cards (faked free memory).
The GPU kernel itself is checked on a GPU: bench/gpu_varlen_check.py."""

import json
from types import SimpleNamespace

import pytest
import torch

from job.attention import choose_training_attention, document_boundaries, register
from tests.helpers import SNLI_SAMPLE, job_env, run_job


def boundaries(position_ids):
    cu, longest = document_boundaries(torch.tensor(position_ids))
    return cu.tolist(), longest


def test_boundaries_from_packed_position_ids():
    assert boundaries([[0, 1, 2, 0, 1, 0, 1, 2, 3]]) == ([0, 3, 5, 9], 4)
    # flat position ids work too, and the result is int32 as the kernel wants
    cu, _ = document_boundaries(torch.tensor([0, 1, 0]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 3]


def test_boundaries_one_token_documents():
    assert boundaries([[0, 0, 1, 0, 0]]) == ([0, 1, 3, 4, 5], 2)
    assert boundaries([[0]]) == ([0, 1], 1)


def test_boundaries_batch_starting_mid_document():
    # the first tokens continue a document that began before this batch: they form a document of their own
    assert boundaries([[7, 8, 9, 0, 1]]) == ([0, 3, 5], 3)


def test_boundaries_several_rows():
    # a row never continues the previous row, even when its first position is not 0
    assert boundaries([[0, 1, 2, 0], [4, 5, 0, 1]]) == ([0, 3, 4, 6, 8], 3)
    assert boundaries([[0, 1], [0, 1]]) == ([0, 2, 4], 2)


def tiny_llama(kv_heads: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    if attn != "sdpa":
        register()
        model.set_attn_implementation(attn)
    return model


DOCS = [[5, 17, 3, 9, 44, 2], [8], [60, 61, 62, 63, 12, 13, 14, 90, 91, 2], [7, 7]]  # incl. a one-token document


def packed(docs):
    ids = torch.tensor([[t for d in docs for t in d]])
    positions = torch.tensor([[p for d in docs for p in range(len(d))]])
    return ids, positions


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_packed_logits_equal_each_document_alone(kv_heads):
    alone = tiny_llama(kv_heads, "sdpa")
    varlen = tiny_llama(kv_heads, "varlen")
    assert varlen.config._attn_implementation == "varlen"
    ids, positions = packed(DOCS)
    with torch.no_grad():
        got = varlen(input_ids=ids, position_ids=positions).logits[0]
        want = torch.cat([alone(input_ids=torch.tensor([d])).logits[0] for d in DOCS])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and without the per-document split the packed row would differ (the check can fail)
    with torch.no_grad():
        crossed = varlen(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
    assert not torch.allclose(crossed, want, atol=1e-3)


def test_trl_collator_boundaries_reach_the_attention_and_gradients_match():
    """A batch from trl's padding-free collator (as the job trains): cu_seq_lens_q/max_length_q go to
    every layer; the loss and the gradients equal those of the documents run one by one."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": d} for d in DOCS])
    assert batch["cu_seq_lens_q"].tolist() == boundaries(batch["position_ids"].tolist())[0]
    seen = []
    import job.attention as attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cu_seq_lens_q"))
        return attention.varlen_attention_forward(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register("varlen-spy", spy)
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionMaskInterface.register("varlen-spy", flash_attention_mask)
    model = tiny_llama(2, "varlen-spy")
    labels = batch.pop("labels")
    logits = model(**batch).logits[0]
    assert len(seen) == model.config.num_hidden_layers and all(s is batch["cu_seq_lens_q"] for s in seen)
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    loss.backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    model.zero_grad()
    total = 0.0
    for doc in DOCS:
        ids = torch.tensor([doc])
        out = model(input_ids=ids).logits[0]
        if len(doc) > 1:
            part = torch.nn.functional.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
        else:
            part = out.sum() * 0
        part.backward()
        total += part.detach().item()
    assert float(loss) == pytest.approx(total, rel=1e-5)
    torch.testing.assert_close(packed_grad, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6)


def test_padding_mask_is_refused():
    model = tiny_llama(4, "varlen")
    with pytest.raises(ValueError, match="packed, padding-free"):
        model(input_ids=torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))


def test_choice_on_cpu():
    name, reason = choose_training_attention("auto", packing=True)
    assert name == "sdpa" and "no CUDA" in reason
    assert choose_training_attention("eager", packing=True) == ("eager", "set by model.attn_implementation")
    # flex_attention failed at the first step on a CPU (NotImplementedError), flash_attention_2 without
    # flash-attn in from_pretrained (ImportError): both are refused before the model loads
    with pytest.raises(ValueError, match="flex_attention cannot run here: no CUDA device"):
        choose_training_attention("flex_attention", packing=True)
    with pytest.raises(ValueError, match="flash_attention_2 cannot run here: the flash-attn package is not installed"):
        choose_training_attention("flash_attention_2", packing=True)
    with pytest.raises(ValueError, match="varlen cannot run here: no CUDA"):
        choose_training_attention("varlen", packing=True)


def test_inference_never_uses_varlen():
    from job.config import load_config
    from job.model import attn_implementation

    for setting in ("auto", "varlen"):
        cfg = load_config(None, ("run_uri=/r", "data.uri=d.csv", "model.uri=/m",
                                 f"model.attn_implementation={setting}"), environ={})
        assert attn_implementation(cfg) == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case: no CUDA device, no flash-attn")
def test_attention_that_cannot_run_here_exits_2_in_predict_and_unknown_names_at_config_load(tiny_model_dir):  # noqa: F811
    """Inference (predict, merge, evaluate) checks the same way before loading; a misspelt name is refused
    when the config loads (`job config`), on any machine."""
    for name, why in (("flash_attention_2", "the flash-attn package is not installed"),
                      ("flex_attention", "no CUDA device")):
        result = run_job("predict", "--model", str(tiny_model_dir), "--set", f"model.attn_implementation={name}",
                         "A man is sleeping.")
        assert result.returncode == 2, result.stderr
        assert f"model.attn_implementation: {name} cannot run here: {why}" in result.stderr
        assert "Traceback" not in result.stderr
    result = run_job("config", "--set", "run_uri=/r", "--set", "data.uri=d.csv", "--set", "model.uri=/m",
                     "--set", "model.attn_implementation=flash_attn2")
    assert result.returncode == 2 and "model.attn_implementation: unknown attention 'flash_attn2'" in result.stderr


def test_varlen_on_cpu_exits_2_before_training(tmp_path, tiny_model_dir):  # noqa: F811
    run = tmp_path / "run"
    result = run_job("run", "--stages", "format,train", "--set", f"run_uri={run}", "--set", f"data.uri={SNLI_SAMPLE}",
                     "--set", f"model.uri={tiny_model_dir}", "--set", "data.eval_size=20",
                     "--set", "train.load_in_4bit=false", "--set", "model.attn_implementation=varlen",
                     env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert "model.attn_implementation: varlen cannot run here: no CUDA device" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert (run / "_stages" / "format.json").is_file() and not (run / "_stages" / "train.json").exists()


def test_liger_choice_on_cpu(tmp_path):
    from job.config import load_config
    from job.errors import InputError
    from job.liger import choose_liger

    def cfg(value):
        return load_config(None, ("run_uri=/r", "data.uri=d.csv", "model.uri=/m", f"train.liger={value}"), environ={})

    assert choose_liger(cfg("auto"), tmp_path) == (
        False, "auto: not used, no CUDA device (Liger's Triton kernels run on GPUs)")
    assert choose_liger(cfg("false"), tmp_path) == (False, "off (train.liger: false)")
    with pytest.raises(InputError, match="train.liger: true, but Liger kernels cannot be used here: no CUDA"):
        choose_liger(cfg("true"), tmp_path)


def test_liger_setting_is_validated():
    result = run_job("config", "--set", "run_uri=/r", "--set", "data.uri=d.csv", "--set", "model.uri=/m",
                     "--set", "train.liger=sometimes")
    assert result.returncode == 2
    assert "train.liger: must be true, false or \"auto\", got 'sometimes'" in result.stderr


SHAPE_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
            "vocab_size": 32000}
GIB = 2**30


@pytest.fixture
def plan_7b(tmp_path, monkeypatch):
    """plan_batch for the 7B shape with `gib` of usable GPU memory (plan_batch is arithmetic on the
    model's shape and that figure; the figures it must reproduce were measured on an H200)."""
    from job.config import load_config
    from job.stages import train

    (tmp_path / "config.json").write_text(json.dumps(SHAPE_7B))
    examples = SimpleNamespace(dataset={"input_ids": [[1] * 120, [1] * 300]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def plan(gib, attention="varlen", liger=False, *sets):
        monkeypatch.setattr(train, "usable_gpu_memory", lambda: int(gib * GIB))
        cfg = load_config(None, ("run_uri=/r", "data.uri=d.csv", "model.uri=/m", *sets), environ={})
        kernels = {"attention": attention, "attention_reason": "test", "liger": liger, "liger_reason": "test"}
        return train.plan_batch(cfg, examples, tmp_path, kernels)

    return plan


def test_plan_varlen_140_gib_no_checkpointing(plan_7b):
    plan = plan_7b(139.5)
    assert (plan["packing_length"], plan["micro_batch_size"], plan["gradient_checkpointing"]) == (2048, 8, False)
    assert plan_7b(139.5, "varlen", True)["micro_batch_size"] == 8  # Liger: the same plan, 102 GiB instead of 121


def test_plan_varlen_80_gib_fits_with_headroom(plan_7b):
    # measured with peft's stored dropout (the default): 2048 x 4 without checkpointing peaked at 62.7 GiB under
    # an 80 GiB cap
    stored = "train.recompute_lora_dropout=false"
    plan = plan_7b(80, "varlen", False, stored)
    assert (plan["packing_length"], plan["micro_batch_size"], plan["gradient_checkpointing"]) == (2048, 4, False)
    with_liger = plan_7b(80, "varlen", True, stored)
    assert with_liger["gradient_checkpointing"] is False and with_liger["micro_batch_size"] == 5


def test_plan_with_the_dropout_recomputed_takes_a_larger_batch(plan_7b):
    # a recomputed LoRA dropout stores what dropout 0 stores: 2048 x 8 with Liger on an H100 (dropout 0
    # measured 69.0 GiB there, docs/benchmarks.md)
    recompute = "train.recompute_lora_dropout=auto"
    assert plan_7b(80, "varlen", False, recompute)["micro_batch_size"] == 6
    h100_liger = plan_7b(78.7, "varlen", True, recompute)
    assert (h100_liger["micro_batch_size"], h100_liger["gradient_checkpointing"]) == (8, False)
    # with checkpointing (a small card) nothing changes: the layers are recomputed anyway
    assert plan_7b(16, "varlen", False, recompute) == plan_7b(16)
    # under a 40 GiB cap 2048 x 4 without checkpointing went out of memory (H100, docs/benchmarks.md): the plan
    # must not take it
    capped = plan_7b(40, "varlen", True, recompute)
    assert capped["gradient_checkpointing"] is True or capped["micro_batch_size"] <= 3


def test_plan_varlen_16_gib_checkpoints(plan_7b):
    # measured: 2048 x 6 with checkpointing, 11 GiB peak
    plan = plan_7b(16)
    assert (plan["packing_length"], plan["micro_batch_size"], plan["gradient_checkpointing"]) == (2048, 6, True)


def test_plan_sdpa_keeps_8k_tokens(plan_7b):
    # a dense document mask costs the square of the tokens: sdpa stays at 8k tokens per micro-batch
    plan = plan_7b(139.5, "sdpa")
    assert (plan["micro_batch_size"], plan["gradient_checkpointing"]) == (4, False)
