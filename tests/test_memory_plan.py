"""The memory plan (job/memory_plan.py): what each stage needs on which device, and the refusal of a run
that cannot fit before anything runs. The formulas' numbers against real runs are in docs/benchmarks.md
(GPU); here: the decisions they lead to, and the real CLI's refusal."""

import json
import shutil

import pytest

from job.config import load_config
from job.memory_plan import GiB, Machine, ModelShape, plan_stages, run_stages
from tests.helpers import SNLI_SAMPLE, job_env, run_job

# Public configs (config.json) of the model classes the README's table covers.
LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                 num_attention_heads=32, num_key_value_heads=32)
LLAMA2_13B = dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, vocab_size=32000,
                  num_attention_heads=40, num_key_value_heads=40)
LLAMA2_70B = dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, vocab_size=32000,
                  num_attention_heads=64, num_key_value_heads=8)


def config(*sets):
    return load_config(None, ("run_uri=/tmp/r", "data.uri=/tmp/d.csv", "model.uri=/tmp/m", *sets))


def plan(shape: dict, gpu_gib, host_gib=32, disk_gib=500, *sets):
    cfg = config(*sets)
    gpu = int(gpu_gib * GiB) or None  # 0: no GPU
    machine = Machine(gpu_free=gpu, gpu_total=gpu,
                      host_available=int(host_gib * GiB), disk_free=int(disk_gib * GiB))
    return {p.stage: p for p in plan_stages(cfg, ModelShape.from_config(shape), machine, run_stages(cfg))}


def test_shape_counts_parameters_like_the_real_models():
    assert ModelShape.from_config(LLAMA2_7B).params == pytest.approx(6.74e9, rel=0.01)
    assert ModelShape.from_config(LLAMA2_13B).params == pytest.approx(13.0e9, rel=0.01)
    assert ModelShape.from_config(LLAMA2_70B).params == pytest.approx(69.0e9, rel=0.01)  # GQA: 8 KV heads


def test_7b_on_a_12gb_card_fits_with_the_4bit_model_for_evaluation():
    stages = plan(LLAMA2_7B, 12, 32, 500, "export.enabled=true")
    assert not [p.problem for p in stages.values() if p.problem]
    assert stages["train"].gpu_bytes <= 12 * GiB
    assert stages["evaluate"].how.startswith("4-bit base + adapter")  # the 13.5 GB bf16 model cannot fit
    assert "logits check skipped" in " ".join(stages["merge"].notes)
    for p in stages.values():
        assert p.host_bytes <= 8 * GiB, p  # the budget for a 7B: 8 GB of host memory per stage


def test_7b_on_an_80gb_card_evaluates_the_merged_model():
    stages = plan(LLAMA2_7B, 80)
    assert stages["evaluate"].how.startswith("merged 16-bit model")
    assert "logits check on the GPU" in stages["merge"].notes


def test_70b_fits_one_80gb_card_and_200gb_of_host_memory():
    stages = plan(LLAMA2_70B, 80, 200, 1000, "export.enabled=true")
    assert not [p.problem for p in stages.values() if p.problem], [p.problem for p in stages.values()]
    assert stages["train"].gpu_bytes <= 80 * GiB
    assert stages["evaluate"].how.startswith("4-bit base + adapter")


def test_a_model_too_big_for_every_device_is_refused_with_the_setting_to_change():
    stages = plan(LLAMA2_70B, 12)
    assert "4-bit base" in stages["train"].problem and "12.0 GiB free" in stages["train"].problem
    on_cpu = plan(LLAMA2_70B, 0, 24)  # no GPU: a CPU run of a 70B needs far more than 24 GiB of host memory
    assert "host memory" in on_cpu["train"].problem


def test_disk_counts_every_stage_and_names_the_fix():
    stages = plan(LLAMA2_13B, 24, 32, 40, "export.enabled=true")
    problem = stages["export"].problem or stages["merge"].problem
    assert "of disk" in problem and "JOB_CACHE_DIR" in problem


def test_generation_batch_shrinks_before_the_plan_refuses():
    stages = plan(LLAMA2_13B, 22, 32, 500, "evaluate.batch_size=64")
    assert not stages["evaluate"].problem
    assert any("generation batch" in n for n in stages["evaluate"].notes)


@pytest.fixture(scope="module")
def huge_model(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """The tiny model's files under a 70B config.json: the plan reads the config, nothing is loaded."""
    folder = tmp_path_factory.mktemp("huge") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **LLAMA2_70B}))
    return folder


def test_job_run_refuses_a_model_that_cannot_fit_before_anything_runs(huge_model, tmp_path):
    run = tmp_path / "run"
    result = run_job("run", "--set", f"run_uri={run}", "--set", f"data.uri={SNLI_SAMPLE}", "--set",
                     f"model.uri={huge_model}", env=job_env(JOB_CACHE_DIR=tmp_path / "cache"), timeout=300)
    assert result.returncode == 2, result.stderr
    assert "does not fit this machine" in result.stderr and "train:" in result.stderr
    assert "host memory" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "_stages").exists() and not (run / "config.yaml").exists()  # nothing ran, nothing written


def test_job_plan_shows_the_plan_for_another_machine(huge_model, tmp_path):
    args = ["plan", "--set", f"run_uri={tmp_path / 'run'}", "--set", f"data.uri={SNLI_SAMPLE}", "--set",
            f"model.uri={huge_model}"]
    result = run_job(*args, "--gpu-memory", "80", "--host-memory", "200", "--disk", "1000",
                     env=job_env(JOB_CACHE_DIR=tmp_path / "cache"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "memory plan (GPU 80.0 of 80.0 GiB free; host 200.0 GiB available" in result.stdout
    assert "DOES NOT FIT" not in result.stdout
    for stage in ("train", "merge", "evaluate"):
        assert f"\n  {stage}: " in result.stdout
    small = run_job(*args, "--gpu-memory", "12", env=job_env(JOB_CACHE_DIR=tmp_path / "cache"), timeout=300)
    assert small.returncode == 0 and "DOES NOT FIT" in small.stdout
