"""The label check on real SNLI records, too-long examples, and packing without cross-example attention."""

import json

import pytest
import torch

from job.config import load_config
from job.errors import InputError
from job.model import load_tokenizer
from job.pipeline import Context
from job.readers import read_csv
from job.stages.format import select_rows, to_jsonl
from job.stages.labels import LabelCheckError, check_labels, tokenize_examples
from job.stages.train import build_trainer, load_base_model
from job.storage import open_store
from tests.helpers import SNLI_SAMPLE, read_jsonl


def snli_records(cfg):
    frame = read_csv(SNLI_SAMPLE, str(SNLI_SAMPLE), ["gold_label", "sentence1", "sentence2"])
    records, _stats = select_rows(frame, cfg, str(SNLI_SAMPLE))
    return read_jsonl(to_jsonl(records, cfg))


def make_trainer(model_dir, tmp_path, *sets):
    cfg = load_config(None, (f"run_uri={tmp_path / 'run'}", "data.uri=x.csv", f"model.uri={model_dir}",
                             "train.load_in_4bit=false", "train.max_steps=1", *sets), environ={})
    tokenizer = load_tokenizer(model_dir, str(model_dir))
    examples = tokenize_examples(snli_records(cfg), tokenizer, cfg.train.max_seq_length)
    model = load_base_model(cfg, model_dir, torch.float32)
    ctx = Context(store=open_store(str(tmp_path / "run")), work_dir=tmp_path / "work", fingerprint="test")
    settings = {"packing": cfg.train.packing, "packing_length": 512, "micro_batch_size": 4,
                "gradient_checkpointing": False}
    return build_trainer(cfg, ctx, model, tokenizer, examples.dataset, torch.float32, settings), tokenizer


@pytest.mark.parametrize("packing", [True, False])
def test_label_check_passes_on_real_snli(tiny_model_dir, tmp_path, packing):  # noqa: F811
    trainer, tokenizer = make_trainer(tiny_model_dir, tmp_path, f"train.packing={str(packing).lower()}")
    report = check_labels(trainer, tokenizer)
    assert report["packed"] is packing
    assert report["examples"] >= 64 and report["supervised_tokens"] > 0
    # Inspect one example by hand: prompt masked, JSON completion and EOS supervised.
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    end = int((ids == tokenizer.eos_token_id).nonzero()[0])
    first = int((labels != -100).nonzero()[0])
    assert labels[end] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:first]).endswith("### Response:\n")
    completion = tokenizer.decode(ids[first:end])
    assert json.loads(completion.split("\n### End")[0])["original_sentence"]


def test_label_check_catches_masked_eos_and_truncation(tiny_model_dir, tmp_path):  # noqa: F811
    trainer, tokenizer = make_trainer(tiny_model_dir, tmp_path)
    collate = trainer.data_collator

    def eos_masked(examples):
        batch = collate(examples)
        batch["labels"][batch["input_ids"] == tokenizer.eos_token_id] = -100
        return batch

    def truncated(examples):
        batch = collate(examples)
        for key in ("input_ids", "labels", "position_ids"):
            batch[key] = batch[key][:, :-3]
        return batch

    def prompt_supervised(examples):
        batch = collate(examples)
        batch["labels"] = batch["input_ids"].clone()
        return batch

    for broken, message in ((eos_masked, "EOS"), (truncated, "EOS"), (prompt_supervised, "not the prompt")):
        trainer.data_collator = broken
        with pytest.raises(LabelCheckError, match=message):
            check_labels(trainer, tokenizer)


def test_too_long_examples_are_dropped_and_counted(tiny_model_dir):  # noqa: F811
    cfg = load_config(None, ("run_uri=/r", "data.uri=x.csv", "model.uri=/m"), environ={})
    tokenizer = load_tokenizer(tiny_model_dir, str(tiny_model_dir))
    records = snli_records(cfg)
    lengths = sorted(len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(r["completion"],
                     add_special_tokens=False)["input_ids"]) + 1 for r in records)
    limit = lengths[len(lengths) // 2]
    examples = tokenize_examples(records, tokenizer, limit)
    assert len(examples.dataset) + len(examples.dropped_rows) == len(records)
    assert 0 < len(examples.dropped_rows) < len(records)
    assert max(len(ids) for ids in examples.dataset["input_ids"]) <= limit
    with pytest.raises(InputError, match=r"every training example is longer than train.max_seq_length=10 tokens "
                                         r"\(first: CSV row \d+"):
        tokenize_examples(records, tokenizer, 10)


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir):  # noqa: F811
    """Logits of two examples packed in one row (position ids restart) equal their logits alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    a, b = torch.randint(5, 1000, (1, 23)), torch.randint(5, 1000, (1, 17))
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
        packed_ids = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(23), torch.arange(17)])[None]
        # use_cache=False as in training (the train stage sets it): transformers then builds the
        # block-diagonal mask from the restarting position ids.
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
        leaky = model(input_ids=packed_ids, use_cache=False).logits  # no position ids: b would see a
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky[:, 23:], alone[:, 23:], atol=1e-3)
