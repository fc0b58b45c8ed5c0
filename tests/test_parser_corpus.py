"""The tolerant parser (job/prompts.py) on a corpus: what real models write (the tiny model's own
generations, the notebook's Llama-2 style, chatty instruction models) and what breaks (fences, single
quotes, truncation at max_new_tokens, trailing chatter, empty, binary junk). It must never raise, must
accept strict JSON wherever it sits, and must never call something valid that is not."""

from __future__ import annotations

import json

import pytest

from job.config import PromptConfig
from job.prompts import RESPONSE_END, build_completion, parse_response
from tests.test_merge import trained_run  # noqa: F401 - fixture

P = PromptConfig()
OK = '{"original_sentence": "A man sleeps.", "negation": "A man is awake."}'

# (raw, json_valid, schema_valid, negation)
CORPUS = [
    # what this job trains the model to write, and its near misses
    (OK + RESPONSE_END, True, True, "A man is awake."),
    (OK + "</s>", True, True, "A man is awake."),
    (OK + RESPONSE_END + "\n\n### Instruction:\nWrite the negation", True, True, "A man is awake."),
    ('{"original_sentence": "It\'s Zoë\'s \\"café\\".", "negation": "Nobody\'s there."}', True, True,
     "Nobody's there."),
    ('{\n  "original_sentence": "A man sleeps.",\n  "negation": "A man is awake."\n}', True, True, "A man is awake."),
    ('{"negation": "A man is awake.", "original_sentence": "A man sleeps."}', True, True, "A man is awake."),
    # chat models: fences and chatter around the object
    ("```json\n" + OK + "\n```", True, True, "A man is awake."),
    ("```JSON\n" + OK + "\n```\nLet me know if you need anything else!", True, True, "A man is awake."),
    ("Sure! Here is the JSON you asked for:\n\n```\n" + OK + "\n```", True, True, "A man is awake."),
    ("Here you go: " + OK + "\nThe negation contradicts the input.", True, True, "A man is awake."),
    (OK + " " + OK, True, True, "A man is awake."),  # repeated answer: the first counts
    # the notebook's format: single quotes and a misspelled key
    ("{'orignal_sentence': 'A man sleeps.', 'negation': 'A man is awake.'}", False, False, "A man is awake."),
    ("{'original_sentence': 'A man sleeps.', 'negation': 'A man is awake.'}", False, False, "A man is awake."),
    ("{'original_sentence': 'A man's dog sleeps.', 'negation': 'x'}", False, False, None),  # the apostrophe bug
    # wrong shapes
    ('{"original_sentence": "A man sleeps."}', True, False, None),
    ('{"original_sentence": "A man sleeps.", "negation": ["A", "man"]}', True, False, None),
    ('{"original_sentence": "A man sleeps.", "negation": null}', True, False, None),
    ('{"original_sentence": "A man sleeps.", "negation": "x", }', False, False, "x"),  # trailing comma
    ('"negation": "A man is awake."', False, False, None),
    ("A man is awake.", False, False, None),
    # truncated at max_new_tokens
    ('{"original_sentence": "A man sleeps.", "negation": "A man is aw', False, False, None),
    ('{"original_sentence": "A man sleeps.", "negation": "A man is awake."', False, False, None),
    ("```json\n{\"original_sentence\": \"A man", False, False, None),
    ("{", False, False, None),
    # empty and junk
    ("", False, False, None),
    ("   \n\t", False, False, None),
    ("```json\n```", False, False, None),
    ("\x00\x01\ufffd{\ufffd}", False, False, None),
    ("{" * 10_000, False, False, None),
    ("[" * 10_000 + "{", False, False, None),
    ("{'a': " * 500, False, False, None),
    ("}{", False, False, None),
]


@pytest.mark.parametrize("raw, json_valid, schema_valid, negation", CORPUS)
def test_corpus(raw, json_valid, schema_valid, negation):
    parsed = parse_response(raw, P)
    assert (parsed.json_valid, parsed.schema_valid, parsed.output) == (json_valid, schema_valid, negation)


# Found while writing this corpus and fixed in the parser: it tries every "{" and uses a fence's
# inside only when that holds an object.
FORMERLY_MISSED = [
    pytest.param('Answer {in JSON}: ' + OK, id="brace-in-chatter-before-object"),
    pytest.param(OK + "\n```", id="stray-closing-fence-after-object"),
    pytest.param(OK + "\n```\nMore text", id="closing-fence-then-chatter"),
]


@pytest.mark.parametrize("raw", FORMERLY_MISSED)
def test_formerly_missed(raw):
    assert parse_response(raw, P).schema_valid


def test_every_prefix_of_a_real_completion():
    """Truncation anywhere: never raises, never valid until the closing brace is there."""
    completion = build_completion("A man's \"hat\" is {red}.", "Nobody wears a hat.", P)
    end = completion.index(RESPONSE_END)
    for cut in range(len(completion) + 1):
        parsed = parse_response(completion[:cut], P)
        assert parsed.json_valid is (cut >= end), cut
        if parsed.schema_valid:
            assert parsed.output == "Nobody wears a hat."


def test_real_generations_of_the_tiny_model(trained_run):  # noqa: F811
    """What a barely trained model really writes: the parser never raises, and whatever it calls
    valid really is a JSON object with the two string keys, found in the text."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.predict import generate, load_inference_tokenizer

    tokenizer = load_inference_tokenizer(trained_run.run_dir / "adapter", "adapter/")
    records = [json.loads(line) for line in (trained_run.run_dir / "data" / "eval.jsonl").read_text().splitlines()]
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(trained_run.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained_run.run_dir / "adapter").eval()
    torch.manual_seed(0)
    outputs = []
    for sample in (False, True):  # greedy (repetitive) and sampled (messier) text
        gens, _ = generate(model, tokenizer, [r["prompt"] for r in records[:6]], max_new_tokens=40,
                           batch_size=3, do_sample=sample, temperature=1.5)
        outputs += [g.text for g in gens]
    assert any(text.strip() for text in outputs)
    for text in outputs + [t[:n] for t in outputs for n in (1, 7, 20)]:
        parsed = parse_response(text, P)
        if parsed.json_valid:  # some "{" in the text starts a strict JSON object
            assert any(_object_at(text, i) for i, ch in enumerate(text) if ch == "{"), text
        if parsed.schema_valid:
            assert isinstance(parsed.output, str) and isinstance(parsed.original, str)


def _object_at(text: str, i: int) -> bool:
    try:
        return isinstance(json.JSONDecoder().raw_decode(text[i:])[0], dict)
    except ValueError:
        return False
