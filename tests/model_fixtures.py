"""A tiny Llama and a formatted run, built once per test session."""

import pytest

from tests.helpers import SNLI_SAMPLE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from job.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("tiny-model"), SNLI_SAMPLE)


@pytest.fixture
def run_setup(store_root, tiny_model_dir, tmp_path):  # noqa: F811
    """(root, endpoint, data_uri, env, model_dir) for a run on each backend of `store_root`: the SNLI
    sample placed next to the run, a fresh model cache, the tiny model."""
    from tests.helpers import SNLI_SAMPLE, job_env, put_file

    root, endpoint = store_root
    data_uri = put_file(root, endpoint, SNLI_SAMPLE, "snli.csv")
    env = job_env(endpoint, JOB_CACHE_DIR=tmp_path / "cache")
    return root, endpoint, data_uri, env, tiny_model_dir
