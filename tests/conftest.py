"""Shared fixtures: moto's S3 server, s3rver (a second S3 implementation), and `store_root`, which runs a
test once on a folder and once on S3 (moto)."""

from tests.s3server import (fake_aws_env, make_bucket, moto_server, s3_bucket, s3rver_server,  # noqa: F401
                            store_root)
# Session fixtures shared by several modules live here: imported into each test module instead, pytest
# would build them once per module.
from tests.model_fixtures import run_setup, smollm2_conversion, tiny_model_dir  # noqa: F401
