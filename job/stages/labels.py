"""Tokenization for training and the check that proves the labels are right.

Prompt and completion are tokenized separately and concatenated, so the prompt's tokens are exactly
those the model sees at inference (where it is tokenized alone), then EOS is appended. Examples
longer than train.max_seq_length are dropped and counted, never cut: a truncated example would lose
its EOS and teach the model to ramble.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from job.errors import InputError, JobError
from job.layout import STATS, TRAIN_DATA


@dataclass
class Examples:
    dataset: object  # datasets.Dataset with input_ids and completion_mask
    dropped_rows: list = field(default_factory=list)
    """CSV row numbers of examples dropped as too long."""


def tokenize_examples(records: list[dict], tokenizer, max_len: int) -> Examples:
    from datasets import Dataset

    if not records:
        raise InputError(f"{TRAIN_DATA} has no records; check the format stage's {STATS}")
    prompts = tokenizer([r["prompt"] for r in records])["input_ids"]
    completions = tokenizer([r["completion"] for r in records], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    input_ids, masks, dropped = [], [], []
    for record, p, c in zip(records, prompts, completions):
        ids = p + c + [eos]
        if len(ids) > max_len:
            dropped.append(record.get("row"))
            continue
        input_ids.append(ids)
        masks.append([0] * len(p) + [1] * (len(c) + 1))
    if not input_ids:
        raise InputError(f"every training example is longer than train.max_seq_length={max_len} tokens "
                         f"(first: CSV row {dropped[0]}, {len(prompts[0]) + len(completions[0]) + 1} tokens); "
                         "raise train.max_seq_length")
    return Examples(Dataset.from_dict({"input_ids": input_ids, "completion_mask": masks}), dropped)


class LabelCheckError(JobError):
    """The batches the trainer would see are wrong: training on them would waste the GPU time. Exit 1
    without a traceback: the message says which example and which settings shape the batches."""

    def __init__(self, problem: str):
        super().__init__(f"train: label check failed before the first step: {problem}. The batches depend on "
                         "train.packing, train.packing_length and train.max_seq_length; nothing was trained")


def check_labels(trainer, tokenizer, n_examples: int = 64) -> dict:
    """Collate the first examples exactly as training will and prove, for every example in the batch:
    the prompt is masked (-100), the completion is supervised up to and including a final EOS, and
    nothing was cut (each example ends in EOS). Raises LabelCheckError otherwise."""
    import torch

    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(min(n_examples, len(dataset)))])
    eos, response_marker = tokenizer.eos_token_id, "### Response:"
    input_ids, labels = batch["input_ids"], batch["labels"]
    segments = []
    if "position_ids" in batch:  # padding-free: one flat row, examples start where position_ids == 0
        positions = batch["position_ids"]
        for row in range(input_ids.shape[0]):
            starts = (positions[row] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
            for a, b in zip(starts, starts[1:]):
                segments.append((input_ids[row, a:b], labels[row, a:b]))
    else:
        for row in range(input_ids.shape[0]):
            n = int(batch["attention_mask"][row].sum())
            segments.append((input_ids[row, :n], labels[row, :n]))

    supervised_total = 0
    for i, (ids, lab) in enumerate(segments):
        real = ids != tokenizer.pad_token_id
        ids, lab = ids[real], lab[real]
        if ids.numel() == 0:
            continue  # trailing padding of a padding-free row
        supervised = lab != -100
        where = supervised.nonzero().flatten()
        if where.numel() == 0:
            raise LabelCheckError(f"example {i}: no supervised token (completion masked or cut off)")
        if int(ids[-1]) != eos or int(lab[-1]) != eos:
            raise LabelCheckError(f"example {i}: does not end with a supervised EOS (truncated, or EOS masked)")
        first = int(where[0])
        if not bool(supervised[first:].all()):
            raise LabelCheckError(f"example {i}: supervised tokens are not one contiguous completion")
        if not torch.equal(lab[supervised], ids[supervised]):
            raise LabelCheckError(f"example {i}: labels differ from the tokens they supervise")
        prompt_text = tokenizer.decode(ids[:first])
        if not prompt_text.rstrip().endswith(response_marker):
            raise LabelCheckError(f"example {i}: the masked part is not the prompt (ends {prompt_text[-40:]!r})")
        supervised_total += int(supervised.sum())
    return {"examples": sum(1 for ids, _ in segments if bool((ids != tokenizer.pad_token_id).any())),
            "supervised_tokens": supervised_total, "packed": "position_ids" in batch}
