"""job/model_files.py: the one safetensors header reader, on files written by the safetensors library."""

import torch
from safetensors.torch import save_file

from job.model_files import safetensors_header, safetensors_problem, tensors, weights_bytes


def test_header_size_and_damage(tmp_path):
    save_file({"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(5)}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    header_len, header = safetensors_header(tmp_path / "model.safetensors")
    assert header_len > 0 and "__metadata__" in header
    assert {name: info["shape"] for name, info in tensors(header).items()} == {"a.weight": [3, 4], "b.bias": [5]}
    assert weights_bytes(tmp_path, 2) == (12 + 5) * 2
    assert safetensors_problem(tmp_path / "model.safetensors") is None

    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4])
    assert "truncated" in safetensors_problem(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(data[:8 + header_len // 2])
    assert "header does not parse" in safetensors_problem(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04 not safetensors at all")
    assert safetensors_problem(tmp_path / "model.safetensors") == "is not a safetensors file"


def test_convert_gguf_out_that_is_not_utf8_is_refused_before_converting(tmp_path):
    """`job convert-gguf --out` with a path that is not UTF-8 converted the whole model and then failed printing
    the folder (a traceback); it is refused first now, exit 2 naming --out, nothing written."""
    import subprocess
    import sys

    from tests.helpers import ROOT, job_env

    out = bytes(tmp_path) + b"/model-\xff"
    result = subprocess.run([sys.executable, "-m", "job", "convert-gguf", "--out", out], capture_output=True,
                            env=job_env(JOB_CACHE_DIR=tmp_path / "cache"), cwd=ROOT, timeout=120)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert "--out: not valid UTF-8 (byte 0xff" in stderr and "Traceback" not in stderr
    assert not [p for p in tmp_path.iterdir() if p.name != "cache"]  # no model folder, no temporary sibling
