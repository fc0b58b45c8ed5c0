"""Running out of memory: exit 5 with the stage, the memory seen and the setting to change, never a
traceback; no marker, so a rerun redoes the stage. Generation halves its batch on a CUDA OOM and goes on.

CI has no GPU: CUDA's torch.OutOfMemoryError is raised by a monkeypatched torch/transformers call inside
the real stage code, run in this process through the CLI's own entry (`job.cli._main`). One real `job`
process runs out of host memory for real: an address-space limit (prlimit) and a 200 GB sparse input.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from job.config import Config
from tests.helpers import ROOT, job_env
from tests.test_merge import trained_run  # noqa: F401 - a fixture

EXIT_OUT_OF_MEMORY = 5


def _cuda_oom(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                 "of 11.6 GiB of which 1.1 GiB is free.")


def _run_in_process(monkeypatch, capfd, tmp_path, args) -> tuple[int, str]:
    from job.cli import _main

    for key in [k for k in os.environ if k.startswith("JOB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("JOB_CACHE_DIR", str(tmp_path / "cache"))
    code = _main([str(a) for a in args])
    return code, capfd.readouterr().err


def test_out_of_memory_in_each_stage_exits_5_and_a_rerun_redoes_it(trained_run, tmp_path, monkeypatch,  # noqa: F811
                                                                    capfd):
    """format (host MemoryError), train, merge, export and evaluate (CUDA OOM loading the model): exit 5,
    the message names the stage and its setting, no traceback, no marker; the merge's rerun completes."""
    from transformers import AutoModelForCausalLM

    import job.stages.format as format_stage

    root = tmp_path / "run"
    trained_run.seed(str(root), None)
    sets = ("evaluate.max_examples=2", "evaluate.compare_base=false")
    export = ("export.enabled=true", "export.gguf=[f16]")

    def args(stages, *more):
        return trained_run.args(str(root), *sets, *more, stages=stages)

    expected = {"train": "train.micro_batch_size", "merge": "merge.device=cpu",
                "export": "export.check_prompts=0", "evaluate": "evaluate.model=adapter"}
    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", _cuda_oom)
        code, err = _run_in_process(m, capfd, tmp_path, args("format,train,merge"))
    assert code == EXIT_OUT_OF_MEMORY, err
    assert "stage merge ran out of GPU memory (OutOfMemoryError: CUDA out of memory." in err, err
    assert expected["merge"] in err and "Traceback" not in err and "Memory now: host RSS" in err
    assert not (root / "_stages" / "merge.json").exists()

    code, err = _run_in_process(monkeypatch, capfd, tmp_path, args("format,train,merge"))
    assert code == 0 and (root / "_stages" / "merge.json").exists(), err  # the rerun redoes the merge

    for stage, more in (("export", export), ("evaluate", ())):
        with monkeypatch.context() as m:
            m.setattr(AutoModelForCausalLM, "from_pretrained", _cuda_oom)
            code, err = _run_in_process(m, capfd, tmp_path, args(f"format,train,merge,{stage}", *more))
        assert code == EXIT_OUT_OF_MEMORY, err
        assert f"stage {stage} ran out of GPU memory" in err and expected[stage] in err, err
        assert "Traceback" not in err and not (root / "_stages" / f"{stage}.json").exists()
    assert not (root / "export").exists() and not (root / "report").exists()

    for marker in ("train.json", "adapter"):  # train must run (and load the base model) again
        path = root / "_stages" / marker if marker.endswith(".json") else root / marker
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", _cuda_oom)
        code, err = _run_in_process(m, capfd, tmp_path, args("format,train"))
    assert code == EXIT_OUT_OF_MEMORY and "stage train ran out of GPU memory" in err, err
    assert expected["train"] in err and "--force train" in err
    assert "Traceback" not in err and not (root / "_stages" / "train.json").exists()

    with monkeypatch.context() as m:
        def no_memory(*args, **kwargs):
            raise MemoryError()

        m.setattr(format_stage, "read_rows", no_memory)
        code, err = _run_in_process(m, capfd, tmp_path, trained_run.args(str(tmp_path / "fresh"), stages="format"))
    assert code == EXIT_OUT_OF_MEMORY and "stage format ran out of host memory (MemoryError)" in err, err
    assert not (tmp_path / "fresh" / "_stages" / "format.json").exists()


