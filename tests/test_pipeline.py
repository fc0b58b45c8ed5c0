"""Pipeline skip / stale / force with fake stages, once on a folder and once on moto's S3 server."""

import time

import pytest

from job.config import StorageConfig, load_config
from job.errors import ConfigError, InputError, StaleStageError
from job.pipeline import Pipeline, Stage
from job.storage import open_store


def make_pipeline(root, endpoint, tmp_path, calls, *sets, fail_in=None, reject_input_in=None):
    cfg = load_config(None, ("run_uri=" + root, "data.uri=/d.csv", "model.uri=/m", *sets), environ={})

    def stage(name, output):
        def run(cfg, ctx):
            calls.append(name)
            if name == reject_input_in:  # its input check fails before it writes anything
                raise InputError(f"{name}: bad input")
            if name == fail_in:
                ctx.store.write_text(f"{output}/partial.txt", "half")
                raise RuntimeError("boom")
            ctx.store.write_text(f"{output}/result.txt", f"{name} from {sorted(ctx.upstream)}")
            return {"n": len(calls)}
        return run

    stages = [Stage("format", stage("format", "data"), ("data", "prompt"), outputs=("data",)),
              Stage("train", stage("train", "adapter"), ("model", "train"), needs=("format",),
                    outputs=("adapter",)),
              Stage("merge", stage("merge", "merged"), ("merge",), needs=("train",), outputs=("merged",),
                    enabled=lambda c: c.merge.enabled, disabled_reason="merge.enabled: false")]
    return Pipeline(stages, cfg, open_store(root, StorageConfig(endpoint_url=endpoint)), tmp_path / "work")


def states(pipeline):
    return {s.stage: s.state for s in pipeline.status()}


