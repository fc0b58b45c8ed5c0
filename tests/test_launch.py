"""job/launch.py (`python -m job.launch ARGS`: torchrun ARGS, with one line instead of its traceback),
run for real: torchrun's agent in a real process over shell workers (`--no-python sh -c ...`), then
through entrypoint.sh with a stand-in `job` package whose processes fail like the job does. A few
seconds each (most of it importing torch).

- a worker that fails: one line naming it, its exit code and where its output is; exit 1;
- SIGTERM to the launcher: passed on to the workers, which get --shutdown-timeout to finish; one line;
- a rendezvous that times out (node 0 of 2, the other never comes): one line naming the endpoint;
- through the entry point: the job's own error line, the launcher's line, no traceback, and the
  job's exit code (from JOB_EXIT_CODE_FILE), not the launcher's 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, job_env

LAUNCH = [sys.executable, "-m", "job.launch", "--monitor-interval", "0.1"]


def env(**extra) -> dict:
    return job_env(PYTHONPATH=ROOT, OMP_NUM_THREADS=1, **extra)


def launch(*args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], env=env(**extra), capture_output=True, text=True, timeout=120)


def launcher_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("launcher: ")]


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr and "Root Cause" not in stderr, stderr


def the_launcher_line(result, returncode: int) -> str:
    """The run ended with `returncode`, printed no traceback and exactly one launcher line: that line."""
    assert result.returncode == returncode, result.stderr
    no_traceback(result.stderr)
    (line,) = launcher_lines(result.stderr)
    return line


def test_a_failed_worker_is_one_line_naming_it():
    # Rank 1 fails at once; torchrun stops rank 0 (SIGTERM) because of it.
    result = launch("--standalone", "--nproc-per-node", "2", "--no-python", "sh", "-c",
                    'echo "worker $RANK: the job\'s own error" >&2; [ "$RANK" = 1 ] && exit 69; exec sleep 60')
    line = the_launcher_line(result, 1)
    assert "worker 1: the job's own error" in result.stderr
    assert re.fullmatch(r"launcher: this node: rank 1 \(local rank 1, pid \d+\) exited with code 69; "
                        r"then torchrun stopped rank 0; their output is above", line), line


@pytest.mark.parametrize("exitcodes, said", [
    # A worker that crashed (SIGABRT): it, not the ones torchrun then stopped.
    ({0: -15, 1: -9, 2: -6}, "rank 2 (local rank 2, pid 102) was stopped by SIGABRT; then torchrun stopped ranks 0, 1"),
    # Every process stopped by a signal: all of them are named.
    ({0: -9, 1: -15}, "rank 0 (local rank 0, pid 100) was stopped by SIGKILL, rank 1 (local rank 1, pid 101) was "
                      "stopped by SIGTERM"),
    ({3: 2, 1: 75}, "rank 1 (local rank 1, pid 101) exited with code 75, rank 3 (local rank 3, pid 103) exited "
                    "with code 2"),
])
def test_the_message_names_first_the_processes_that_failed_by_themselves(exitcodes, said):
    pytest.importorskip("torch")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.run import parse_args

    from job.launch import failed

    error = ChildFailedError("job", {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                                          error_file="/nonexistent/error.json")
                                     for rank, code in exitcodes.items()})
    args = parse_args(["--nproc-per-node", "4", "-m", "job"])
    assert failed(error, args) == f"{said}; their output is above"
    args = parse_args(["--redirects", "3", "--log-dir", "/logs", "-m", "job"])
    assert failed(error, args).endswith("their output is in /logs (<run>/attempt_<n>/<local rank>/stderr.log)")


def test_sigterm_is_passed_on_and_the_workers_get_the_shutdown_timeout(tmp_path):
    # Each worker takes 1 s after SIGTERM to "save a checkpoint": torchrun's default wait would do too,
    # the point is that the launcher waits for them (--shutdown-timeout) and then says one line.
    worker = textwrap.dedent("""\
        trap 'sleep 1; echo "worker $RANK saved" >&2; touch "$DIR/saved-$RANK"; exit 75' TERM
        touch "$DIR/ready-$RANK"
        while :; do sleep 0.1; done
        """)
    proc = subprocess.Popen([*LAUNCH, "--standalone", "--nproc-per-node", "2", "--shutdown-timeout", "30",
                             "--no-python", "sh", "-c", worker], env=env(DIR=tmp_path),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    stderr = proc.stderr.read()
    no_traceback(stderr)
    assert (tmp_path / "saved-0").exists() and (tmp_path / "saved-1").exists(), stderr
    assert launcher_lines(stderr) == ["launcher: this node: got SIGTERM: passed it on to the job's processes and "
                                      "waited for them (--shutdown-timeout)"], stderr


def test_a_rendezvous_that_times_out_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = launch("--nproc-per-node", "1", "--no-python", "true",
                    PET_NNODES="2", PET_NODE_RANK="0", PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port),
                    PET_RDZV_CONF="timeout=1")
    line = the_launcher_line(result, 1)
    assert line.startswith(f"launcher: node 0 of 2: the rendezvous at 127.0.0.1:{port} failed (DistStoreError: "
                           "Timed out after "), line
    assert line.endswith("check that every node was started, within PET_RDZV_CONF's timeout, and can reach it")


FAKE_JOB_MAIN = textwrap.dedent("""\
    # A stand-in for `python -m job run` under torchrun: fails as the job does when it loses a peer
    # (its own one error line, its exit code written to JOB_EXIT_CODE_FILE by local rank 0, exit 69).
    import os, sys
    from pathlib import Path

    rank = os.environ["RANK"]
    print(f"rank {rank}/2 (local {rank}): lost contact with peer 10.0.3.7:30645 (...). Exit 69", file=sys.stderr)
    if os.environ["LOCAL_RANK"] == "0":
        Path(os.environ["JOB_EXIT_CODE_FILE"]).write_text("69\\n")
    sys.exit(69)
    """)


def test_through_the_entry_point_the_jobs_line_and_exit_code_and_no_traceback(tmp_path):
    """entrypoint.sh with JOB_NPROC=2 runs `python3 -m job.launch ... -m job run`: the real launcher, over a
    stand-in `job` package (its job/launch.py is the real one), found first: not run from ROOT."""
    package = tmp_path / "fake" / "job"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_JOB_MAIN)
    (package / "launch.py").symlink_to(ROOT / "job" / "launch.py")
    venv_bin = str(Path(sys.executable).parent)  # the entry point's python3: the one with torch
    result = subprocess.run(
        ["bash", str(ROOT / "entrypoint.sh"), "run"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=job_env(PYTHONPATH=package.parent, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", JOB_NPROC="2",
                    TMPDIR=tmp_path, OMP_NUM_THREADS=1, SM_ROOT=tmp_path / "opt_ml",
                    RUNPOD_WORKSPACE=tmp_path / "no-workspace"))
    line = the_launcher_line(result, 69)
    assert "rank 1/2 (local 1): lost contact with peer 10.0.3.7:30645" in result.stderr
    assert re.fullmatch(r"launcher: this node: rank \d \(local rank \d, pid \d+\) exited with code 69.*; "
                        r"their output is above", line), line