def test_predict_out_of_host_memory_in_a_real_process(tmp_path):
    """A real `job predict` under an address-space limit reads a 200 GB (sparse) --input: Python's
    MemoryError becomes exit 5 naming job predict and the memory seen, not a traceback."""
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(200 * 2**30)  # sparse: no disk used
    limit = 16 * 2**30  # far above what the job needs to start, far below the file

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "job", "predict", "--model", str(tmp_path), "--input", str(huge)],
                            capture_output=True, text=True, env=job_env(), cwd=ROOT, preexec_fn=cap, timeout=300)
    assert result.returncode == EXIT_OUT_OF_MEMORY, result.stderr
    assert "job predict ran out of host memory (MemoryError)" in result.stderr
    assert "Memory now: host RSS" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# generation


@pytest.fixture(scope="module")
def tiny_inference(trained_run):  # noqa: F811
    from job.predict import load_inference_tokenizer, load_model
    from job.prompts import build_prompt

    cfg = Config()
    model = load_model(trained_run.model_dir, None, cfg)
    tokenizer = load_inference_tokenizer(trained_run.model_dir, str(trained_run.model_dir))
    sentences = ["A man plays a guitar.", "Two dogs run through a field.", "A woman reads a book in the park.",
                 "Children are playing soccer.", "A chef cooks pasta.", "The old man sleeps.", "Birds fly south."]
    return model, tokenizer, [build_prompt(s, cfg.prompt) for s in sentences]


def _oom_above(model, limit: int):
    """model.generate raising CUDA's OOM once, for the first batch of more than `limit` prompts."""
    real, calls = model.generate, []

    def generate(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > limit and len(calls) == 1:
            _cuda_oom()
        return real(**kwargs)

    return generate, calls


def test_generation_halves_the_batch_on_cuda_oom(tiny_inference, monkeypatch):
    from job.predict import generate

    model, tokenizer, prompts = tiny_inference
    expected, reference = generate(model, tokenizer, prompts, 12, batch_size=2)
    fake, calls = _oom_above(model, 2)
    monkeypatch.setattr(model, "generate", fake)
    got, stats = generate(model, tokenizer, prompts, 12, batch_size=4)
    assert calls == [4, 2, 2, 2, 1]  # 4 failed, then halves to 2 for the rest (7 prompts)
    assert stats.oom_halvings == 1 and stats.batch_size == 2 and stats.batches == reference.batches == 4
    assert "batch size halved to 2" in stats.batch_note
    assert [g.text for g in got] == [g.text for g in expected]  # same batches as batch_size=2 from the start
    assert [g.new_tokens for g in got] == [g.new_tokens for g in expected]


def test_generation_oom_with_one_prompt_is_exit_5(tiny_inference, monkeypatch):
    from job.errors import OutOfMemory
    from job.memory import out_of_memory
    from job.predict import generate

    model, tokenizer, prompts = tiny_inference
    monkeypatch.setattr(model, "generate", _cuda_oom)
    with pytest.raises(OutOfMemory) as caught, out_of_memory("evaluate"):
        generate(model, tokenizer, prompts[:2], 8, batch_size=2)  # 2 -> 1 -> still out of memory
    assert caught.value.exit_code == EXIT_OUT_OF_MEMORY
    message = str(caught.value)
    assert message.startswith("stage evaluate ran out of GPU memory (OutOfMemoryError: CUDA out of memory.")
    assert "evaluate.batch_size" in message and "finished stages are kept" in message


def test_memory_figures_and_sequence_estimate():
    from job.memory import describe, host_available_bytes, is_out_of_memory
    from job.predict import sequence_bytes

    assert host_available_bytes() > 0 and "host RSS" in describe()
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 10 bytes"))
    # Llama-2-7B, 200 prompt + 128 new tokens: 0.5 MiB of KV cache a token in 16 bits (164 MiB) and the
    # prefill's activations of one layer (21 MiB): about 186 MiB a sequence.
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
              "vocab_size": 32000}
    assert 180 * 2**20 < sequence_bytes(config, 200, 128) < 200 * 2**20
