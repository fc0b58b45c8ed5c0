"""Per-property example counts for the property tests (tests/test_properties_*.py), on top of the profile
that tests/hypothesis_profiles.py loads (one place for the seed and the 20x `thorough` mode): CI runs each
property with a fixed seed and a bounded number of examples; HYPOTHESIS_PROFILE=thorough runs 20 times
as many with a random seed (README "Tests and CI"). A failure prints the shrunk input and the line that
replays it; each one found becomes an ordinary regression test next to the property.
"""

from __future__ import annotations

from hypothesis import settings

from tests.hypothesis_profiles import examples


def fuzz(count: int):
    """Settings for a property that CI runs `count` times (20x under the thorough profile)."""
    return settings(max_examples=examples(count))
