"""Greedy answers of the GGUF export in llama.cpp vs transformers on merged/ (outside CI; see llama_cpp_check.sh).

Two halves in two virtualenvs, joined by a JSON file, so llama.cpp never shares a process (or a venv) with
torch:

  reference RUN_DIR N OUT.json   (the project's venv) the first N eval prompts of the run (data/eval.jsonl,
                                 exactly as training formatted them), their token ids, and transformers'
                                 greedy answer on merged/ (float32, stop at EOS, at most --max-new-tokens),
                                 with the top-1/top-2 logit margin at every answer step
  llama REFERENCE.json OUT.json  (a venv with llama-cpp-py-sync: numpy + cffi only) each export/*.gguf in
                                 llama.cpp: the same prompt tokenized by llama.cpp, then greedy decoding
                                 (argmax of the logits, stop at an end-of-generation token) and the
                                 comparison: same prompt tokens, same answer token ids, first differing
                                 token (and how near a tie transformers' choice was there)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def reference(run: Path, n: int, out: Path, max_new_tokens: int) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()][:n]
    tok = AutoTokenizer.from_pretrained(run / "merged")
    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    prompts = []
    for row in rows:
        ids = tok(row["prompt"])["input_ids"]
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        answer = gen.sequences[0, len(ids):].tolist()
        margins = []
        for step in gen.scores:  # greedy without processors: the scores are the raw logits
            top2 = step[0].float().topk(2).values
            margins.append(round(float(top2[0] - top2[1]), 4))
        prompts.append({"prompt": row["prompt"], "prompt_ids": ids, "answer_ids": answer,
                        "answer": tok.decode(answer, skip_special_tokens=True), "margins": margins,
                        "stopped_at_eos": bool(answer) and answer[-1] == tok.eos_token_id})
        print(f"transformers {len(prompts)}/{len(rows)}: {prompts[-1]['answer']!r}", file=sys.stderr)
    out.write_text(json.dumps({"run": str(run), "eos_token_id": tok.eos_token_id, "max_new_tokens": max_new_tokens,
                               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                               "ggufs": sorted(str(p) for p in (run / "export").glob("*.gguf")),
                               "prompts": prompts}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _greedy(llm, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Argmax decoding through llama.cpp's C API (the package's generate() samples with top-k/top-p chains)."""
    import numpy as np

    lib, ffi = llm._lib, llm._ffi
    llm._clear_context_state()
    n_past = llm._eval_tokens(prompt_ids, 0)
    answer, margins = [], []
    for _ in range(max_new_tokens):
        logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm._ctx, -1), 4 * llm.n_vocab), dtype=np.float32)
        top2 = np.partition(logits, -2)[-2:]
        token = int(np.argmax(logits))
        answer.append(token)
        margins.append(round(float(top2[1] - top2[0]), 4))
        if lib.llama_vocab_is_eog(llm._vocab, token):
            break
        n_past = llm._eval_tokens([token], n_past)
    return answer, margins


def _keep_warnings(ffi, lib, into: list):
    """llama.cpp logs every tensor it loads to stderr; keep its warnings and errors only, to report them."""

    @ffi.callback("void(enum ggml_log_level, const char *, void *)")
    def log(level, text, _user_data):
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            message = ffi.string(text).decode("utf-8", errors="replace").rstrip()
            into.append(message)
            print(f"llama.cpp: {message}", file=sys.stderr)

    lib.llama_log_set(log, ffi.NULL)
    return log  # the caller keeps it alive: llama.cpp holds a pointer to it


def llama(ref_path: Path, out: Path, threads: int) -> int:
    import llama_cpp_py_sync
    from llama_cpp_py_sync import Llama
    from llama_cpp_py_sync import _version
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

    ref = json.loads(ref_path.read_text(encoding="utf-8"))
    files = []
    for gguf in ref["ggufs"]:
        results, warnings = [], []
        keep = _keep_warnings(get_ffi(), get_lib(), warnings)  # noqa: F841 - must outlive the model
        with Llama(gguf, n_ctx=1024, n_batch=512, n_threads=threads, verbose=False, seed=0) as llm:
            eos = llm.eos_token
            for p in ref["prompts"]:
                ids = llm.tokenize(p["prompt"], add_special=True, parse_special=True)
                answer, margins = _greedy(llm, ids, ref["max_new_tokens"])  # llama.cpp's own tokenization
                hf = p["answer_ids"]
                first = next((i for i, (a, b) in enumerate(zip(hf, answer)) if a != b),
                             None if len(hf) == len(answer) else min(len(hf), len(answer)))
                diff = None
                if first is not None:
                    diff = {"index": first,
                            "transformers": llm.token_to_piece(hf[first]) if first < len(hf) else None,
                            "llama_cpp": llm.token_to_piece(answer[first]) if first < len(answer) else None,
                            "transformers_margin": p["margins"][first] if first < len(p["margins"]) else None,
                            "llama_cpp_margin": margins[first] if first < len(margins) else None}
                results.append({"same_prompt_tokens": ids == p["prompt_ids"], "same_answer": answer == hf,
                                "stopped_at_eos": bool(answer) and answer[-1] == eos, "answer_tokens": len(answer),
                                "first_difference": diff, "transformers": p["answer"],
                                "llama_cpp": llm.detokenize([t for t in answer if t != eos], remove_special=True)})
                print(f"{Path(gguf).name} {len(results)}/{len(ref['prompts'])}: "
                      f"{'same' if results[-1]['same_answer'] else 'DIFFERENT'}", file=sys.stderr)
        files.append({"file": Path(gguf).name, "same_answers": sum(r["same_answer"] for r in results),
                      "same_prompt_tokens": sum(r["same_prompt_tokens"] for r in results),
                      "stopped_at_eos": sum(r["stopped_at_eos"] for r in results), "prompts": len(results),
                      "llama_cpp_warnings": warnings, "results": results})
    report = {"versions": {**ref["versions"], "llama-cpp-py-sync": llama_cpp_py_sync.__version__,
                           "llama.cpp": f"{_version.__llama_cpp_tag__} ({_version.__llama_cpp_commit__})"},
              "transformers_stopped_at_eos": sum(p["stopped_at_eos"] for p in ref["prompts"]),
              "files": files}
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for f in files:
        print(f"{f['file']}: same answer {f['same_answers']}/{f['prompts']}, same prompt tokens "
              f"{f['same_prompt_tokens']}/{f['prompts']}, stopped at EOS {f['stopped_at_eos']}/{f['prompts']}, "
              f"llama.cpp warnings {len(f['llama_cpp_warnings'])}")
    return 0 if all(f["same_prompt_tokens"] == f["prompts"] for f in files) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("run", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("-n", type=int, default=10)
    r.add_argument("--max-new-tokens", type=int, default=96)
    ll = sub.add_parser("llama")
    ll.add_argument("reference", type=Path)
    ll.add_argument("out", type=Path)
    ll.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "reference":
        reference(args.run, args.n, args.out, args.max_new_tokens)
        return 0
    return llama(args.reference, args.out, args.threads)


if __name__ == "__main__":
    sys.exit(main())
