"""What a run folder holds after a refusal or a failure: nothing deleted or rewritten before the new input
is known good, a changed input makes its stage stale, a damaged file the job reads back is named with the
way out, and a failed first attempt does not block the corrected rerun. Real `job` processes; format-only
runs where training is not the point, one shared finished `format,train` run where it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import SNLI_SAMPLE, job_env, put_file, run_job, s3_client
from tests.test_bad_inputs import TRAIN_SETS, assert_clean_failure


def sets(*pairs):
    return [a for kv in pairs for a in ("--set", kv)]


def format_cmd(run_uri, data_uri, *extra, command="format", force=None):
    return [command, *sets(f"run_uri={run_uri}", f"data.uri={data_uri}", "model.uri=/nonexistent-model",
                           "data.eval_size=20", *extra), *(["--force", force] if force else [])]


def listing(root: str, endpoint) -> dict[str, bytes]:
    """Every file under the run (the lease file excluded: it is the job's, not a result), with its bytes."""
    if root.startswith("s3://"):
        bucket, _, prefix = root[5:].partition("/")
        client = s3_client(endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        files = {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    else:
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}
    return {k: v for k, v in files.items() if not k.startswith("_lease")}


def replace_input(data_uri: str, endpoint, local: Path) -> None:
    if data_uri.startswith("s3://"):
        bucket, _, key = data_uri[5:].partition("/")
        s3_client(endpoint).upload_file(str(local), bucket, key)
    else:
        shutil.copyfile(local, data_uri)


@pytest.fixture
def formatted(store_root, tmp_path):
    """(root, endpoint, data_uri, env): a run whose format stage is done, on each backend."""
    root, endpoint = store_root
    data_uri = put_file(root, endpoint, SNLI_SAMPLE, "snli.csv")
    env = job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache")
    result = run_job(*format_cmd(root, data_uri), env=env)
    assert result.returncode == 0, result.stderr
    return root, endpoint, data_uri, env


def test_changed_csv_at_the_same_uri_makes_format_stale(formatted, tmp_path):
    root, endpoint, data_uri, env = formatted
    changed = tmp_path / "changed.csv"
    lines = SNLI_SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    changed.write_text("".join(lines[:-5]), encoding="utf-8")  # a few rows fewer
    replace_input(data_uri, endpoint, changed)
    before = listing(root, endpoint)

    plan = run_job(*format_cmd(root, data_uri, command="plan"), env=env)
    assert plan.returncode == 0, plan.stderr
    assert "data.uri content changed" in plan.stdout + plan.stderr
    refused = run_job(*format_cmd(root, data_uri), env=env)
    assert_clean_failure(refused, 2, "data.uri content changed", "--force format")
    assert listing(root, endpoint) == before  # config.yaml included: a refusal rewrites nothing

    forced = run_job(*format_cmd(root, data_uri, force="format"), env=env)
    assert forced.returncode == 0, forced.stderr
    again = run_job(*format_cmd(root, data_uri), env=env)
    assert again.returncode == 0 and "done already" in again.stderr


def test_same_content_copied_again_stays_done(tmp_path):
    csv = tmp_path / "snli.csv"
    shutil.copyfile(SNLI_SAMPLE, csv)
    root, env = str(tmp_path / "run"), job_env(JOB_CACHE_DIR=tmp_path / "cache")
    assert run_job(*format_cmd(root, csv), env=env).returncode == 0
    csv.unlink()
    shutil.copyfile(SNLI_SAMPLE, csv)  # a new file (new mtime) with the same bytes
    again = run_job(*format_cmd(root, csv), env=env)
    assert again.returncode == 0 and "done already" in again.stderr
    csv.unlink()  # a finished stage does not need its input any more
    plan = run_job(*format_cmd(root, csv, command="plan"), env=env)
    assert plan.returncode == 0 and "stale" not in plan.stdout, plan.stdout


def test_same_bytes_uploaded_again_to_a_versioned_bucket_stay_done(s3_bucket, tmp_path):
    """A versioned bucket gives every upload a new VersionId, even of the same bytes: ETag and size are the
    identity, so uploading the CSV again does not make format stale ("content changed")."""
    endpoint, bucket = s3_bucket
    s3 = s3_client(endpoint)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    data_uri = f"s3://{bucket}/data/snli.csv"
    root, env = f"s3://{bucket}/run", job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache")
    s3.upload_file(str(SNLI_SAMPLE), bucket, "data/snli.csv")
    assert run_job(*format_cmd(root, data_uri), env=env).returncode == 0
    s3.upload_file(str(SNLI_SAMPLE), bucket, "data/snli.csv")  # same bytes, a new version
    assert len(s3.list_object_versions(Bucket=bucket, Prefix="data/snli.csv")["Versions"]) == 2
    plan = run_job(*format_cmd(root, data_uri, command="plan"), env=env)
    assert plan.returncode == 0 and plan.stdout.startswith("format    done"), plan.stdout


def test_refused_run_leaves_config_yaml_alone(formatted):
    root, endpoint, data_uri, env = formatted
    before = listing(root, endpoint)
    refused = run_job(*format_cmd(root, data_uri, "data.seed=7"), env=env)
    assert_clean_failure(refused, 2, "data.seed: 42 -> 7", "--force format")
    assert listing(root, endpoint) == before


def test_forced_format_with_a_mistyped_uri_keeps_the_run(formatted):
    root, endpoint, data_uri, env = formatted
    before = listing(root, endpoint)
    typo = data_uri.replace("snli.csv", "snlii.csv")
    result = run_job(*format_cmd(root, typo, force="format"), env=env)
    assert_clean_failure(result, 2, typo)
    assert listing(root, endpoint) == before


def test_failed_first_attempt_does_not_block_the_corrected_rerun(store_root, tmp_path):
    root, endpoint = store_root
    bad = tmp_path / "bad.csv"
    bad.write_text("gold_label,sentence1\ncontradiction,a\n", encoding="utf-8")  # no sentence2 column
    env = job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache")
    bad_uri = put_file(root, endpoint, bad, "bad.csv")
    assert_clean_failure(run_job(*format_cmd(root, bad_uri), env=env), 2, "sentence2")
    assert listing(root, endpoint) == {}  # nothing written: no config.yaml, no .started marker
    good_uri = put_file(root, endpoint, SNLI_SAMPLE, "snli.csv")
    result = run_job(*format_cmd(root, good_uri), env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("damage", ["garbage", "empty", "a list"])
def test_damaged_marker_exits_2_naming_it(tmp_path, damage):
    csv = tmp_path / "snli.csv"
    shutil.copyfile(SNLI_SAMPLE, csv)
    root, env = tmp_path / "run", job_env(JOB_CACHE_DIR=tmp_path / "cache")
    assert run_job(*format_cmd(root, csv), env=env).returncode == 0
    marker = root / "_stages" / "format.json"
    marker.write_bytes({"garbage": b"{\"stage\": \"form\xff", "empty": b"", "a list": b"[1, 2]"}[damage])
    before = listing(str(root), None)
    for command in ("plan", "format"):
        result = run_job(*format_cmd(root, csv, command=command), env=env)
        assert_clean_failure(result, 2, str(marker), "--force format")
    assert listing(str(root), None) == before
    fixed = run_job(*format_cmd(root, csv, force="format"), env=env)
    assert fixed.returncode == 0, fixed.stderr


def test_run_uri_that_is_a_file_exits_2(tmp_path):
    run_file = tmp_path / "run"
    run_file.write_text("not a folder")
    result = run_job(*format_cmd(run_file, SNLI_SAMPLE), env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert_clean_failure(result, 2, f"run_uri {run_file} is a file, not a folder")
    assert run_file.read_text() == "not a folder"


# -- a finished train run to protect ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A finished format,train run (2 steps) on a folder, made once; tests get their own copy."""
    base = tmp_path_factory.mktemp("trained")
    csv = base / "snli.csv"
    shutil.copyfile(SNLI_SAMPLE, csv)
    sets_ = [s for s in TRAIN_SETS if not s.startswith("train.max_steps")] + ["train.max_steps=2"]
    args = ["run", "--stages", "format,train",
            *sets(f"run_uri={base / 'run'}", f"data.uri={csv}", f"model.uri={tiny_model_dir}", *sets_)]
    env = job_env(JOB_CACHE_DIR=base / "cache")
    result = run_job(*args, env=env)
    assert result.returncode == 0, result.stderr
    return base, args, env


@pytest.fixture
def trained(trained_run, tmp_path):
    base, args, env = trained_run
    shutil.copytree(base / "run", tmp_path / "run")
    return tmp_path / "run", [a.replace(str(base / "run"), str(tmp_path / "run")) for a in args], env


def test_markers_record_the_memory_plan_next_to_the_measured_peaks(trained_run):
    base, _args, _env = trained_run
    for stage in ("format", "train"):
        memory = json.loads((base / "run" / "_stages" / f"{stage}.json").read_text())["memory"]
        plan, measured = memory["plan"], memory["measured"]
        assert plan["stage"] == stage and plan["device"] == "cpu" and not plan["problem"]
        assert plan["host_gb"] > 0 and plan["gpu_gb"] == 0
        assert 0.05 < measured["host_peak_gb"] <= measured["host_peak_rss_gb"] < 24  # anonymous within all of RSS
        assert measured["gpu_peak_gb"] is None  # no GPU here
        assert measured["host_peak_scope"] in ("stage", "process")
    train = json.loads((base / "run" / "_stages" / "train.json").read_text())["memory"]
    assert train["plan"]["how"] == "16-bit base on the CPU"  # TRAIN_SETS: train.load_in_4bit=false


def test_force_format_with_a_mistyped_data_uri_deletes_nothing(trained):
    run, args, env = trained
    before = listing(str(run), None)
    assert {"_stages/format.json", "_stages/train.json", "adapter/adapter_config.json",
            "checkpoints/LATEST"} <= set(before)
    typo = [a.replace("snli.csv", "snlii.csv") for a in args]
    result = run_job(*typo, "--force", "format", env=env)
    assert_clean_failure(result, 2, "snlii.csv")
    assert listing(str(run), None) == before


def test_force_train_with_an_empty_model_folder_deletes_nothing(trained, tmp_path):
    run, args, env = trained
    before = listing(str(run), None)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    model_at = args.index(next(a for a in args if a.startswith("model.uri=")))
    broken = args[:model_at] + [f"model.uri={empty}"] + args[model_at + 1:]
    result = run_job(*broken, "--force", "train", env=env)
    assert_clean_failure(result, 2, str(empty))
    assert listing(str(run), None) == before


def test_trailing_slash_on_model_uri_keeps_train_done(trained):
    run, args, env = trained
    slashed = [a + "/" if a.startswith("model.uri=") else a for a in args]
    plan = run_job("plan", *slashed[3:], env=env)
    assert plan.returncode == 0, plan.stderr
    lines = {line.split()[0]: line for line in plan.stdout.splitlines() if line.strip()}
    assert "done" in lines["train"] and "done" in lines["format"], plan.stdout


def test_damaged_train_data_exits_2_naming_it(trained):
    run, args, env = trained
    (run / "_stages" / "train.json").unlink()  # train must run again and read data/train.jsonl
    shutil.rmtree(run / "checkpoints")
    data = run / "data" / "train.jsonl"
    data.write_bytes(data.read_bytes()[:-40])  # cut off mid-record
    result = run_job(*args, env=env)
    assert_clean_failure(result, 2, str(data), "--force format")


@pytest.mark.parametrize("content", ["[1, 2]", '"train.lora_r=8"', "{not json"])
def test_hyperparameters_json_that_is_not_an_object_exits_2(tmp_path, content):
    hp = tmp_path / "hyperparameters.json"
    hp.write_text(content)
    result = run_job(*format_cmd(tmp_path / "run", SNLI_SAMPLE, command="config"),
                     env=job_env(JOB_SAGEMAKER_HYPERPARAMETERS=hp))
    assert_clean_failure(result, 2, str(hp))


def test_truncated_gguf_exits_2_naming_it(tiny_model_dir, tmp_path):  # noqa: F811
    pytest.importorskip("gguf")
    from job.export_gguf import inspect_model, write_gguf

    whole = tmp_path / "whole.gguf"
    write_gguf(inspect_model(Path(tiny_model_dir)), whole, "f16")
    env = job_env(JOB_CACHE_DIR=tmp_path / "cache")
    for cut in (30, 200, whole.stat().st_size // 2):
        gguf = tmp_path / f"cut{cut}.gguf"
        gguf.write_bytes(whole.read_bytes()[:cut])
        result = run_job("run", "--stages", "format,train", *sets(
            f"run_uri={tmp_path / 'run'}", f"data.uri={SNLI_SAMPLE}", f"model.uri=gguf:{gguf}", *TRAIN_SETS), env=env)
        assert_clean_failure(result, 2, str(gguf), "copy it again")


def test_damaged_adapter_exits_2_at_merge_naming_it(trained):
    run, args, env = trained
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LO')  # cut off
    merge = ["run", "--stages", "merge"] + args[3:]
    before = listing(str(run), None)
    result = run_job(*merge, env=env)
    assert_clean_failure(result, 2, f"{run}/adapter is damaged", "adapter_config.json", "--force train")
    assert listing(str(run), None) == before
