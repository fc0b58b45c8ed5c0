"""The job's own files read back through their schemas (job/run_files.py), and the causes issue 22 found:
real `job` processes on a copy of the shared finished format + train run. Each damage exits 2 naming
the file and the `--force` that makes it again, with the run left exactly as it was.

Also the inputs the properties in tests/test_properties_runfiles.py found, each as an ordinary test.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from job.errors import InputError
from tests.test_bad_inputs import assert_clean_failure
from tests.test_merge import trained_run  # noqa: F401 - a fixture
from tests.test_run_state import listing


@pytest.fixture
def run(trained_run, tmp_path):  # noqa: F811
    """(run folder, `--set` arguments, env): a copy of the finished format + train run."""
    from tests.helpers import job_env

    folder = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, folder)
    sets = trained_run.args(str(folder))[3:]
    return folder, sets, job_env(JOB_CACHE_DIR=tmp_path / "cache")


def edit_json(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("marker, changes, force", [
    ("train.json", {"config": []}, "train"),
    ("train.json", {"upstream": "format"}, "train"),
    ("format.json", {"inputs": ["data.uri"]}, "format"),
    ("train.json", {"metrics": "oops"}, "train"),
    ("train.json", {"metrics": {"loss_curve": [{"step": "one", "loss": 1.0}]}}, "train"),
    ("format.started.json", {"fingerprint": 7}, "format"),
])
def test_marker_with_wrong_types_exits_2_naming_it(run, marker, changes, force):
    """Was an AttributeError (exit 1, a traceback) in `job plan` and `job run`."""
    from tests.helpers import run_job

    folder, sets, env = run
    edit_json(folder / "_stages" / marker, **changes)
    before = listing(str(folder), None)
    for command in (["plan"], ["run", "--stages", "format,train"]):
        result = run_job(*command, *sets, env=env)
        assert_clean_failure(result, 2, str(folder / "_stages" / marker), f"--force {force}",
                             next(iter(changes)))
    assert listing(str(folder), None) == before


def test_adapter_config_with_a_wrong_type_exits_2_at_merge(run):
    """"r": "x" was a TypeError inside peft during the merge."""
    from tests.helpers import run_job

    folder, sets, env = run
    edit_json(folder / "adapter" / "adapter_config.json", r="x")
    before = listing(str(folder), None)
    result = run_job("run", "--stages", "merge", *sets, env=env)
    assert_clean_failure(result, 2, f"{folder}/adapter is damaged", "adapter_config.json", "r: must be an integer",
                         "--force train")
    assert listing(str(folder), None) == before


@pytest.mark.parametrize("force, sets_, key", [
    ("export", [], "export.enabled"),                          # export is off by default
    ("merge", ["merge.enabled=false"], "merge.enabled"),
])
def test_force_on_a_disabled_stage_is_refused_and_deletes_nothing(run, force, sets_, key):
    """Was: export/ (and merged/) deleted, nothing rebuilt, exit 0."""
    from tests.helpers import run_job

    folder, sets, env = run
    for name in ("merged", "export"):  # the results of an earlier run with merge and export enabled
        (folder / name).mkdir()
        (folder / name / "keep.bin").write_bytes(b"results")
        (folder / "_stages" / f"{name.replace('merged', 'merge')}.json").write_text(json.dumps({"fingerprint": "x"}))
    before = listing(str(folder), None)
    result = run_job("run", "--force", force, *sets, *[a for kv in sets_ for a in ("--set", kv)], env=env)
    assert_clean_failure(result, 2, f"--force {force}", "disabled", f"{key}=true", "Nothing was changed")
    assert listing(str(folder), None) == before


def test_missing_merged_folder_of_a_done_merge_names_force_merge(run, tmp_path):
    """merged/ deleted behind the job's back while the merge marker says done: export said 'check the path'."""
    from job.config import load_config
    from job.runner import pipeline_for
    from tests.helpers import run_job

    folder, sets, env = run
    assignments = tuple(kv for kv in sets if kv != "--set") + ("export.enabled=true",)
    statuses = {s.stage: s for s in pipeline_for(load_config(None, assignments, environ={})).status()}
    (folder / "_stages" / "merge.json").write_text(json.dumps(
        {"stage": "merge", "fingerprint": statuses["merge"].fingerprint, "upstream": {}, "config": {}}))
    before = listing(str(folder), None)
    result = run_job("export", *sets, env=env)
    assert_clean_failure(result, 2, f"{folder}/merged is damaged (the folder is missing", "--force merge")
    assert "check the path" not in result.stderr
    assert listing(str(folder), None) == before


