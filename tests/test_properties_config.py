"""Property: any value of any YAML type for any config key is accepted or refused naming that key, and
what `job config` accepts works later: its printed YAML loads back to the same config, and `job plan`
on it runs without a traceback.

In-process (load_config is the code `job config` and `job plan` run, minus click); a few real `job`
processes check the exit code and that no traceback reaches the user. Seeded and bounded (tests/fuzz.py).
Each input a property found is a regression test at the end of this file.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from job.config import SECRET_KEYS, SECTIONS, Config, load_config, to_dict, to_yaml
from job.errors import ConfigError, JobError
from tests.fuzz import fuzz
from tests.helpers import SNLI_SAMPLE, job_env, run_job

KEYS = ["run_uri"] + [f"{s}.{f.name}" for s in (f.name for f in dataclasses.fields(Config) if f.name in SECTIONS)
                      for f in dataclasses.fields(getattr(Config(), s))]

# Words YAML 1.1 (PyYAML) reads as something else than text, and strings that look like other things.
YAML_WORDS = ["yes", "no", "on", "off", "y", "n", "true", "False", "null", "~", "NULL", "NaN", ".nan", ".inf",
              "-.inf", "0x1F", "0o17", "017", "1e-4", "1_000", "12:30:00", "2001-12-14", "<<", "=", "!!binary",
              "*alias", "&anchor", "|", ">", "- a", "a: b", "{", "[", "#", "%YAML", "@", "`", "auto", "all-linear",
              "s3://", "hf://", "gguf:", "s3://bucket", "hf://datasets/", "/", ".", "..", "\\"]
EDGE_INTS = [0, -1, 1, 2**31, 2**32, 2**63, 2**64, -(2**63), 10**30, -(10**30)]
EDGE_FLOATS = [0.0, -0.0, 1e-320, 1e308, -1e308, math.nan, math.inf, -math.inf, 0.5, 1.0]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from(EDGE_INTS),
    st.floats(), st.sampled_from(EDGE_FLOATS),
    st.text(max_size=30), st.sampled_from(YAML_WORDS),
    st.text(st.characters(codec="utf-8", max_codepoint=0x1F), max_size=8),  # control characters
    st.text(min_size=2000, max_size=5000).map(lambda s: s or "x"),  # very long
    st.dates(),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=8), scalars, max_size=3))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The required keys: a run folder that does not exist yet, the SNLI sample, a model that is never read."""
    folder = tmp_path_factory.mktemp("config-fuzz")
    tree = {"run_uri": str(folder / "run"), "data": {"uri": str(SNLI_SAMPLE)}, "model": {"uri": str(folder / "m")}}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # `job plan` makes its work folder under model.cache_dir: relative ones land here
        patch.setenv("JOB_CACHE_DIR", str(folder / "cache"))
        yield tree, folder


def tree_with(base_tree: dict, key: str, value) -> dict:
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in base_tree.items()}
    if "." in key:
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    else:
        tree[key] = value
    return tree


def outside_reach(cfg: Config) -> bool:
    """Settings under which `job plan` would reach a network (S3, the Hub), which CI has not, or make its
    work folder outside the test's folder (an absolute model.cache_dir)."""
    cache = cfg.model.cache_dir
    return (any(isinstance(u, str) and (u.startswith(("s3://", "hf://")) or "://" in u)
                for u in (cfg.run_uri, cfg.data.uri, cfg.model.uri))
            or bool(cache) and not str(cache).startswith(str(Path.cwd())) and
            (str(cache).startswith(("/", "~")) or ".." in str(cache)))