def test_skip_stale_force(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    p = make_pipeline(root, endpoint, tmp_path, calls)
    assert states(p) == {"format": "pending", "train": "pending", "merge": "pending"}
    p.run()
    assert calls == ["format", "train", "merge"]
    assert states(p) == {"format": "done", "train": "done", "merge": "done"}
    assert p.store.read_text("merged/result.txt") == "merge from ['train']"
    marker = p.marker("train")
    assert marker["metrics"] == {"n": 2} and marker["upstream"]["format"] == p.marker("format")["fingerprint"]

    calls.clear()
    make_pipeline(root, endpoint, tmp_path, calls).run()
    assert calls == []  # everything done: skipped

    # Changing a train key makes train and everything after it stale, format stays done.
    p2 = make_pipeline(root, endpoint, tmp_path, calls, "train.lora_r=8")
    status = {s.stage: s for s in p2.status()}
    assert status["format"].state == "done"
    assert status["train"].state == "stale" and "train.lora_r: 64 -> 8" in status["train"].reason
    assert status["merge"].state == "stale" and "stage train changed" in status["merge"].reason
    with pytest.raises(StaleStageError, match=r"train.lora_r: 64 -> 8.*--force train"):
        p2.run()
    assert calls == []
    p2.run(force="train")
    assert calls == ["train", "merge"]
    assert states(p2) == {"format": "done", "train": "done", "merge": "done"}


def test_force_invalidates_later_stages_even_when_not_selected(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    make_pipeline(root, endpoint, tmp_path, calls).run()
    calls.clear()
    p = make_pipeline(root, endpoint, tmp_path, calls)
    p.run(["format"], force="format")
    assert calls == ["format"]
    assert states(p) == {"format": "done", "train": "pending", "merge": "pending"}
    assert not p.store.exists("adapter/result.txt")


def test_failed_stage_writes_no_marker_and_partial_results_are_guarded(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    with pytest.raises(RuntimeError):
        make_pipeline(root, endpoint, tmp_path, calls, fail_in="train").run()
    p = make_pipeline(root, endpoint, tmp_path, calls)
    assert p.marker("train") is None and p.marker("format") is not None
    status = {s.stage: s for s in p.status()}
    assert status["train"].state == "pending" and "partial results" in status["train"].reason
    # The partial results were made with lora_r=64: a rerun with other settings must not reuse them.
    p_other = make_pipeline(root, endpoint, tmp_path, calls, "train.lora_r=4")
    with pytest.raises(StaleStageError, match="partial results were made with other settings"):
        p_other.run()
    p_other.run(force="train")
    assert not p_other.store.exists("adapter/partial.txt")
    assert p_other.store.exists("adapter/result.txt")


def test_disabled_stage_and_missing_upstream(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    p = make_pipeline(root, endpoint, tmp_path, calls, "merge.enabled=false")
    assert states(p)["merge"] == "disabled"
    with pytest.raises(ConfigError, match="stage train needs the results of format"):
        p.run(["train"])
    p.run()
    assert calls == ["format", "train"]


def run_listing(p):
    return {name: p.store.read_bytes(name) for name in p.store.list()}


def test_forced_stage_whose_input_is_bad_deletes_nothing(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    make_pipeline(root, endpoint, tmp_path, calls).run()
    before = run_listing(make_pipeline(root, endpoint, tmp_path, calls))
    p = make_pipeline(root, endpoint, tmp_path, calls, reject_input_in="format")
    with pytest.raises(InputError):
        p.run(force="format")
    assert run_listing(p) == before
    assert states(make_pipeline(root, endpoint, tmp_path, calls)) == {"format": "done", "train": "done",
                                                                       "merge": "done"}


def test_force_clears_only_at_the_first_write_and_later_markers_go_first(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    make_pipeline(root, endpoint, tmp_path, calls).run()
    # train fails after writing: format is kept, train's and merge's old results are gone (not claimed).
    p = make_pipeline(root, endpoint, tmp_path, calls, fail_in="train")
    with pytest.raises(RuntimeError):
        p.run(force="train")
    assert p.marker("format") is not None and p.marker("train") is None and p.marker("merge") is None
    assert not p.store.exists("merged/result.txt") and not p.store.exists("adapter/result.txt")
    assert p.store.exists("adapter/partial.txt")


def test_failed_before_writing_leaves_no_started_marker(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    with pytest.raises(InputError):
        make_pipeline(root, endpoint, tmp_path, calls, reject_input_in="train").run()
    p = make_pipeline(root, endpoint, tmp_path, calls, "train.lora_r=4")  # the corrected settings
    assert p.marker("train", started=True) is None
    p.run()  # not refused as "partial results were made with other settings"
    assert states(p) == {"format": "done", "train": "done", "merge": "done"}


def test_stale_stage_is_refused_before_anything_runs_or_is_written(store_root, tmp_path):
    root, endpoint = store_root
    calls = []
    make_pipeline(root, endpoint, tmp_path, calls, "merge.enabled=false").run()
    calls.clear()
    p = make_pipeline(root, endpoint, tmp_path, calls, "train.lora_r=8")  # merge now pending, train stale
    before = run_listing(p)
    with pytest.raises(StaleStageError, match="--force train"):
        p.run()
    assert calls == [] and run_listing(p) == before


def test_force_of_a_stage_not_selected_is_refused(store_root, tmp_path):
    root, endpoint = store_root
    p = make_pipeline(root, endpoint, tmp_path, [])
    with pytest.raises(ConfigError, match="--force train: stage train is not among the stages to run"):
        p.run(["format"], force="train")


def test_phase_timers_are_recorded_in_the_marker(tmp_path):
    cfg = load_config(None, (f"run_uri={tmp_path / 'run'}", "data.uri=/d.csv", "model.uri=/m"), environ={})

    def run(cfg, ctx):
        with ctx.timer("load"):
            time.sleep(0.05)
        for _ in range(2):  # a phase that runs twice adds up
            with ctx.timer("step"):
                time.sleep(0.02)
        return {"load_seconds": ctx.seconds("load"), "stage_seconds": ctx.elapsed()}

    p = Pipeline([Stage("format", run, ("data",), outputs=("data",))], cfg, open_store(str(tmp_path / "run")),
                 tmp_path / "work")
    marker = p.run()["format"]
    assert set(marker["phase_seconds"]) == {"load", "step"}
    assert marker["phase_seconds"]["load"] >= 0.05 and marker["phase_seconds"]["step"] >= 0.04
    assert marker["metrics"]["load_seconds"] == round(marker["phase_seconds"]["load"], 2)
    assert marker["metrics"]["stage_seconds"] >= 0.09
    assert p.marker("format")["phase_seconds"] == marker["phase_seconds"]  # as written to the run
