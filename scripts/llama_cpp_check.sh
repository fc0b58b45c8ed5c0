#!/usr/bin/env bash
# Outside CI (slow): load the quickstart's GGUF export in llama.cpp and compare greedy answers with
# transformers on merged/. llama-cpp-python builds llama.cpp from source: about 25 minutes on 2 cores.
#   bash scripts/llama_cpp_check.sh RUN_DIR [N_SENTENCES=5]   # RUN_DIR: a finished run with export.enabled=true
# Writes RUN_DIR/../llama_cpp_check.json and prints it; exit 1 when an answer differs.
set -euo pipefail
run=${1:?RUN_DIR}; n=${2:-5}
python -c "import llama_cpp" 2>/dev/null || pip install llama-cpp-python
python - "$run" "$n" <<'PY'
import csv, json, sys
from pathlib import Path

import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from job.config import PromptConfig
from job.prompts import build_prompt

run, n = Path(sys.argv[1]), int(sys.argv[2])
cfg = PromptConfig()  # the quickstart uses the default prompt
rows = list(csv.DictReader(open("tests/data/snli_sample.csv", encoding="utf-8")))[:n]
tok = AutoTokenizer.from_pretrained(run / "merged")
model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
results = []
for gguf in sorted((run / "export").glob("*.gguf")):
    llm = Llama(model_path=str(gguf), n_ctx=1024, verbose=False)
    for row in rows:
        prompt = build_prompt(row["sentence1"], cfg)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=tok.eos_token_id)
        hf = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        llama_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        answer = llm(prompt, max_tokens=64, temperature=0.0, top_k=1)["choices"][0]
        results.append({"file": gguf.name, "input": row["sentence1"], "transformers": hf, "llama_cpp": answer["text"],
                        "finish": answer["finish_reason"], "same_answer": hf.strip() == answer["text"].strip(),
                        "same_prompt_tokens": llama_ids == ids[0].tolist()})
report = {"same_answers": sum(r["same_answer"] for r in results), "answers": len(results), "results": results}
(run.parent / "llama_cpp_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
print(json.dumps(report, indent=2, ensure_ascii=False))
sys.exit(0 if report["same_answers"] == report["answers"] else 1)
PY
