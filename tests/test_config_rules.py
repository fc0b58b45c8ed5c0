"""The constraints fields carry beside them (choice(...), at_least(...) in job/config.py): every such field is
checked when the config loads, at its bound, with the message the README and users rely on."""

import dataclasses

import pytest

from job.config import Config, load_config
from job.errors import ConfigError

REQUIRED = ("run_uri=/tmp/run", "data.uri=/tmp/x.csv", "model.uri=/tmp/model")


def _fields_with(rule: str) -> list:
    cfg = Config()
    return [(f"{s.name}.{f.name}", f.metadata[rule], f.metadata.get("note", "")) for s in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, s.name))
            for f in dataclasses.fields(getattr(cfg, s.name)) if rule in f.metadata]


def _problems(*assignments) -> list[str]:
    try:
        load_config(None, REQUIRED + ("evaluate.enabled=false",) + assignments, environ={},
                    hyperparameters="/nonexistent")
    except ConfigError as exc:
        return exc.problems[1:]
    return []


def _as_loaded(key: str, number):
    """The value as the field holds it after loading (a float field shows -1.0)."""
    section, name = key.split(".")
    return float(number) if isinstance(getattr(getattr(Config(), section), name), float) else number


def test_the_simple_rules_sit_on_their_fields():
    # The keys that moved from the validation code onto the fields: a missing one means a lost rule.
    assert {key for key, *_ in _fields_with("choices")} == {
        "data.format", "train.quant_type", "train.compute_dtype", "merge.dtype", "merge.device", "evaluate.model"}
    assert {key for key, *_ in _fields_with("at_least")} >= {
        "data.eval_size", "data.max_rows", "storage.lease_seconds", "train.lora_r", "train.weight_decay",
        "train.distributed_timeout_minutes", "merge.tolerance", "export.check_prompts", "evaluate.max_examples"}


@pytest.mark.parametrize("key,minimum,note", _fields_with("at_least"), ids=lambda v: str(v))
def test_at_least_refuses_below_the_minimum_and_accepts_it(key, minimum, note):
    wording = {0: ">= 0", 1: "positive"}.get(minimum, f"at least {minimum}")
    problems = _problems(f"{key}={minimum - 1}")
    assert [p for p in problems if p.startswith(f"  - {key}:")] == [
        f"  - {key}: must be {wording}{f' ({note})' if note else ''}, got {_as_loaded(key, minimum - 1)}"]
    assert not [p for p in _problems(f"{key}={minimum}") if key in p]


@pytest.mark.parametrize("key,choices,_", _fields_with("choices"), ids=lambda v: str(v))
def test_choice_refuses_other_values_and_lists_the_choices(key, choices, _):
    assert _problems(f"{key}=bogus") == [f"  - {key}: must be one of {', '.join(choices)}, got 'bogus'"]
    for value in choices:
        assert not _problems(f"{key}={value}")


def test_optional_fields_stay_nullable_and_nan_is_refused_once():
    assert not _problems("evaluate.max_examples=null", "data.max_rows=null")
    # A float at_least field refuses nan with one message: its own rule, or the finite-number rule.
    assert _problems("train.weight_decay=.nan") == ["  - train.weight_decay: must be >= 0, got nan"]
    assert _problems("train.distributed_timeout_minutes=.nan") == [
        "  - train.distributed_timeout_minutes: must be a finite number, got nan"]
