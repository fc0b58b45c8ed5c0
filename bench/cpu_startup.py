"""Start-up of a data-parallel run on the CPU: 1, 2 and 4 processes (torchrun --standalone, gloo, the
tiny model), seconds from the launch to the first optimizer step and to the end of a 2-step train.

    PYTHONPATH=$PWD python bench/cpu_startup.py [--procs 1,2,4] [--repeat 1] [--code DIR]

--code runs the job from another checkout (e.g. `git worktree add /tmp/base <commit>`), to compare
a change with the code before it on the same machine in the same session.

Each launch gets a fresh run folder and model cache, so the model copy and the format stage are part
of the start-up, as on a new machine. The figures go into docs/benchmarks.md with the date and the
machine's load: on a shared machine the processes compete for the cores, and imports dominate.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["train.load_in_4bit=false", "train.max_steps=2", "train.checkpoint_every_steps=100",
            "train.micro_batch_size=2", "train.packing_length=128", "train.max_seq_length=128", "train.lora_r=8",
            "train.logging_steps=1", "data.eval_size=8"]


# What the log says when each phase is reached (rank 0's lines; one process logs no process group).
MARKS = (("process group", r"distributed: rank 0/|run .* on local"), ("train stage", r"stage train: running"),
         ("first step", r"step 1/2"))


def launch(procs: int, folder: Path, model: Path, code: Path) -> dict:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
            "-m", "job", "run", "--stages", "format,train", "--set", f"run_uri={folder / 'run'}",
            "--set", f"data.uri={ROOT / 'tests/data/snli_sample.csv'}", "--set", f"model.uri={model}"]
    for item in SETTINGS:
        args += ["--set", item]
    env = {**os.environ, "JOB_CACHE_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(code)}
    start = time.monotonic()
    marks: dict[str, float] = {}
    proc = subprocess.Popen(args, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        for name, pattern in MARKS:
            if name not in marks and re.search(pattern, line):
                marks[name] = time.monotonic() - start
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{procs} processes: exit {proc.returncode}")
    marks["end"] = time.monotonic() - start
    return marks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose job runs")
    options = parser.parse_args()
    from job.tiny_model import make_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", ROOT / "tests/data/snli_sample.csv")
        print(f"code: {options.code}; load average before: {os.getloadavg()[0]:.1f}, cores: {os.cpu_count()}")
        print("| processes | process group | train stage starts | first step | end (2 steps) |")
        print("| --- | --- | --- | --- | --- |")
        for procs in [int(p) for p in options.procs.split(",")]:
            for attempt in range(options.repeat):
                marks = launch(procs, Path(tmp) / f"run-{procs}-{attempt}", model, options.code.resolve())
                print(f"| {procs} | " + " | ".join(f"{marks.get(k, float('nan')):.1f} s" for k in
                                                   ("process group", "train stage", "first step", "end")) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
