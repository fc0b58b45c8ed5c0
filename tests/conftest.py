"""Shared fixtures: moto's S3 server, s3rver (a second S3 implementation), `store_root`, which runs a
test once on a folder and once on S3 (moto), the tiny model, and `small_cache` (a full disk)."""

import os
import subprocess

# One OpenMP thread per process, set before anything imports torch, in the test workers and (inherited
# through tests.helpers.job_env) in every job process they start. The suite runs four workers on CI's two
# cores and most tests start job processes of their own, so torch's two intra-op threads per process only
# fight each other for the cores and spin while they wait. Measured 2026-12-07 on the 2-core CI machine,
# four tiny-model trainings at once (format + train 30 steps each), alternating: 126.5 and 209.0 CPU-s
# (64 and 106 s) with torch's default threads, 61.3 and 58.8 CPU-s (31 and 30 s) with one, same losses.
# The whole suite, the same hour, same machine: 23 min 2 s (2,509 CPU-s) -> 16 min 58 s (1,959 CPU-s).
# A user's own value wins.
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


# The longest test files first, longest to shortest (wall times of the runs of 2026-12-07): kill_anywhere
# leads, its two chained tests took 734 s of the 996 s run, and sixth in the list it started late and ended
# last, alone on its worker. The short files follow in collection order and fill the gaps. With `--dist
# loadfile` each file runs whole on one worker, in this order only with `--no-loadscope-reorder`
# (pyproject.toml): xdist's default reorders files by their number of tests, which put the three longest files
# last, on one worker, for the last six minutes of a run while the other three workers sat idle.
LONGEST_FIRST = ("test_kill_anywhere.py", "test_multinode.py", "test_train.py", "test_export.py", "test_lease.py",
                 "test_run_state.py", "test_bad_inputs.py", "test_secrets.py", "test_faults.py",
                 "test_evaluate.py", "test_hub.py", "test_trackers.py", "test_merge.py", "test_distributed.py",
                 "test_predict.py", "test_format.py", "test_formats.py", "test_logs.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
