"""The merge stage: merged/ reproduces base+adapter (checked by the stage and again here, independently),
loads with from_pretrained, is sharded, stops at EOS; a failed check exits 1 and writes nothing.

The trained run (format + train of the tiny model, through the CLI) is made once per session and
copied into each test's run folder or bucket; test_evaluate.py and test_predict.py use it too.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import SNLI_SAMPLE, job_env, read_run_file, run_file_exists, run_job
from tests.session_cache import build_once


@dataclass
class TrainedRun:
    run_dir: Path
    model_dir: Path

    def args(self, root: str, *sets: str, stages: str = "format,train,merge,evaluate") -> list[str]:
        """`job run --stages STAGES --set KEY=VALUE...`, with format and train settings that match the
        trained run's (so those stages are done), plus `sets`."""
        keys = (f"run_uri={root}", f"data.uri={SNLI_SAMPLE}", f"model.uri={self.model_dir}", "data.eval_size=20",
                "train.load_in_4bit=false", "train.max_steps=12", "train.learning_rate=1e-2", "train.lora_r=8",
                "train.micro_batch_size=4", "train.packing_length=512", "train.checkpoint_every_steps=0",
                "train.logging_steps=1", "merge.check_prompts=2", *sets)
        return ["run", "--stages", stages, *[arg for kv in keys for arg in ("--set", kv)]]

    def seed(self, root: str, endpoint) -> None:
        """Copy the finished format + train results to `root` (a folder or s3://bucket/prefix)."""
        if root.startswith("s3://"):
            from job.config import StorageConfig
            from job.storage import open_store

            open_store(root, StorageConfig(endpoint_url=endpoint)).upload_dir(self.run_dir, "")
        else:
            shutil.copytree(self.run_dir, root)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """The tiny model and a finished format + train run on it, built once per test run. Several test
    modules import this fixture, and pytest then makes one instance per module (and xdist one per
    worker): they all get the same folder, built by the first (tests/session_cache.py). Read-only:
    tests copy it (`seed`)."""

    def build(base):
        from job.tiny_model import make_model

        run = TrainedRun(base / "run", base / "tiny-model")
        make_model(run.model_dir, SNLI_SAMPLE)
        result = run_job(*run.args(str(run.run_dir), stages="format,train"), env=job_env(JOB_CACHE_DIR=base / "cache"))
        assert result.returncode == 0, result.stderr
        shutil.rmtree(run.run_dir / "checkpoints")  # not needed downstream; keeps the copies small

    base, _ = build_once(tmp_path_factory, "trained-run", build)
    return TrainedRun(base / "run", base / "tiny-model")


def marker(root, endpoint, stage):
    return json.loads(read_run_file(root, endpoint, f"_stages/{stage}.json"))


