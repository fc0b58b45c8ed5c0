"""Hypothesis settings for the property tests (tests/test_properties_*.py).

CI runs each property with a fixed seed (`derandomize=True`: the same examples every run, so a red CI
is reproducible) and a bounded number of examples. `HYPOTHESIS_PROFILE=thorough` runs 20 times as many,
with a random seed, to look for the next bad input outside CI (README "Tests and CI"). A failure prints
the shrunk input (`print_blob` gives the line that replays it); each one found becomes an ordinary
regression test next to the property.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
SCALE = 20 if THOROUGH else 1


def fuzz(examples: int):
    """Settings for a property that CI runs `examples` times (20x with HYPOTHESIS_PROFILE=thorough)."""
    return settings(max_examples=examples * SCALE, derandomize=not THOROUGH, deadline=None, print_blob=True,
                    database=None,  # no .hypothesis/ folder: CI's examples are the seeded ones, nothing else
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])
