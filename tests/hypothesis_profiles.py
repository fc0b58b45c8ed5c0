"""Hypothesis settings for the property tests: seeded and bounded in CI, twenty times the examples on demand.

  ci        (default) derandomized: the same examples on every run, so CI is repeatable and fast
  thorough  HYPOTHESIS_PROFILE=thorough: 20x the examples with a random seed, to look further (by hand,
            outside CI)

Imported by tests/conftest.py, so every test module sees the profile the environment names.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = 50
THOROUGH_FACTOR = 20

_common = dict(deadline=None, database=None, print_blob=True,  # no .hypothesis/ folder; print the replay line
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=CI_EXAMPLES * THOROUGH_FACTOR, derandomize=False, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """A test's own example count, scaled like the profile's (x20 under `thorough`)."""
    return n * THOROUGH_FACTOR if settings().max_examples > CI_EXAMPLES else n
