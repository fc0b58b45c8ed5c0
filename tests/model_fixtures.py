"""A tiny Llama and a formatted run, built once per test session."""

import pytest

from tests.helpers import SNLI_SAMPLE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from job.tiny_model import make_model

    return make_model(tmp_path_factory.mktemp("tiny-model"), SNLI_SAMPLE)
