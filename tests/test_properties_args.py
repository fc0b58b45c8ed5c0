"""Property: command-line values of any text (paths, --model, --input, --stages, --force, --config) exit 2
with a message naming the option or the value, never a traceback; and a path is a path, never read as
YAML (`--model 0123` is the folder "0123", not the number 83).

In-process through `job.cli._main` (the code `python -m job` runs: click parsing, the job's exit codes,
its log on stderr), with no required key set, so nothing runs and nothing is written. Values that would
reach a network (s3://, hf://, gguf:) are left out: CI has none. Seeded and bounded (tests/fuzz.py).
"""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.fuzz import fuzz
from tests.helpers import job_env, run_job

YAML_LOOKING = ["0123", "1.0", "1e3", "yes", "no", "null", "~", "true", "[a, b]", "{a: 1}", "- x", "a: b", "&x",
                "*x", "!!str x", "#", "'quoted'", '"q"', "=", "a=b", "-", "--", "--help", ".", "..", "~/x", " "]
# Anything a shell can pass: no NUL. Surrogates stand for bytes that are not UTF-8 (Python's surrogateescape).
argument_text = st.one_of(st.sampled_from(YAML_LOOKING),
                          st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                                  max_size=40),
                          st.text(st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1, max_size=3))


def job(*argv) -> tuple[int, str]:
    from job.cli import _main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = _main(list(argv))
    logging.getLogger().handlers[:] = []
    return code, err.getvalue()


def no_network(text: str) -> bool:
    return not text.lstrip().lower().startswith(("s3:", "hf:", "gguf:", "http")) and "://" not in text


def assert_refused(code, err, *any_of):
    assert code == 2, err
    assert "Traceback" not in err and "unexpected error" not in err, err
    assert any(a in err for a in any_of), (any_of, err)


@pytest.fixture(autouse=True)
def quiet_environment(monkeypatch, tmp_path):
    """No JOB_* settings from outside, a cache under tmp_path, and stdin that is empty (`--input -`)."""
    for name in [n for n in __import__("os").environ if n.startswith("JOB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("JOB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    monkeypatch.chdir(tmp_path)  # relative paths land in an empty folder


def _shown(text: str) -> str:
    """How a message shows the value (lone surrogates are written back as escapes)."""
    return text.encode("utf-8", "backslashreplace").decode().strip()[:10]


@fuzz(60)
@given(text=argument_text)
def test_config_path_of_any_text(text):
    code, err = job("config", "--config", text)
    assert_refused(code, err, "--config")


@fuzz(60)
@given(text=argument_text, option=st.sampled_from(["--stages", "--force"]))
def test_stages_and_force_of_any_text(text, option):
    code, err = job("run", option, text)
    assert_refused(code, err, option, "required but not set")


@fuzz(40)
@given(text=argument_text)
def test_model_path_of_any_text(text):
    assume(no_network(text) and text.strip() not in ("", "-", "--", "--help") and not text.startswith("-"))
    code, err = job("predict", "--model", text, "A sentence.")
    assert_refused(code, err, _shown(text), "--model")
    assert "model.uri: expected" not in err  # the path was read as a path, not as YAML


@fuzz(40)
@given(text=argument_text)
def test_input_path_of_any_text(text, tmp_path):
    assume(no_network(text) and text not in ("", "-") and not text.startswith("-"))
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    code, err = job("predict", "--model", str(model), "--input", text)
    assert_refused(code, err, "--input", _shown(text), "model")


def test_model_path_that_looks_like_yaml_is_that_folder(tmp_path):
    """Found by test_model_path_of_any_text: `--model 0123` was read as YAML (the integer 83), `--model yes`
    as true ("model.uri: expected a string"). A real process, in a folder holding an empty `0123/`."""
    for name in ("0123", "yes", "[a]"):
        (tmp_path / name).mkdir()
        code, err = job("predict", "--model", name, "A sentence.")
        assert code == 2 and f"model.uri {name}: not a usable Hugging Face model folder" in err, err
    result = run_job("predict", "--model", "0123", "A sentence.", env=job_env(JOB_CACHE_DIR=tmp_path / "c"),
                     cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "model.uri 0123: not a usable Hugging Face model folder" in result.stderr, result.stderr


def test_empty_config_path_is_refused(tmp_path):
    """Found by test_config_path_of_any_text: `--config ""` (an unset shell variable) was silently no file."""
    result = run_job("config", "--config", "", "--set", f"run_uri={tmp_path}", "--set", "data.uri=x.csv",
                     "--set", "model.uri=m", env=job_env(JOB_CACHE_DIR=tmp_path / "c"))
    assert result.returncode == 2 and "--config: the path is empty" in result.stderr, result.stderr


@pytest.mark.parametrize("argv", [("predict", "--model", "~0", "A sentence."),
                                  ("predict", "--model", ".", "--input", "~0/sentences.txt"),
                                  ("config", "--set", "run_uri=~0/run", "--set", "data.uri=x.csv",
                                   "--set", "model.uri=m")])
def test_home_of_a_user_that_does_not_exist_is_refused(argv):
    """Found by the thorough run of test_model_path_of_any_text and test_input_path_of_any_text: `~0` (no user
    named 0) was a RuntimeError from Path.expanduser, exit 1 with a traceback."""
    code, err = job(*argv)
    assert_refused(code, err, "starts with ~0, but there is no such user")
