"""Property: damage one of the job's own files in a finished run (format + train of the tiny model, the
shared `trained_run`, copied per example) and the job refuses cleanly or is unaffected: `job plan` and
`job run` exit 0, or 2 (3 for the store) naming the file and the `--force` that makes it again, with no
traceback; a refusal writes nothing (the tree is compared before and after).

Damage: a valid JSON object with a key of the wrong type or a key missing, the file cut short, a folder
where the file belongs, or a file where its folder belongs. The CLI runs in-process (`job.cli._main`,
the code `python -m job` runs, with its exit code and its log on stderr) for speed; the readers that a
finished run does not reach (LATEST, trackers.json, the lease, stats.json, adapter_config.json) are
driven through the functions that read them. Seeded and bounded (tests/fuzz.py); every input found is a
regression test in tests/test_run_file_schemas.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from job.errors import InputError, JobError
from tests.fuzz import fuzz
from tests.test_merge import trained_run  # noqa: F401 - a fixture
from tests.test_run_state import listing

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
              st.sampled_from(["", "checkpoint-x", "../../etc", "format", "LORA", "nan", "1", "true"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)

DAMAGES = ("wrong type", "missing key", "truncated", "folder in place", "not an object", "nested wrong type")


@st.composite
def damage(draw, text: str):
    """(kind, new content or None for 'folder in place') for a JSON file whose current text is `text`."""
    kind = draw(st.sampled_from(DAMAGES))
    value = json.loads(text)
    if kind == "truncated":
        return kind, text[:draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "folder in place":
        return kind, None
    if kind == "not an object":
        return kind, json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    key = draw(st.sampled_from(sorted(value)))
    if kind == "missing key":
        del value[key]
    elif kind == "nested wrong type" and isinstance(value[key], dict) and value[key]:
        value[key][draw(st.sampled_from(sorted(value[key])))] = draw(json_values)
    else:
        value[key] = draw(json_values)
    return kind, json.dumps(value)


def apply(path: Path, content) -> None:
    if content is None:  # a folder where the file belongs
        path.unlink(missing_ok=True)
        path.mkdir()
        (path / "x").write_text("{}")
    else:
        path.write_text(content, encoding="utf-8")


@contextlib.contextmanager
def environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def job(*argv) -> tuple[int, str]:
    """`job ARGV` in this process: (exit code, what it logged on stderr)."""
    from job.cli import _main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = _main([str(a) for a in argv])
    logging.getLogger().handlers[:] = []  # the handler held the redirected stream
    return code, err.getvalue()


def assert_clean(code: int, err: str, names: str, before: dict, after: dict, force=True) -> None:
    """Exit 0, or 2/3 naming `names` (the damaged file or its stage) and a --force; no traceback."""
    assert code in (0, 2, 3), err
    assert "Traceback" not in err and "unexpected error" not in err, err
    if code != 0:
        assert names in err, (names, err)
        if force:
            assert "--force" in err, err
        assert after == before, "a refusal changed the run"


@pytest.fixture(scope="module")
def finished(trained_run, tmp_path_factory):  # noqa: F811
    """A folder for the copies, and the `--set` arguments that make format and train done."""
    base = tmp_path_factory.mktemp("runfile-fuzz")
    args = trained_run.args(str(base / "run"), stages="format,train")
    with environment(JOB_CACHE_DIR=base / "cache"):
        yield trained_run, base, args[3:]


def fresh_copy(trained_run, base: Path) -> Path:  # noqa: F811
    run = base / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(trained_run.run_dir, run)
    return run


MARKERS = ("_stages/format.json", "_stages/format.started.json", "_stages/train.json", "_stages/train.started.json")


@fuzz(25)
@given(data=st.data(), rel=st.sampled_from(MARKERS))
def test_damaged_marker_through_plan_and_run(finished, data, rel):
    trained_run, base, sets = finished  # noqa: F811
    run = fresh_copy(trained_run, base)
    path = run / rel
    kind, content = data.draw(damage(path.read_text()), label="damage")
    apply(path, content)
    stage = rel.split("/")[1].split(".")[0]
    before = listing(str(run), None)
    code, err = job("plan", *sets)
    assert_clean(code, err, rel if code != 0 and "damaged" in err else f"stage {stage}", before, before)
    code, err = job("run", "--stages", "format,train", *sets)
    after = listing(str(run), None)
    assert_clean(code, err, rel if "damaged" in err else f"stage {stage}", before, after)


@fuzz(6)
@given(folder=st.sampled_from(["_stages", "adapter", "data"]))
def test_file_where_a_folder_belongs(finished, folder):
    trained_run, base, sets = finished  # noqa: F811
    run = fresh_copy(trained_run, base)
    shutil.rmtree(run / folder)
    (run / folder).write_text("not a folder")
    before = listing(str(run), None)
    for argv in (("plan", *sets), ("run", "--stages", "format,train", *sets), ("run", "--stages", "merge", *sets)):
        code, err = job(*argv)
        assert_clean(code, err, folder, before, listing(str(run), None), force=folder != "_stages")


# -- the readers a finished run does not reach through the CLI -------------------------------------------


def _store(run: Path):
    from job.storage import LocalStore

    return LocalStore(run)


def _valid_latest() -> str:
    return json.dumps({"checkpoint": "checkpoint-12", "step": 12, "fingerprint": "f" * 16,
                       "files": ["adapter_model.safetensors", "trainer_state.json"],
                       "settings": {"packing": True, "packing_length": 512, "micro_batch_size": 4,
                                    "gradient_checkpointing": False},
                       "processes": 1, "uploaded_at": "2026-12-06T00:00:00Z"})


@fuzz(40)
@given(data=st.data())
def test_damaged_latest_resumes_or_names_force_train(finished, data, tmp_path_factory):
    from job.stages.checkpoints import _download_resume_point

    trained_run, base, _ = finished  # noqa: F811
    run = base / "latest-run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoints").mkdir(parents=True)
    kind, content = data.draw(damage(_valid_latest()), label="damage")
    apply(run / "checkpoints" / "LATEST", content)
    try:
        point = _download_resume_point(_store(run), "f" * 16, base / "resume", logging.getLogger("test"))
    except InputError as exc:
        assert "LATEST" in str(exc) and "--force train" in str(exc), str(exc)
        return
    assert point is None  # a LATEST made with other settings: training starts over


@fuzz(30)
@given(data=st.data())
def test_damaged_trackers_json_only_warns(finished, data, caplog):
    from job.trackers import _stored

    _, base, _ = finished
    run = base / "trackers-run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoints").mkdir(parents=True)
    kind, content = data.draw(damage(json.dumps({"mlflow_run_id": "abc123"})), label="damage")
    apply(run / "checkpoints" / "trackers.json", content)
    state = _stored(_store(run), logging.getLogger("test"))
    assert state.get("mlflow_run_id") is None or isinstance(state["mlflow_run_id"], str)


@fuzz(40)
@given(data=st.data())
def test_damaged_lease_is_an_unknown_holder_that_expires(data):
    from job.lease import Seen

    body = {"token": "t" * 16, "host": "h", "pid": 123, "platform": "local", "acquired_at": "x",
            "expires_at": "x", "expiry_seconds": 120, "boot_id": "b", "pid_ns": "1", "process_start": "5"}
    kind, content = data.draw(damage(json.dumps(body)), label="damage")
    seen = Seen((content or "").encode(), "v", 10.0, time.time(), 120.0)
    assert 0 < seen.expiry <= 30 * 86400
    assert isinstance(seen.holder, str) and seen.expires()
    assert seen.token is None or isinstance(seen.token, str)


@fuzz(30)
@given(data=st.data())
def test_damaged_stats_or_adapter_config(finished, data):
    """data/stats.json (the report reads it) and adapter/adapter_config.json (merge and evaluate hand it to
    peft): refused naming the file and --force, or loadable by what reads it next."""
    from job.run_files import DataStats, check_adapter, read_run_json

    trained_run, base, _ = finished  # noqa: F811
    run = fresh_copy(trained_run, base)
    rel = data.draw(st.sampled_from(["data/stats.json", "adapter/adapter_config.json"]))
    kind, content = data.draw(damage((run / rel).read_text()), label="damage")
    apply(run / rel, content)
    try:
        if rel == "data/stats.json":
            stats = read_run_json(_store(run), rel, "format", DataStats)
            from job.report import _cell, _fmt

            _fmt(stats.get("rows_read")), _cell(stats.get("dropped"))
        else:
            check_adapter(run / "adapter", str(run / "adapter"))
            from peft import PeftConfig

            PeftConfig.from_pretrained(str(run / "adapter"))
    except JobError as exc:
        assert "--force" in str(exc) and rel.split("/")[-1] in str(exc), str(exc)
