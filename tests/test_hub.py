"""model.uri / --model / --adapter hf://ORG/NAME[@REVISION] against a fake Hugging Face Hub (tests/fakehub.py).

The job runs in its own process with HF_ENDPOINT pointing at the fake hub (huggingface_hub reads it at
import). `job predict` is the cheapest command that fetches and loads a model; the train marker's
commit sha is checked by the hub run in tests/test_secrets.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fakehub import FakeHub, folder_files
from tests.helpers import job_env, read_jsonl, run_job

TOKEN = "hf_FakeHubTokenForTestsOnly0123456789"
LOADING_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"}


@pytest.fixture(scope="module")
def hub(tiny_model_dir):  # noqa: F811
    """org/tiny: main and tag v1 (v1 lacks main's notes.json); both carry pickled weights and an original/
    folder that must never be fetched. org/gated needs the token."""
    files = folder_files(tiny_model_dir)
    extra = {"pytorch_model.bin": b"pickle" * 1000, "original/consolidated.00.pth": b"pth" * 1000}
    fake = FakeHub(token=TOKEN)
    fake.shas = fake.add_repo("models", "org/tiny", {"main": {**files, **extra, "notes.json": b"{}"},
                                                     "v1": {**files, **extra}})
    fake.add_repo("models", "org/gated", {"main": files}, gated=True)
    fake.start()
    yield fake
    fake.stop()


def predict(model_uri: str, env: dict, *extra):
    return run_job("predict", "--model", model_uri, "--max-new-tokens", "4", *extra, "A man is sleeping.", env=env)


def hub_env(hub: FakeHub, cache: Path, **extra) -> dict:
    env = job_env(None, HF_ENDPOINT=hub.url, JOB_CACHE_DIR=cache, HF_HOME=cache / "hf-home")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env



def snli_frame():
    """The SNLI sample as text columns, for the fake Hub's Parquet shards."""
    import pandas as pd

    from tests.helpers import SNLI_SAMPLE

    return pd.read_csv(SNLI_SAMPLE, dtype=str, keep_default_na=False)


def parquet_of(frame) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue()

def test_pinned_download_fetches_loading_files_once_then_works_offline(hub, tmp_path):
    cache = tmp_path / "cache"
    env = hub_env(hub, cache)
    hub.requests.clear()
    result = predict("hf://org/tiny@v1", env)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(result.stdout)[0]["input"] == "A man is sleeping."
    snapshot = cache / "hub" / "models--org--tiny" / "snapshots" / hub.shas["v1"]
    assert {p.name for p in snapshot.iterdir()} == LOADING_FILES  # pinned (no notes.json), no .bin, no original/
    assert hub.shas["v1"] in result.stderr  # the resolved commit is logged
    fetched = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
    assert len(fetched) == len(LOADING_FILES)
    assert not any(".bin" in r or "original" in r for r in hub.requests)

    hub.requests.clear()
    again = predict("hf://org/tiny@v1", env)  # a restart reuses the cache: no file is fetched again
    assert again.returncode == 0, again.stderr
    assert not [r for r in hub.requests if "/resolve/" in r]

    offline = predict("hf://org/tiny@v1", hub_env(hub, cache, HF_HUB_OFFLINE=1, HF_ENDPOINT="http://127.0.0.1:9"))
    assert offline.returncode == 0, offline.stderr
    assert read_jsonl(offline.stdout)[0]["input"] == "A man is sleeping."

    missing = predict("hf://org/tiny", hub_env(hub, cache, HF_HUB_OFFLINE=1))  # main was never fetched
    assert missing.returncode == 2, missing.stderr
    assert "HF_HUB_OFFLINE=1" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("uri, expected", [
    ("hf://org/missing", "no such repo"),
    ("hf://org/tiny@v9", "has no revision 'v9'"),
    ("hf://org/gated", "gated"),
])
def test_unusable_repo_exits_2_naming_it(hub, tmp_path, uri, expected):
    result = predict(uri, hub_env(hub, tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert uri in result.stderr and expected in result.stderr
    assert "HF_TOKEN" in result.stderr or expected == "has no revision 'v9'"
    assert "Traceback" not in result.stderr


def test_gated_repo_with_token_and_the_token_is_never_written(hub, tmp_path):
    cache = tmp_path / "cache"
    result = predict("hf://org/gated", hub_env(hub, cache, HF_TOKEN=TOKEN))
    assert result.returncode == 0, result.stderr
    written = [p for p in cache.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert TOKEN not in result.stdout + result.stderr and not written


def test_bad_hub_uris_are_config_errors(tmp_path):
    env = job_env(None)
    for key, value, expected in [("model.uri", "hf://datasets/org/data", "names a dataset repo"),
                                 ("data.uri", "hf://org/model", "names a model repo"),
                                 ("model.uri", "hf://just-a-name", "not a Hugging Face Hub URI")]:
        result = run_job("config", "--set", f"run_uri={tmp_path}", "--set", "data.uri=x.csv", "--set", "model.uri=m",
                         "--set", f"{key}={value}", env=env)
        assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_endpoint_down_mid_download_exits_3_and_a_rerun_resumes(tiny_model_dir, tmp_path):  # noqa: F811
    files = folder_files(tiny_model_dir)
    fake = FakeHub(cut_after_bytes=100_000)
    fake.add_repo("models", "org/tiny", {"main": files})
    fake.start()
    try:
        env = hub_env(fake, tmp_path / "cache", JOB_STORAGE__MAX_ATTEMPTS=2)
        down = predict("hf://org/tiny", env)
        assert down.returncode == 3, down.stderr
        assert "could not be reached after 2 attempts" in down.stderr and "Traceback" not in down.stderr

        fake.cut_after_bytes = None
        fake.start()  # the same port: the endpoint is back
        back = predict("hf://org/tiny", env)
        assert back.returncode == 0, back.stderr
        snapshot = next((tmp_path / "cache" / "hub" / "models--org--tiny" / "snapshots").iterdir())
        assert (snapshot / "model.safetensors").read_bytes() == files["model.safetensors"]
    finally:
        fake.stop()
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_a_moved_branch_makes_the_stage_stale_in_plan_and_run(tmp_path):
    """The commit an hf:// branch names is part of the fingerprint: after a push to main, `job plan` says
    what changed and `job run` refuses to mix results; a pinned commit stays done."""
    frame = snli_frame()
    fake = FakeHub()
    first = fake.add_repo("datasets", "org/snli", {"main": {"data/train-00000-of-00001.parquet": parquet_of(frame)}})
    fake.start()
    try:
        env = hub_env(fake, tmp_path / "cache")

        def args(name, uri):
            return ["--set", f"run_uri={tmp_path / name}", "--set", f"data.uri={uri}", "--set", "data.eval_size=20",
                    "--set", "model.uri=/unused"]

        branch, pinned = args("branch", "hf://datasets/org/snli"), args("pinned", f"hf://datasets/org/snli@{first['main']}")
        for sets in (branch, pinned):
            done = run_job("run", "--stages", "format", *sets, env=env)
            assert done.returncode == 0, done.stderr
        second = fake.push("datasets", "org/snli", "main",
                           {"data/train-00000-of-00001.parquet": parquet_of(frame.head(200))})

        plan = run_job("plan", *branch, env=env)
        assert plan.returncode == 0, plan.stderr
        assert f"data.uri content changed (commit {first['main']} -> commit {second})" in plan.stdout
        refused = run_job("run", "--stages", "format", *branch, env=env)
        assert refused.returncode == 2 and "--force format" in refused.stderr
        assert run_job("plan", *pinned, env=env).stdout.startswith("format    done")
    finally:
        fake.stop()


def test_hub_identity_is_the_commit_however_it_is_named_and_survives_a_hub_outage(tmp_path):
    """The commit counts, not the spelling: @main and no revision at the same commit are the same input, and
    after a push, pinning the old commit (@<sha>, the README's way out) keeps the run done. With the hub
    answering 503, format runs from the cache, warns, and records the cached commit (not "unknown"), so the
    run is not called stale once the hub is back."""
    frame = snli_frame()
    fake = FakeHub()
    first = fake.add_repo("datasets", "org/snli", {"main": {"data/train-00000-of-00001.parquet": parquet_of(frame)}})
    fake.start()
    try:
        env = hub_env(fake, tmp_path / "cache", JOB_STORAGE__MAX_ATTEMPTS=1)

        def args(name, uri):
            return ["--set", f"run_uri={tmp_path / name}", "--set", f"data.uri={uri}", "--set", "data.eval_size=20",
                    "--set", "model.uri=/unused"]

        done = run_job("run", "--stages", "format", *args("run", "hf://datasets/org/snli"), env=env)
        assert done.returncode == 0, done.stderr
        assert run_job("plan", *args("run", "hf://datasets/org/snli@main"), env=env).stdout.startswith("format    done")

        fake.fail_status = 503
        outage = run_job("run", "--stages", "format", *args("outage", "hf://datasets/org/snli"), env=env)
        assert outage.returncode == 0, outage.stderr
        assert "the hub did not answer" in outage.stderr and first["main"] in outage.stderr
        marker = json.loads((tmp_path / "outage" / "_stages" / "format.json").read_text())
        assert marker["inputs"] == {"data.uri": {"commit": first["main"]}}
        fake.fail_status = None
        assert run_job("plan", *args("outage", "hf://datasets/org/snli"), env=env).stdout.startswith("format    done")

        fake.push("datasets", "org/snli", "main", {"data/train-00000-of-00001.parquet": parquet_of(frame.head(200))})
        pinned = run_job("run", "--stages", "format", *args("run", f"hf://datasets/org/snli@{first['main']}"), env=env)
        assert pinned.returncode == 0 and "format: done" in pinned.stderr + pinned.stdout, pinned.stderr
    finally:
        fake.stop()


def test_predict_with_an_adapter_from_the_hub(hub, tiny_model_dir, tmp_path):  # noqa: F811
    """--adapter hf://ORG/NAME: a PEFT adapter repo (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    hub.add_repo("models", "org/tiny-adapter", {"main": folder_files(tmp_path / "adapter")})
    result = predict("hf://org/tiny@v1", hub_env(hub, tmp_path / "cache"), "--adapter", "hf://org/tiny-adapter")
    assert result.returncode == 0, result.stderr
    assert "+ adapter hf://org/tiny-adapter" in result.stderr
    assert read_jsonl(result.stdout)[0]["input"] == "A man is sleeping."
    not_adapter = predict("hf://org/tiny@v1", hub_env(hub, tmp_path / "cache"), "--adapter", "hf://org/tiny")
    assert not_adapter.returncode == 2 and "not a PEFT adapter repo" in not_adapter.stderr


def test_full_cache_disk_during_a_hub_download_exits_3(hub, small_cache):
    """No retries (more attempts cannot free space): exit 3 naming the cache folder and JOB_CACHE_DIR."""
    result = predict("hf://org/tiny@v1", hub_env(hub, small_cache))
    assert result.returncode == 3, result.stderr
    assert "no space left in" in result.stderr and str(small_cache) in result.stderr, result.stderr
    assert "JOB_CACHE_DIR" in result.stderr and "Traceback" not in result.stderr
    assert "attempt 2 of" not in result.stderr
