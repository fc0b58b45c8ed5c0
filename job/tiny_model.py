"""A tiny Llama with a byte-level BPE tokenizer trained on SNLI text: the stand-in base model for
tests, the image check and smoke runs. Random weights, made locally in seconds, nothing downloaded.

    python -m job.tiny_model OUT_DIR [--csv SNLI.csv] [--layers 2 --hidden 64]

Also builds Llama-shaped models of any size (`--hidden 4096 --layers 32 --intermediate 11008` is
the 7B shape) for GPU benchmarks, where real weights cannot travel.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer(texts, vocab_size: int = 1024):
    """Byte-level BPE (no unknown characters possible) with distinct BOS, EOS and PAD tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def snli_texts(csv_path: Path | None, limit: int = 4000) -> list[str]:
    """Sentences (and the prompt template) to train the tokenizer on."""
    from job.config import PromptConfig
    from job.prompts import build_completion, build_prompt

    cfg = PromptConfig()
    texts = [build_prompt("x", cfg), build_completion("x", "y", cfg)] * 50
    if csv_path is not None and Path(csv_path).is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                if i >= limit:
                    break
                texts += [row["sentence1"], row["sentence2"], json.dumps(row["sentence1"])]
    return texts


def make_model(out_dir: Path, csv_path: Path | None = None, hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab_size: int = 1024,
               seed: int = 0, dtype: str = "float32", device: str = "cpu", tokenizer_dir: Path | None = None,
               model_vocab: int = 0, max_shard_size: str = "5GB") -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(snli_texts(csv_path), vocab_size)
    torch.manual_seed(seed)
    # model_vocab > len(tokenizer) gives a real model's embedding and logit sizes (32000 for Llama-2)
    # to benchmark with, while the small tokenizer only ever produces ids below its own size.
    config = LlamaConfig(vocab_size=max(len(tokenizer), model_vocab), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)  # 5GB: shards like the Hub's 7B-70B checkpoints
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--csv", type=Path, help="SNLI-style CSV whose sentences train the tokenizer")
    parser.add_argument("--tokenizer", type=Path, help="reuse this tokenizer folder instead of training one")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--model-vocab", type=int, default=0, help="embedding rows (e.g. 32000 for the Llama-2 shape)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, as save_pretrained takes it")
    args = parser.parse_args(argv)
    make_model(args.out_dir, args.csv, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate,
               dtype=args.dtype, device=args.device, tokenizer_dir=args.tokenizer, model_vocab=args.model_vocab,
               max_shard_size=args.max_shard_size)
    print(args.out_dir)


if __name__ == "__main__":
    main()