def check(path, key):
    """load_config accepts the file or names `key`; an accepted config round-trips through `job config`'s
    YAML and `job plan` runs on it."""
    try:
        cfg = load_config(str(path), (), environ={})
    except ConfigError as exc:
        assert key in str(exc), (key, str(exc))
        return None
    printed = to_yaml(cfg)
    path.write_text(printed, encoding="utf-8")
    again = load_config(str(path), (), environ={})  # what `job config` printed is a valid config
    assert to_dict(again, redact=False) == to_dict(cfg, redact=False) or key in SECRET_KEYS, (key, printed)
    if not outside_reach(cfg):
        from job.runner import pipeline_for

        try:
            pipeline_for(cfg).status()
        except JobError as exc:  # exit 2 or 3, a message: allowed, but it must say which key
            assert key in str(exc) or str(get_value(cfg, key)) in str(exc), (key, str(exc))
    return cfg


def get_value(cfg, key):
    from job.config import get_key

    return get_key(cfg, key)


@fuzz(400)
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_for_any_key_is_accepted_or_names_the_key(base, key, value):
    base_tree, folder = base
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree_with(base_tree, key, value), allow_unicode=True), encoding="utf-8")
    check(path, key)


@fuzz(150)
@given(key=st.sampled_from([k for k in KEYS if k not in SECRET_KEYS]), text=st.one_of(
    st.sampled_from(YAML_WORDS), st.text(max_size=40), st.from_regex(r"\[[a-z0-9, ]{0,12}\]", fullmatch=True)))
def test_any_set_text_for_any_key_is_accepted_or_names_the_key(base, key, text):
    base_tree, folder = base
    sets = (f"run_uri={base_tree['run_uri']}", f"data.uri={base_tree['data']['uri']}",
            f"model.uri={base_tree['model']['uri']}", f"{key}={text}")
    try:
        cfg = load_config(None, sets, environ={})
    except ConfigError as exc:
        assert key in str(exc) or "--set" in str(exc), (key, str(exc))
        return
    assert to_yaml(cfg)


@pytest.mark.parametrize("key, value", [("train.lora_r", "x"), ("train.micro_batch_size", [1]),
                                        ("merge.tolerance", ".nan"), ("train.report_to", {"a": 1})])
def test_real_process_exits_2_naming_the_key(tmp_path, key, value):
    """The same through real `job config` and `job plan` processes: exit 2, the key, no traceback."""
    path = tmp_path / "c.yaml"
    base_tree = {"run_uri": str(tmp_path / "run"), "data": {"uri": str(SNLI_SAMPLE)}, "model": {"uri": "/m"}}
    path.write_text(yaml.safe_dump(tree_with(base_tree, key, value)) if value != ".nan" else
                    yaml.safe_dump(base_tree) + "merge:\n  tolerance: .nan\n")
    for command in ("config", "plan"):
        result = run_job(command, "--config", path, env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
        assert result.returncode == 2, result.stderr
        assert key in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("key, value, expected", [
    ("model.cache_dir", "a" * 300, "has a name longer than 255 bytes"),
    ("model.cache_dir", "cache\x00dir", "contains a NUL character"),
    ("run_uri", "/tmp/run\x00x", "contains a NUL character"),
    ("data.uri", "~0/data.csv", "starts with ~0, but there is no such user"),
])
def test_path_no_file_system_can_take_is_refused_naming_the_key(base, key, value, expected):
    """Found by the thorough run of test_any_value_for_any_key...: `job plan` failed with a ValueError (NUL) or
    an OSError (name too long) making its work folder, exit 1."""
    base_tree, folder = base
    path = folder / "paths.yaml"
    path.write_text(yaml.safe_dump(tree_with(base_tree, key, value)), encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(str(path), (), environ={})
    assert f"{key}: " in str(refused.value) and expected in str(refused.value)


def test_work_folder_that_cannot_be_made_exits_2(tmp_path):
    (tmp_path / "file").write_text("in the way")
    result = run_job("plan", "--set", f"run_uri={tmp_path / 'run'}", "--set", f"data.uri={SNLI_SAMPLE}",
                     "--set", "model.uri=m", "--set", f"model.cache_dir={tmp_path / 'file'}",
                     env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 2 and "cannot create the work folder" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
