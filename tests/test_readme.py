"""The README is the front door: it must list every config key and the commands CI runs."""

import dataclasses
from pathlib import Path

from job.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_config_key_is_documented():
    cfg = Config()
    keys = ["run_uri"] + [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
                          if dataclasses.is_dataclass(getattr(cfg, s.name))
                          for f in dataclasses.fields(getattr(cfg, s.name))]
    missing = [k for k in keys if f"`{k}`" not in README]
    assert not missing, f"README lacks {missing}: run python docs/config_table.py and paste the table"


def test_ci_runs_the_readme_test_command():
    assert "python -m pytest -q" in README
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    # and installs s3rver (tests/s3rver) as the README's test command does
    assert "npm ci --prefix tests/s3rver" in README
    assert "npm ci --prefix tests/s3rver" in (ROOT / ".ci" / "run").read_text()


def test_exit_codes_documented():
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 5 |", "| 75 |", "| 130 |"):
        assert code in README
