"""The template and the tolerant parser, on real and malformed model outputs."""

import json

import pytest

from job.config import PromptConfig
from job.prompts import RESPONSE_END, build_completion, build_prompt, parse_response

P = PromptConfig()


def test_prompt_is_alpaca_and_shared():
    prompt = build_prompt('A man says "hi" to Zoë.', P)
    assert prompt.startswith(P.preamble)
    assert "### Instruction:\n" + P.instruction in prompt
    assert '### Input:\nA man says "hi" to Zoë.\n\n### Response:\n' in prompt
    assert prompt.endswith("### Response:\n")


def test_completion_is_json_with_end_marker():
    completion = build_completion("It's a dog's life.", "Nobody is there.", P)
    assert completion.endswith(RESPONSE_END)
    obj = json.loads(completion[: -len(RESPONSE_END)])
    assert obj == {"original_sentence": "It's a dog's life.", "negation": "Nobody is there."}


GOOD = '{"original_sentence": "A dog runs.", "negation": "No dog runs."}'


@pytest.mark.parametrize("raw, json_valid, schema_valid, output", [
    (GOOD, True, True, "No dog runs."),
    (GOOD + RESPONSE_END, True, True, "No dog runs."),
    (GOOD + "\n### End\n### Instruction: ramble on and on", True, True, "No dog runs."),
    ("```json\n" + GOOD + "\n```", True, True, "No dog runs."),
    ("```\n" + GOOD, True, True, "No dog runs."),
    ("Sure! Here is the answer: " + GOOD + " Hope this helps.", True, True, "No dog runs."),
    ("{'original_sentence': 'A dog runs.', 'negation': 'No dog runs.'}", False, False, "No dog runs."),
    ('{"orignal_sentence": "A dog runs.", "negation": "No dog runs."}', True, False, "No dog runs."),
    ('{"original_sentence": "A dog runs.", "negation": "No dog', False, False, None),
    ('{"original_sentence": "A dog runs.", "negation": 5}', True, False, None),
    ("", False, False, None),
    ("A dog runs. A dog runs. A dog runs.", False, False, None),
    ("[1, 2, 3]", False, False, None),
    ("{" * 5000, False, False, None),
    ("}{", False, False, None),
    (None, False, False, None),
    (b"\xff", False, False, None),
])
def test_parser_corpus(raw, json_valid, schema_valid, output):
    parsed = parse_response(raw, P)
    assert parsed.json_valid is json_valid
    assert parsed.schema_valid is schema_valid
    assert parsed.output == output


def test_parser_round_trips_every_real_completion():
    for source, target in [("Zoë's café is \"closed\".", "It's open; a naïve claim."), ("a\\b", "c\n d")]:
        parsed = parse_response(build_completion(source, target, P), P)
        assert parsed.schema_valid and parsed.original == source and parsed.output == target