def test_merge_matches_base_plus_adapter(trained_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = str(tmp_path / "run")
    trained_run.seed(root, None)
    result = run_job(*trained_run.args(root, "merge.max_shard_size=200KB", stages="merge"),
                     env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    m = marker(root, None, "merge")["metrics"]
    # The stage's own check: bf16 on CPU (auto), one rounding per weight; the adapter clearly matters.
    assert m["dtype"] == "bfloat16" and m["device"] == "cpu"
    assert 0 < m["max_logit_diff"] <= m["tolerance"]
    assert m["tolerance_source"].startswith("auto")
    assert m["adapter_effect"] > 20 * m["max_logit_diff"]
    assert m["merged_layers"] == 14  # 7 linear layers x 2 blocks ("all-linear")
    # Shard by shard, every tensor read back and checked; the small model's logits checked on the CPU.
    assert m["method"] == "streaming" and m["logits_check"] == "cpu"
    assert m["tensors_checked"] == 21 and m["lora_tensors_checked"] == 14 and 0 < m["max_error_ulps"] <= 0.5
    assert m["peak_rss_gb"] > 0 and m["merge_seconds"] >= 0 and m["peak_gpu_memory_gb"] is None

    merged = Path(root) / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) >= 2 and m["shards"] == len(shards)
    assert {shard.name for shard in shards} == set(index["weight_map"].values())
    assert not list(merged.glob("adapter_*")) and not list(merged.glob("*.bin"))
    # A run folder on this disk holds the only copy: the merge moved its shards in, none stay in the cache.
    assert not list((tmp_path / "cache").rglob("model*.safetensors"))

    tokenizer = AutoTokenizer.from_pretrained(merged)
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"

    # Independently of the stage: merged (loaded as any user would) vs base+adapter, both in fp32.
    ids = tokenizer("Two dogs run through a field of tall grass.", return_tensors="pt")["input_ids"]
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"  # saved in 16 bits
    base = AutoModelForCausalLM.from_pretrained(trained_run.model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        reference = PeftModel.from_pretrained(base, trained_run.run_dir / "adapter").eval()
        expected = reference(ids).logits
        got = merged_model(ids).logits
    effect = (expected - base_logits).abs().max().item()
    diff = (got - expected).abs().max().item()
    assert effect > 0.1  # the merged model is not the base model
    assert diff < effect / 20  # ... it is base+adapter, up to bf16 rounding of the weights
    assert diff < 0.08 * max(1.0, expected.abs().max().item())

    # The merge math itself: W16 = round16(W + scale * B @ A) in fp32, one rounding from the base's own
    # precision (the tiny model is saved in fp32).
    layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.float()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    want = (w + delta).to(torch.bfloat16)
    have = merged_model.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16)
    assert torch.equal(have, want)


def test_failed_merge_check_exits_1_and_writes_nothing(trained_run, tmp_path):
    root = str(tmp_path / "run")
    trained_run.seed(root, None)
    result = run_job(*trained_run.args(root, "merge.tolerance=1e-12", stages="merge"),
                     env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 1, result.stderr
    assert "merge check failed" in result.stderr and "over the tolerance 1e-12" in result.stderr
    assert "merged/ was not written" in result.stderr
    assert "Traceback" not in result.stderr  # an expected failure: one message
    assert not run_file_exists(root, None, "_stages/merge.json")
    assert not (Path(root) / "merged").exists()


@pytest.mark.parametrize("dtype, bound", [("bfloat16", 0.03), ("float16", 0.004), ("float32", 1e-5)])
def test_fp32_per_layer_merge_on_cpu(trained_run, tmp_path, dtype, bound):
    """The CPU path with a random adapter (B non-zero): the stage's merge equals peft's own merge done
    in fp32, and the logit gap stays far inside the auto tolerance for each dtype."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.stages.merge import RELATIVE_TOLERANCE, compare_logits, load_with_adapter, logits_of, merge_in_fp32

    tiny_model_dir = trained_run.model_dir
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False))  # random A and B
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [tokenizer("A woman is reading a book on a bench in the park.")["input_ids"]] * 2

    torch_dtype = getattr(torch, dtype)
    model = load_with_adapter(tiny_model_dir, tmp_path / "adapter", torch_dtype, "cpu", "sdpa")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    reference = logits_of(model, examples)
    with model.disable_adapter():
        base_only = logits_of(model, examples)
    merged, layers = merge_in_fp32(model)
    assert layers == 14 and not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch_dtype for p in merged.parameters())
    check = compare_logits(reference, logits_of(merged, examples), base_only, torch_dtype, 0.0)
    assert check["max_logit_diff"] <= bound * check["logit_scale"]
    assert bound < RELATIVE_TOLERANCE[dtype]  # the auto tolerance leaves a margin over what we measure
    assert check["adapter_effect"] > 0.2 * check["logit_scale"]

    # Bit for bit the weights of peft's own merge_and_unload on the same 16-bit model.
    peft_merged = load_with_adapter(tiny_model_dir, tmp_path / "adapter", torch_dtype, "cpu", "sdpa").merge_and_unload()
    theirs = peft_merged.state_dict()
    for name, weight in merged.state_dict().items():
        assert torch.equal(weight, theirs[name]), name


# ----------------------------------------------------------------------------------------------
# the streaming merge (job/stream_merge.py) against peft, on the architectures export covers


STREAM_CASES = {  # variant of tests/test_export.py -> LoRA settings (random A and B, so every delta is real)
    "llama-gqa-untied": dict(target_modules="all-linear"),
    "llama-mha-tied": dict(target_modules=["q_proj", "down_proj", "lm_head"]),  # the tied head: into the embedding
    "mistral": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "qwen2": dict(target_modules="all-linear", use_rslora=True, alpha_pattern={"v_proj": 32}),  # q/k/v biases
    "qwen3": dict(target_modules=["k_proj", "o_proj", "up_proj"], rank_pattern={"o_proj": 2}),
}


@pytest.mark.parametrize("variant", list(STREAM_CASES))
def test_streaming_merge_equals_peft(variant, tmp_path):
    """Tensor for tensor, the streaming merge of a bf16 checkpoint equals peft's merge_and_unload done in fp32 and
    rounded once to bf16 (peft's own bf16 merge rounds B @ A to bf16 first: up to one more rounding)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from job.stream_merge import merge_weights, verify_merged
    from tests.test_export import VARIANTS, make_variant

    model_dir = make_variant(tmp_path / "model", **VARIANTS[variant])  # bf16 in several shards
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **STREAM_CASES[variant])
                   ).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    written = merge_weights(model_dir, tmp_path / "adapter", out, torch.bfloat16, "cpu", 200_000)
    assert written["shards"] > 1 and written["merged_tensors"] >= written["lora_modules"] > 0
    check = verify_merged(model_dir, tmp_path / "adapter", out, torch.bfloat16, "cpu")
    assert check["tensors_checked"] == written["tensors"] and 0 < check["max_error_ulps"] <= 0.5

    ours = {k: v for shard in out.glob("*.safetensors") for k, v in load_file(shard).items()}
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                          tmp_path / "adapter").merge_and_unload()
    theirs = {k: v.detach().to(torch.bfloat16) for k, v in reference.state_dict().items()}
    tied = VARIANTS[variant].get("tied", False)
    assert set(ours) == set(theirs) - ({"lm_head.weight"} if tied else set())
    changed = 0
    for name, weight in theirs.items():
        mine = ours["model.embed_tokens.weight" if tied and name == "lm_head.weight" else name]
        assert torch.equal(mine, weight), name
        changed += not torch.equal(mine, load_file_tensor(model_dir, name if name in ours else
                                                          "model.embed_tokens.weight"))
    assert changed >= written["merged_tensors"] - ("mistral" == variant)  # lm_head replaced by an equal copy