@pytest.mark.parametrize("content, expected", [
    ('{"checkpoint": "../../elsewhere"}', "checkpoint: string should match pattern"),
    ('{"checkpoint": "checkpoint-2", "settings": {"micro_batch_size": 0}}', "settings.micro_batch_size"),
    ('{"checkpoint": "checkpoint-2", "processes": "2"}', "processes: must be an integer"),
    ('{"checkpoint": "checkp', "Unterminated string"),
])
def test_damaged_latest_names_it_and_force_train(tmp_path, content, expected):
    from job.stages.checkpoints import _download_resume_point
    from job.storage import LocalStore

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "LATEST").write_text(content)
    with pytest.raises(InputError) as refused:
        _download_resume_point(LocalStore(tmp_path / "run"), "f" * 16, tmp_path / "resume", logging.getLogger("t"))
    assert expected in str(refused.value) and "LATEST" in str(refused.value) and "--force train" in str(refused.value)


def test_lease_that_claims_to_last_for_ever_expires_like_any_other():
    """A damaged expiry_seconds (1e300) used to make a dead holder's lease block the run for ever."""
    from job.lease import Seen

    seen = Seen(json.dumps({"host": "h", "expiry_seconds": 1e300}).encode(), "v", 200.0, 0.0, 120.0)
    assert seen.expiry == 120.0 and seen.stale


def test_damaged_trackers_json_warns_and_training_goes_on(tmp_path, caplog):
    from job.storage import LocalStore
    from job.trackers import _stored

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "trackers.json").write_text('{"mlflow_run_id": 12}')
    with caplog.at_level(logging.WARNING):
        assert _stored(LocalStore(tmp_path), logging.getLogger("job.train")) == {}
    assert "trackers.json" in caplog.text and "mlflow_run_id: must be a string" in caplog.text


def test_folder_where_a_marker_belongs_exits_2_and_force_repairs(run):
    from tests.helpers import run_job

    folder, sets, env = run
    marker = folder / "_stages" / "format.json"
    marker.unlink()
    marker.mkdir()
    before = listing(str(folder), None)
    result = run_job("plan", *sets, env=env)
    assert_clean_failure(result, 2, str(marker), "a folder where the file belongs", "--force format")
    assert listing(str(folder), None) == before
    repaired = run_job("run", "--stages", "format", "--force", "format", *sets, env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert marker.is_file() and json.loads(marker.read_text())["stage"] == "format"


def test_file_where_the_markers_folder_belongs_exits_2(run):
    from tests.helpers import run_job

    folder, sets, env = run
    shutil.rmtree(folder / "_stages")
    (folder / "_stages").write_text("oops")
    before = listing(str(folder), None)
    for command in (["plan"], ["run", "--stages", "format,train"]):
        assert_clean_failure(run_job(*command, *sets, env=env), 2, f"{folder}/_stages is a file")
    assert listing(str(folder), None) == before


def test_marker_nested_deeper_than_the_parser_goes_is_damage(tmp_path):
    """json.loads raises RecursionError (not a ValueError) on '[[[[...': it was exit 1."""
    from job.run_files import StageMarker, read_run_json
    from job.storage import LocalStore

    (tmp_path / "_stages").mkdir()
    (tmp_path / "_stages" / "format.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match="nested too deeply.*--force format"):
        read_run_json(LocalStore(tmp_path), "_stages/format.json", "format", StageMarker)
