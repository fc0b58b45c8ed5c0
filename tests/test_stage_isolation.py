"""Each stage starts clean: kernels patched into transformers' classes for training (Liger's) do not leak
into the merge's and evaluate's models in the same process (issue 20: a CPU merge after a Liger train
crashed in a Triton kernel). Liger itself needs Triton: tests/liger_standin.py patches the same classes
the same way."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SNLI_SAMPLE, job_env
from tests.liger_standin import TRITON_ERROR, apply_standin
from tests.model_fixtures import tiny_model_dir  # noqa: F401 - a fixture


def test_kernel_patches_are_undone(tiny_model_dir):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama as ml

    from job.liger import KernelPatches

    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    originals = (ml.apply_rotary_pos_emb, ml.LlamaMLP, ml.LlamaRMSNorm.forward)
    with KernelPatches() as patches:
        patches.record()
        apply_standin()
        assert ml.LlamaRMSNorm.forward.standin
        with pytest.raises(ValueError, match="Triton"), torch.inference_mode():  # the leak, while patched
            AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids)
    assert (ml.apply_rotary_pos_emb, ml.LlamaMLP, ml.LlamaRMSNorm.forward) == originals
    assert {"modeling_llama.apply_rotary_pos_emb", "modeling_llama.LlamaMLP",
            "LlamaRMSNorm.forward"} <= set(patches.restored)
    with torch.inference_mode():
        after = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert torch.equal(before, after)


def test_cpu_merge_after_a_patched_train(tiny_model_dir, tmp_path):  # noqa: F811
    """format, train with the stand-in kernels, then the CPU merge with its logits check, in one process."""
    import subprocess

    root = tmp_path / "run"
    sets = (f"run_uri={root}", f"data.uri={SNLI_SAMPLE}", f"model.uri={tiny_model_dir}", "data.eval_size=20",
            "train.load_in_4bit=false", "train.max_steps=3", "train.lora_r=8", "train.micro_batch_size=4",
            "train.packing_length=512", "train.checkpoint_every_steps=0", "merge.check_prompts=2")
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("liger_standin.py")), "run", "--stages",
                             "format,train,merge", *[a for kv in sets for a in ("--set", kv)]],
                            capture_output=True, text=True, env=job_env(JOB_CACHE_DIR=tmp_path / "cache"),
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert TRITON_ERROR not in result.stderr
    train = json.loads((root / "_stages" / "train.json").read_text())["metrics"]
    assert train["liger"]["used"] is True  # the stand-in was applied as Liger would be
    assert "kernel patches undone for the stages that follow" in result.stderr
    merge = json.loads((root / "_stages" / "merge.json").read_text())["metrics"]
    assert merge["logits_check"] == "cpu" and merge["max_logit_diff"] <= merge["tolerance"]
