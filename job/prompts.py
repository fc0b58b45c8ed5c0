"""The one template used for training, evaluation and `job predict`, and the tolerant response parser.

The notebook this job replaces built its "JSON" by string formatting (single quotes, a misspelled
key, broken by any apostrophe) and used a different prompt at inference time. Here the response is
`json.dumps` output with fixed keys, and the same `build_prompt` serves every stage.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from job.config import PromptConfig

# Ends every completion. Generation stops on the tokenizer's EOS (appended when tokenizing, and
# trained on); the textual marker is a second, tokenizer-independent boundary the parser cuts at.
RESPONSE_END = "\n### End"

_TEMPLATE = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def build_prompt(source: str, cfg: PromptConfig) -> str:
    """The prompt for one input sentence (ends right where the model's answer starts)."""
    return _TEMPLATE.format(preamble=cfg.preamble, instruction=cfg.instruction, input=source)


def build_completion(source: str, target: str, cfg: PromptConfig) -> str:
    """The gold answer: a JSON object echoing the input and giving the target, then the end marker."""
    answer = {cfg.original_key: source, cfg.output_key: target}
    return json.dumps(answer, ensure_ascii=False) + RESPONSE_END


@dataclass
class ParsedResponse:
    """What a model said, read as generously as honesty allows."""

    raw: str
    json_valid: bool = False
    """A JSON object was found (after removing code fences and trailing text) and parses strictly."""
    schema_valid: bool = False
    """That object has both keys, each a string."""
    original: Optional[str] = None
    output: Optional[str] = None
    recovered: bool = False
    """Not JSON, but a Python-style dict (single quotes) gave the fields: counted as invalid JSON."""


_MAX_STARTS = 50  # bounded work on garbage full of braces
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)


def parse_response(raw: Any, cfg: PromptConfig) -> ParsedResponse:
    """Parse a generated answer. Never raises, whatever the input.

    Reads up to the end marker; prefers the inside of a code fence when it holds an object; then
    tries each `{` in turn (so "Answer {in JSON}: {...}" still finds the object) as strict JSON,
    and only if none parses, as a Python-style dict (counted as invalid JSON)."""
    text = raw if isinstance(raw, str) else ("" if raw is None else str(raw))
    result = ParsedResponse(raw=text)
    body = text.split(RESPONSE_END.strip(), 1)[0]
    fenced = _FENCE.search(body)
    if fenced and "{" in fenced.group(1):
        body = fenced.group(1)
    starts = [i for i, ch in enumerate(body) if ch == "{"][:_MAX_STARTS]
    obj = next((o for o in (_decode_json_object(body[i:]) for i in starts) if o is not None), None)
    if obj is not None:
        result.json_valid = True
    else:
        obj = next((o for o in (_decode_python_dict(body[i:]) for i in starts) if o is not None), None)
        result.recovered = obj is not None
    if not isinstance(obj, dict):
        return result

    original, output = obj.get(cfg.original_key), obj.get(cfg.output_key)
    result.original = original if isinstance(original, str) else None
    result.output = output if isinstance(output, str) else None
    result.schema_valid = result.json_valid and result.original is not None and result.output is not None
    return result


def _decode_json_object(text: str) -> Optional[dict]:
    try:
        obj, _end = json.JSONDecoder().raw_decode(text)  # tolerates trailing chatter after the object
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _decode_python_dict(text: str) -> Optional[dict]:
    """{'a': 'b'} as the notebook produced it; only the balanced first {...} is tried."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            try:
                obj = ast.literal_eval(text[: i + 1])
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                return None
            return obj if isinstance(obj, dict) else None
    return None
