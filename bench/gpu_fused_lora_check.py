"""tests/test_fused_lora.py on a GPU: the fused LoRA function against peft's layer with CUDA tensors (CUDA's
fused dropout kernel, bf16 autocast as in training), on the GPU machine, which has pytest but not the
test suite's S3 servers (tests/conftest.py). Runs every test of that module with device="cuda":

    python bench/gpu_fused_lora_check.py [OUT_DIR]      # exit 0 when all pass; OUT_DIR/fused-lora-check.txt
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.tiny_model import make_model  # noqa: E402
from tests import test_fused_lora as cases  # noqa: E402

SNLI_SAMPLE = ROOT / "tests" / "data" / "snli_sample.csv"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu": to try this script itself on a CPU machine


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp()) / "tiny-model"
    make_model(model_dir, SNLI_SAMPLE)
    models = cases.model_cache(model_dir)
    runs = [(f"test_layer_equals_peft[{base},{dtype},{dropout=},{recompute=}]",
             lambda b=base, d=dtype, p=dropout, r=recompute: cases.test_layer_equals_peft(models, DEVICE, b, d, p, r))
            for (base, dtype), dropout, recompute in itertools.product(
                [p.values for p in cases.BASE_DTYPES], [0.0, 0.1], [False, True])]
    runs += [("test_keeps_no_more_than_peft", lambda: cases.test_keeps_no_more_than_peft(models, DEVICE)),
             ("test_dropout_is_applied_and_drawn_from_the_seed",
              lambda: cases.test_dropout_is_applied_and_drawn_from_the_seed(models, DEVICE)),
             ("test_whole_model_loss_and_gradients", lambda: cases.test_whole_model_loss_and_gradients(models, DEVICE)),
             ("test_choice_and_its_reason", cases.test_choice_and_its_reason)]
    lines, failed = [f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}"], 0
    for name, run in runs:
        try:
            run()
            lines.append(f"PASS {name}")
        except pytest.skip.Exception as skip:
            lines.append(f"SKIP {name}: {skip}")
        except Exception:  # noqa: BLE001 - every failure is reported, the others still run
            failed += 1
            lines.append(f"FAIL {name}\n{traceback.format_exc()}")
    lines.append(f"{len(runs) - failed} of {len(runs)} passed or skipped, {failed} failed")
    (out / "fused-lora-check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
