"""Shared fixtures: moto's S3 server, s3rver (a second S3 implementation), `store_root`, which runs a
test once on a folder and once on S3 (moto), the tiny model, and `small_cache` (a full disk)."""

import os
import subprocess

# One OpenMP thread per process, set before anything imports torch, in the test workers and (inherited)
# in every job process they start. The suite runs four workers on CI's two cores and most tests start
# job processes of their own, so torch's intra-op threads only fight each other for the cores and spin
# while they wait: a tiny-model `job run` (format, train 12 steps, merge, evaluate) took 45.5 CPU-s with
# two threads and 25.0 with one, under the suite's load, with the same losses. A user's own value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# The longest test files first. With `--dist loadfile` each file runs whole on one worker, in collection
# order, so a long file that starts last sets CI's wall time while the other workers sit idle (the
# 2026-12-06 run ended on one file for its last ten minutes). Longest first is the classic fix.
LONGEST_FIRST = ("test_multinode.py", "test_kill_anywhere.py", "test_faults.py", "test_distributed.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
