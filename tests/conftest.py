"""Shared fixtures: moto's S3 server, s3rver (a second S3 implementation), `store_root`, which runs a
test once on a folder and once on S3 (moto), the tiny model, and `small_cache` (a full disk)."""

import subprocess

import pytest

# Session fixtures shared by several modules live here: imported into each test module instead, pytest
# would build them once per module.
import tests.hypothesis_profiles  # noqa: F401  (registers and loads the ci / thorough profiles)
from tests.model_fixtures import run_setup, smollm2_conversion, tiny_model_dir  # noqa: F401
from tests.s3server import fake_aws_env, make_bucket, moto_server, s3_bucket, s3rver_server, store_root  # noqa: F401


# Here rather than imported from a test module: test_config_checks and test_hub both use it.
@pytest.fixture
def small_cache(tmp_path):
    """JOB_CACHE_DIR on a 512 KiB tmpfs: room for the job's scratch files, not for a download."""
    folder = tmp_path / "small-cache"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