def load_file_tensor(model_dir: Path, name: str):
    from safetensors import safe_open

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(model_dir / index[name], "pt") as f:
        return f.get_tensor(name)


def test_adapter_of_another_model_exits_2(trained_run, tmp_path):
    """An adapter whose modules match no tensor of the base: exit 2 naming the modules; nothing written."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.test_export import VARIANTS, make_variant

    root = str(tmp_path / "run")
    trained_run.seed(root, None)
    other = make_variant(tmp_path / "qwen3", **VARIANTS["qwen3"])  # same layer names, other shapes
    model = AutoModelForCausalLM.from_pretrained(other)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    adapter = Path(root) / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (adapter / name).write_bytes((tmp_path / "a" / name).read_bytes())
    result = run_job(*trained_run.args(root, stages="merge"), env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert "does not fit model.uri" in result.stderr and "Traceback" not in result.stderr
    assert not (Path(root) / "merged").exists() and not run_file_exists(root, None, "_stages/merge.json")


def test_logits_check_skipped_and_partial_merge_redone(trained_run, tmp_path):
    """merge.check_logits=false: the per-tensor check still runs, the logits fields are null with the reason
    (report.json too). A merged.partial/ left by a killed merge is not taken for a result: it is redone."""
    import hashlib

    from job.report import merge_summary

    root = str(tmp_path / "run")
    trained_run.seed(root, None)
    # What a merge killed midway leaves in the job's work folder (platform.work_dir): a half-written
    # merged.partial/, and a merged/ of an earlier merge that was never stamped as uploaded.
    work = tmp_path / "cache" / "work" / hashlib.sha256(root.encode()).hexdigest()[:12] / "merge"
    for folder in ("merged.partial", "merged"):
        (work / folder).mkdir(parents=True)
        (work / folder / "model-00001-of-00009.safetensors").write_bytes(b"\0" * 10)
    result = run_job(*trained_run.args(root, "merge.check_logits=false", stages="merge"),
                     env=job_env(JOB_CACHE_DIR=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    m = marker(root, None, "merge")["metrics"]
    assert m["logits_check"] == "skipped" and m["logits_check_reason"] == "merge.check_logits: false"
    assert m["max_logit_diff"] is None and m["tensors_checked"] == 21 and m["max_error_ulps"] <= 0.5
    summary = merge_summary(marker(root, None, "merge"))
    assert summary["max_logit_diff"] is None and summary["logits_check_reason"] == "merge.check_logits: false"
    assert not (work / "merged.partial").exists()
    # The new merged/ is in the run (moved there: the run folder is on this disk), the stale one is gone.
    assert sorted(p.name for p in (Path(root) / "merged").glob("*.safetensors")) == ["model.safetensors"]
    assert not (work / "merged").exists()


def test_lora_variants_the_merge_does_not_implement_exit_2(tmp_path):
    """DoRA (and the other variants in stream_merge.UNSUPPORTED) are refused by name, not merged wrong."""
    from job.errors import InputError
    from job.stream_merge import read_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 8}))
    with pytest.raises(InputError, match=r"DoRA \(use_dora\) is not supported by the merge") as error:
        read_adapter(tmp_path)
    assert error.value.exit_code == 2


def test_adapter_names_map_onto_checkpoint_prefixes():
    """peft's module paths land on the checkpoint's names whatever prefix the checkpoint was saved with."""
    from job.stream_merge import name_mapper

    params = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    for prefix in ("", "language_model.", "model.text_model."):
        names = {prefix + p for p in params} | {prefix + "model.norm.weight"}
        assert [name_mapper(params, names)(p) for p in params] == [prefix + p for p in params]
    stripped = {p.removeprefix("model.") for p in params}  # a checkpoint saved without the "model." level
    assert {name_mapper(params, stripped)(p) for p in params} == stripped
