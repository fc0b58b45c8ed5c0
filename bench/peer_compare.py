"""The peer benchmark: the job's training speed next to Unsloth's, same card, same model, same data, same batch.

One GPU call runs both sides in turn, each run in a fresh process, and writes a table with the ratios:

    # on the CPU machine, in the project root (both folders are ignored by git, see the scripts' headers)
    bash ../shared/gpu/fetch-wheels.sh        # .whl: the job's wheels (default set), about 52 MB
    bash ../shared/gpu/fetch-wheels.sh pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
        typing_extensions==4.16.0 typing-inspection==0.4.5   # the job's run files need pydantic (not in the image)
    bash bench/fetch-peer-wheels.sh           # .whl-peer: Unsloth's, trimmed, about 5.4 MB
    # then one GPU call in the project root, carry [".whl", ".whl-peer"], timeout 600 s:
    MODEL=/tmp/peer-model-7b BUDGET=540 python3 bench/peer_compare.py $OUT

Options by environment variable: MODEL (the model folder, default /tmp/peer-model-7b: made here by
train_throughput's make_model_in_subprocess unless it holds a config.json), BUDGET (seconds for the whole
call, default 540: the GPU machine kills a command at 600 s), STEPS (measured optimizer steps, 10), WARMUP
(steps before the measurement, 3), REPEATS (runs of each side and setting, 2). The output folder is the
first argument, else $OUT, else /tmp/peer-out.

The job's wheels go into /tmp/site (unless /tmp/site/trl is there already: the job's own install, as in
../shared/gpu/README.md); Unsloth's into /tmp/site-peer (unless /tmp/site-peer/unsloth is there): .whl-peer
plus the job's wheels that the data path needs (bitsandbytes, dill, multiprocess, pydantic and its
helpers, .whl/site's boto3), but not the job's trl, datasets, liger-kernel or gguf. The two sites stay
apart because Unsloth 2026.10.9 pins trl<=1.15.0 and datasets<5 (the job has trl 1.16, datasets 5.2).
Both sides run with the Hub offline; Unsloth's usage statistics are off too.

The runs, interleaved, REPEATS times over (so a drift of the machine hits both sides):
  job-d01-N      the job's defaults (`bench/train_throughput.py --shape 7b --recipes job`): LoRA dropout 0.1,
                 the planner's batch for this card
  unsloth-d01-N  bench/peer_unsloth.py at dropout 0.1 with that job run's micro-batch, packing length and
                 gradient checkpointing (off on an H100/H200), so tokens per step match
  job-d0-N       the job with train.lora_dropout=0 (the planner may pick a larger micro-batch then)
  unsloth-d0-N   Unsloth at dropout 0 with that run's batch
Each Unsloth run takes the batch of the job run just before it (of an earlier repeat if that one left no
plan). Per pair the summary checks that tokens per step are the same and that the step-1 losses agree to
1e-3 (same data, same packing, same initial weights: a difference means the workloads differ). A run
starts only if the time left covers it (the longest run of its side so far, or a first guess), else it is
skipped and the summary says so. If the first Unsloth run fails other than by running out of memory, the
rest is skipped: it would fail the same way, and device time is scarce.

Measured on both sides as bench/train_throughput.py does: non-padding tokens/s over STEPS steps after
WARMUP, s/step, tokens/step, MFU (its flops_per_token against PEAK_FLOPS), peak max_memory_allocated, the
time to the end of the first step from building the trainer (model load included) and from the process
start (for the job: its recipe process, not the bench's parent), and the step-1 loss.
Results in the output folder (the GPU machine returns at most 8 files): summary.txt (every run, each
setting's medians and the ratio job / Unsloth, the checks, what was skipped), summary.json (the same with
every run's full result), run.log (this script), job.log and unsloth.log (every run's output), gpu.txt (the
card and both sites' versions). The summary is rewritten after every run, so a call cut short still
returns what it measured.

What is unfair (measured in ../shared/gpu/peer/README.md, 2026-12-06, H100):
  to Unsloth: torch 2.11 and no xformers or flash-attn here; peer_unsloth.py's enable_gqa wrapper gives it
    the packed-attention path it takes on torch >= 2.12. The batch is the job planner's: without
    checkpointing Unsloth needs less memory (50 against 66 GiB at 2048 x 5) and could take a larger one.
    Fused AdamW (the job's), not the adamw_8bit of Unsloth's notebooks. Trimmed wheels and unused
    dependencies left out (bench/fetch-peer-wheels.sh). Unsloth's pins force trl 1.15.0 and datasets 4.8.5.
  to the job: Unsloth's runs after its first reuse warm compile and inductor caches (/tmp/peer-unsloth),
    which shortens their first step only. The job runs inside the bench with its own callbacks (idle at
    these settings). Unsloth sets its own allocator options (expandable segments) and compiles each decoder
    block as a region: both part of its recipe, neither done by the job.
  Not compared here: Unsloth's recommended offloaded checkpointing (use_gradient_checkpointing="unsloth")
  and stock Unsloth attention (peer_unsloth.py --gc unsloth / --attention stock run them alone).

The pure parts (plan_runs, read_result, unsloth_batch, pair_checks, by_setting, render_summary) need
neither torch nor a GPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
JOB_SITE = Path("/tmp/site")
PEER_SITE = Path("/tmp/site-peer")
RESULTS = Path("/tmp/peer-results")  # each run's JSON
LOGS = Path("/tmp/peer-logs")  # each run's output, joined into OUT/job.log and OUT/unsloth.log
UNSLOTH_WORK = Path("/tmp/peer-unsloth")  # Unsloth's compile cache, shared by its runs (see the header)
SETTINGS = {  # key: label, the job bench's arguments, Unsloth's LoRA dropout
    "d01": ("dropout 0.1", ["--recipes", "job"], 0.1),
    "d0": ("dropout 0", ["--recipes", "", "--variant", "nodrop: train.lora_dropout=0"], 0.0),
}
# A run's wall time until one of its side has been seen (7B, this script's defaults; Unsloth's first run
# compiles into a cold cache): the 2026-12-06 runs took about 45 s, model load and teardown included.
FIRST_GUESS_S = {"job": 70.0, "unsloth": 90.0}
CAP_S = 240  # no run may take longer: a 7B run of either side takes 30-60 s
MARGIN_S = 5  # kept back at the end for the summary (the budget itself leaves 60 s before the kill)
MODEL_BUILD_CAP_S = 200  # the 7B model takes 60-90 s to make
LOSS_TOLERANCE = 1e-3
# Job wheels left out of Unsloth's site: its own pins (trl, datasets), the job's kernels (liger-kernel),
# export only (gguf), and bitsandbytes, copied from the job's site instead of unpacked again (43 MB).
NOT_FOR_PEER = ("trl-", "datasets-", "liger_kernel-", "gguf-", "bitsandbytes-")
ENV = {  # both sides: no network there, and output as it comes
    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false", "JOB_CACHE_DIR": "/tmp/qlora-cache",
}


# ---- pure parts: no torch, no GPU ----------------------------------------------------------------------

def plan_runs(repeats: int) -> list[dict]:
    """The runs in call order: per repeat, each setting's job run and then its Unsloth run."""
    runs = []
    for repeat in range(1, repeats + 1):
        for key, (label, _, _) in SETTINGS.items():
            for side in ("job", "unsloth"):
                runs.append({"name": f"{side}-{key}-{repeat}", "side": side, "setting": key, "label": label,
                             "repeat": repeat, "status": "pending"})
    return runs


def read_result(side: str, path: Path) -> dict | None:
    """A run's result: the job bench writes a list (one entry per recipe, one recipe here), peer_unsloth.py
    one object. None if there is no file or it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, list):
        return data[0] if data else None
    return data


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_status(side: str, rc: int | None, result: dict | None) -> tuple[str, str]:
    """("ok" | "error", why) from a run's exit code and result."""
    if rc in (124, 137):
        return "error", f"timed out (exit code {rc})"
    if result is None:
        return "error", f"exit code {rc}: no result written"
    if result.get("error"):
        return "error", str(result["error"]).splitlines()[0][:200]
    if rc != 0:
        return "error", f"exit code {rc}"
    if not finite(result.get("tokens_per_s")):
        return "error", "no tokens/s in the result"
    return "ok", ""


def unsloth_batch(job_result: dict | None) -> dict | None:
    """The job planner's batch from a job run's result (kept on out-of-memory too): micro-batch, packing
    length, gradient checkpointing as peer_unsloth.py's --gc. None if the run left no plan."""
    settings = (job_result or {}).get("settings") or {}
    micro, length = settings.get("micro_batch_size"), settings.get("packing_length")
    if not (isinstance(micro, int) and isinstance(length, int)):
        return None
    # the job's checkpointing is plain (non-reentrant) recomputation: Unsloth's True, not its offloaded one
    return {"micro_batch": micro, "packing_length": length,
            "gc": "true" if settings.get("gradient_checkpointing") else "off"}


def step1_loss(result: dict | None) -> float | None:
    losses = (result or {}).get("losses") or []
    return float(losses[0]) if losses and finite(losses[0]) else None


def pair_checks(runs: list[dict]) -> list[dict]:
    """Per setting and repeat, the job run against the Unsloth run that took its batch: tokens per step
    (must be the same) and step-1 loss (within LOSS_TOLERANCE)."""
    by_name = {r["name"]: r for r in runs}
    checks = []
    for run in runs:
        if run["side"] != "job":
            continue
        peer = by_name.get(run["name"].replace("job-", "unsloth-", 1))
        check = {"setting": run["label"], "repeat": run["repeat"], "job": run["name"],
                 "unsloth": peer["name"] if peer else None}
        if not peer or run["status"] != "ok" or peer["status"] != "ok":
            missing = [f"{r['name']} {r['status']}" for r in (run, peer) if r and r["status"] != "ok"]
            check.update(ok=None, text="not compared: " + ", ".join(missing or ["no Unsloth run"]))
            checks.append(check)
            continue
        job, uns = run["result"], peer["result"]
        tj, tu = job["tokens_per_step"], uns["tokens_per_step"]
        lj, lu = step1_loss(job), step1_loss(uns)
        tokens_ok = tj == tu
        loss_ok = lj is not None and lu is not None and abs(lj - lu) <= LOSS_TOLERANCE
        tokens_text = (f"tokens/step {tj:,.1f} and {tu:,.1f}: "
                       + ("the same" if tokens_ok else f"DIFFER by {tu - tj:+,.1f} ({(tu - tj) / tj:+.2%})"))
        if lj is None or lu is None:
            loss_text = f"step-1 loss {lj} and {lu}: MISSING"
        else:
            loss_text = (f"step-1 loss {lj:.4f} and {lu:.4f}: "
                         + (f"agree within {LOSS_TOLERANCE:g}" if loss_ok else f"DIFFER by {lu - lj:+.4f}"))
        batch = peer.get("batch") or {}
        source = peer.get("batch_from")
        check.update(ok=tokens_ok and loss_ok, tokens_per_step=[tj, tu], tokens_same=tokens_ok,
                     step1_loss=[lj, lu], loss_same=loss_ok,
                     text=f"{tokens_text}; {loss_text}"
                          + (f" (Unsloth's batch from {source})" if source and source != run["name"] else "")
                          + (f"; batch {batch.get('packing_length')} x {batch.get('micro_batch')}" if batch else ""))
        checks.append(check)
    return checks


METRICS = ("tokens_per_s", "s_per_step", "tokens_per_step", "mfu", "peak_gib", "first_step_s",
           "process_first_step_s")


def by_setting(runs: list[dict]) -> list[dict]:
    """Per setting: each side's median of every metric over its successful runs, the tokens/s spread, and
    the ratio job / Unsloth of the medians."""
    rows = []
    for key, (label, _, _) in SETTINGS.items():
        row = {"setting": label, "key": key}
        for side in ("job", "unsloth"):
            done = [r["result"] for r in runs if r["setting"] == key and r["side"] == side and r["status"] == "ok"]
            stats = {"runs": len(done)}
            for metric in METRICS:
                values = [x[metric] for x in done if finite(x.get(metric))]
                stats[metric] = statistics.median(values) if values else None
            speeds = [x["tokens_per_s"] for x in done]
            stats["tokens_per_s_spread"] = [min(speeds), max(speeds)] if speeds else None
            row[side] = stats
        row["ratio"] = {m: (row["job"][m] / row["unsloth"][m] if finite(row["job"][m]) and finite(row["unsloth"][m])
                            and row["unsloth"][m] else None) for m in METRICS}
        rows.append(row)
    return rows


def fmt(value, spec: str, missing: str = "-") -> str:
    return format(value, spec) if finite(value) else missing


def batch_text(side: str, result: dict | None) -> tuple[str, str]:
    """("2048x5", checkpointing) from a result's settings."""
    s = (result or {}).get("settings") or {}
    micro, length, accum = s.get("micro_batch_size"), s.get("packing_length"), s.get("gradient_accumulation", 1)
    batch = f"{length}x{micro}" + (f"x{accum}" if accum not in (1, None) else "") if micro else "-"
    if side == "unsloth":
        ckpt = str(s.get("use_gradient_checkpointing", "-"))
    else:
        ckpt = {True: "on", False: "off"}.get(s.get("gradient_checkpointing"), "-")
    return batch, ckpt


def render_summary(meta: dict, runs: list[dict], checks: list[dict], settings: list[dict]) -> str:
    """summary.txt: the runs in call order, each setting's medians and ratios, the checks, the skips."""
    lines = [f"peer benchmark, the job against Unsloth: {meta.get('device', '?')}",
             f"model {meta.get('model')}, {meta.get('steps')} measured steps after {meta.get('warmup')}, "
             f"{meta.get('repeats')} repeats, budget {fmt(meta.get('budget'), '.0f')} s, "
             f"used {fmt(meta.get('elapsed_s'), '.0f')} s"
             + (f" (model made in {meta['model_build_s']:.0f} s)" if finite(meta.get("model_build_s")) else ""),
             *[f"  {line}" for line in meta.get("versions", [])], "",
             "runs (call order); first step: from building the trainer (from the process start)"]
    head = (f"{'run':<15}{'setting':<13}{'tok/s':>8}{'s/step':>8}{'tok/step':>10}{'MFU':>7}{'peak GiB':>9}"
            f"{'first step s':>17}  {'batch':<9}{'ckpt':<8}{'step-1 loss':>11}{'wall s':>8}")
    lines.append(head)
    for run in runs:
        name = f"{run['name']:<15}{run['label']:<13}"
        if run["status"] in ("skipped", "pending"):
            lines.append(f"{name}{run['status']}: {run.get('reason', '')}")
            continue
        r = run.get("result") or {}
        if run["status"] != "ok":
            batch = run.get("batch")
            shape = f" (batch {batch['packing_length']}x{batch['micro_batch']})" if batch else ""
            lines.append(f"{name}ERROR{shape}: {run.get('reason', '')}  [{fmt(run.get('wall_s'), '.0f')} s]")
            continue
        batch, ckpt = batch_text(run["side"], r)
        first = f"{fmt(r.get('first_step_s'), '.1f')} ({fmt(r.get('process_first_step_s'), '.1f')})"
        lines.append(f"{name}{r['tokens_per_s']:>8,.0f}{fmt(r.get('s_per_step'), '.2f'):>8}"
                     f"{fmt(r.get('tokens_per_step'), ',.0f'):>10}{fmt(r.get('mfu'), '.1%'):>7}"
                     f"{fmt(r.get('peak_gib'), '.1f'):>9}{first:>17}  {batch:<9}{ckpt:<8}"
                     f"{fmt(step1_loss(r), '.4f'):>11}{fmt(run.get('wall_s'), '.0f'):>8}")
    lines += ["", "by setting: medians over the successful runs (tokens/s: min-max); ratio = job / Unsloth",
              f"{'setting':<13}{'side':<9}{'runs':>5}{'tok/s':>9}{'spread':>17}{'s/step':>8}{'tok/step':>10}"
              f"{'MFU':>7}{'peak GiB':>9}{'first step s':>17}"]
    for row in settings:
        for side in ("job", "unsloth"):
            s = row[side]
            spread = "-" if not s["tokens_per_s_spread"] else "{:,.0f}-{:,.0f}".format(*s["tokens_per_s_spread"])
            first = f"{fmt(s['first_step_s'], '.1f')} ({fmt(s['process_first_step_s'], '.1f')})"
            lines.append(f"{row['setting'] if side == 'job' else '':<13}{side:<9}{s['runs']:>5}"
                         f"{fmt(s['tokens_per_s'], ',.0f'):>9}{spread:>17}{fmt(s['s_per_step'], '.2f'):>8}"
                         f"{fmt(s['tokens_per_step'], ',.0f'):>10}{fmt(s['mfu'], '.1%'):>7}"
                         f"{fmt(s['peak_gib'], '.1f'):>9}{first:>17}")
        q = row["ratio"]
        first = f"{fmt(q['first_step_s'], '.2f')} ({fmt(q['process_first_step_s'], '.2f')})"
        lines.append(f"{'':<13}{'ratio':<9}{'':>5}{fmt(q['tokens_per_s'], '.3f'):>9}{'':>17}"
                     f"{fmt(q['s_per_step'], '.3f'):>8}{fmt(q['tokens_per_step'], '.3f'):>10}"
                     f"{fmt(q['mfu'], '.3f'):>7}{fmt(q['peak_gib'], '.3f'):>9}{first:>17}")
    lines += ["", "ratio job / Unsloth, tokens/s (medians): " + "; ".join(
        f"{row['setting']}: {fmt(row['ratio']['tokens_per_s'], '.3f', 'not measured')}" for row in settings)]
    lines += ["", f"checks, per pair (job run, then the Unsloth run with its batch): tokens/step the same, "
                  f"step-1 loss within {LOSS_TOLERANCE:g}"]
    for check in checks:
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[check["ok"]]
        lines.append(f"  {mark} {check['setting']} #{check['repeat']}: {check['text']}")
    compared = [c for c in checks if c["ok"] is not None]
    failed = [c for c in compared if not c["ok"]]
    lines.append(f"checks: {len(compared) - len(failed)} of {len(checks)} pairs passed"
                 + (f", {len(failed)} FAILED" if failed else "")
                 + (f", {len(checks) - len(compared)} not compared" if len(compared) < len(checks) else ""))
    skipped = {}  # why: names
    for run in runs:
        if run["status"] in ("skipped", "pending"):
            skipped.setdefault(run.get("reason") or run["status"], []).append(run["name"])
    for why, names in skipped.items():
        lines.append(f"not run: {', '.join(names)}: {why}")
    for note in meta.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


# ---- the GPU call ----------------------------------------------------------------------------------------

class Call:
    """One GPU call: the budget's clock, the output folder and run.log."""

    def __init__(self, out: Path, budget: float):
        self.out, self.budget = out, budget
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "run.log", "a", buffering=1)

    def elapsed(self) -> float:
        return time.monotonic() - PROCESS_START

    def left(self) -> float:
        return self.budget - self.elapsed()

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():5.0f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")


def env_for(site: Path) -> dict:
    return {**os.environ, **ENV, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, float]:
    """Run cmd in the project root, output to log, in a process group of its own so that a timeout ends
    all of it (the job bench starts its recipe in a child process). Exit code 124 on timeout, as timeout(1)."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    return rc, time.monotonic() - t0


def install_sites(call: Call) -> None:
    """The job's site (/tmp/site) and Unsloth's (/tmp/site-peer), each unless already installed."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target"]
    whl, peer = ROOT / ".whl", ROOT / ".whl-peer"
    for folder in (whl, peer):
        if not any(folder.glob("*.whl")):
            raise RuntimeError(f"no wheels in {folder}: run ../shared/gpu/fetch-wheels.sh and "
                               "bench/fetch-peer-wheels.sh on the CPU machine and carry both folders")
    if not any(whl.glob("pydantic-*.whl")):  # the image has none, and job.pipeline imports job.run_files
        call.say("warning: no pydantic wheel in .whl: the job's code may not import (see this file's header)")
    if not (JOB_SITE / "trl").is_dir():
        subprocess.run(pip + [str(JOB_SITE), *map(str, sorted(whl.glob("*.whl")))], check=True)
        shutil.copytree(whl / "site", JOB_SITE, dirs_exist_ok=True)
        call.say(f"job wheels installed in {JOB_SITE}")
    if not (PEER_SITE / "unsloth").is_dir():
        shared = [w for w in sorted(whl.glob("*.whl")) if not w.name.startswith(NOT_FOR_PEER)]
        subprocess.run(pip + [str(PEER_SITE), *map(str, sorted(peer.glob("*.whl")) + shared)], check=True)
        for path in JOB_SITE.glob("bitsandbytes*"):  # the package and its dist-info, both folders
            shutil.copytree(path, PEER_SITE / path.name, dirs_exist_ok=True)
        shutil.copytree(whl / "site", PEER_SITE, dirs_exist_ok=True)
        call.say(f"Unsloth's wheels installed in {PEER_SITE}, with the job's "
                 f"{', '.join(w.name.split('-')[0] for w in shared)}, bitsandbytes and boto3")


VERSIONS = {"job": ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "liger_kernel"),
            "unsloth": ("unsloth", "unsloth_zoo", "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes",
                        "triton", "cut_cross_entropy", "xformers", "flash_attn")}


def describe_machine(call: Call) -> tuple[str, list[str]]:
    """The card and each site's versions (from package metadata: nothing imported), into gpu.txt."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = ""
    device = smi.splitlines()[0] if smi else "no GPU found by nvidia-smi"
    lines = []
    for side, site in (("job", JOB_SITE), ("unsloth", PEER_SITE)):
        code = ("import importlib.metadata as m, sys\n"
                "def v(n):\n"
                "    try:\n        return m.version(n)\n"
                "    except m.PackageNotFoundError:\n        return '-'\n"
                "print(', '.join(f'{n} {v(n)}' for n in sys.argv[1:]))")
        got = subprocess.run([sys.executable, "-c", code, *VERSIONS[side]], env=env_for(site), capture_output=True,
                             text=True)
        lines.append(f"{side}: {got.stdout.strip() or got.stderr.strip()[-300:]}")
    (call.out / "gpu.txt").write_text(f"{device}\n" + "\n".join(lines) + "\n")
    return device, lines


def make_model(call: Call, model: Path) -> float | None:
    """The bench's random-weight 7B model, made once on the GPU; seconds taken, None if it was there."""
    if (model / "config.json").is_file():
        call.say(f"model: {model} (there already)")
        return None
    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import train_throughput as b; "
            "b.make_model_in_subprocess(Path(sys.argv[1]), '7b', None)")
    rc, took = run_logged([sys.executable, "-c", code, str(model)], env_for(JOB_SITE), call.out / "run.log",
                          min(MODEL_BUILD_CAP_S, call.left() - MARGIN_S))
    if rc != 0 or not (model / "config.json").is_file():
        raise RuntimeError(f"making the model failed (exit code {rc} after {took:.0f} s; run.log)")
    call.say(f"model made in {took:.0f} s: {model}")
    return took


def join_logs(out: Path, runs: list[dict]) -> None:
    """This call's run logs, per side, into one file each (the GPU machine returns at most 8 files)."""
    for side in ("job", "unsloth"):
        with open(out / f"{side}.log", "w") as joined:
            for run in runs:
                log = LOGS / f"{run['name']}.log"
                if run["side"] == side and run["status"] in ("ok", "error") and log.is_file():
                    joined.write(f"===== {run['name']}\n")
                    joined.writelines(line for line in open(log, errors="replace") if line.strip())


def write_summary(call: Call, meta: dict, runs: list[dict]) -> str:
    meta["elapsed_s"] = call.elapsed()
    checks, settings = pair_checks(runs), by_setting(runs)
    text = render_summary(meta, runs, checks, settings)
    (call.out / "summary.txt").write_text(text)
    (call.out / "summary.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "by_setting": settings, "checks": checks}, indent=1, default=str))
    join_logs(call.out, runs)
    return text


def estimate(runs: list[dict], side: str) -> float:
    """Seconds the next run of a side needs: its side's longest run so far (5% more), else a first guess."""
    walls = [r["wall_s"] for r in runs if r["side"] == side and finite(r.get("wall_s")) and r.get("rc") != 124]
    return max(walls) * 1.05 + 5 if walls else FIRST_GUESS_S[side]


def run_one(call: Call, run: dict, model: Path, steps: int, warmup: int) -> None:
    side, out, log = run["side"], RESULTS / f"{run['name']}.json", LOGS / f"{run['name']}.log"
    out.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    if side == "job":
        cmd = [sys.executable, "bench/train_throughput.py", "--shape", "7b", "--model-dir", str(model),
               "--steps", str(steps), "--warmup", str(warmup), "--out", str(out), *SETTINGS[run["setting"]][1]]
        env = env_for(JOB_SITE)
    else:
        batch = run["batch"]
        cmd = [sys.executable, "bench/peer_unsloth.py", "--model-dir", str(model), "--name", run["name"],
               "--steps", str(steps), "--warmup", str(warmup), "--micro-batch", str(batch["micro_batch"]),
               "--packing-length", str(batch["packing_length"]), "--lora-dropout", str(SETTINGS[run["setting"]][2]),
               "--gc", batch["gc"], "--attention", "torch-varlen", "--work", str(UNSLOTH_WORK), "--out", str(out)]
        env = env_for(PEER_SITE)
    timeout = min(CAP_S, call.left() - MARGIN_S)
    call.say(f"start {run['name']} ({run['label']}, timeout {timeout:.0f} s)"
             + (f", batch {run['batch']['packing_length']} x {run['batch']['micro_batch']}, gc {run['batch']['gc']}"
                if side == "unsloth" else ""))
    rc, took = run_logged(cmd, env, log, timeout)
    result = read_result(side, out)
    status, reason = run_status(side, rc, result)
    run.update(status=status, reason=reason, rc=rc, wall_s=took, result=result)
    if side == "job" and result is not None:
        run["plan"] = unsloth_batch(result)
    if status == "ok":
        r = result
        call.say(f"end {run['name']}: {r['tokens_per_s']:,.0f} tokens/s, {fmt(r.get('tokens_per_step'), ',.0f')} "
                 f"tokens/step, peak {fmt(r.get('peak_gib'), '.1f')} GiB, step-1 loss "
                 f"{fmt(step1_loss(r), '.4f')} ({took:.0f} s)")
    else:
        call.say(f"end {run['name']}: {reason} ({took:.0f} s; last lines of its log follow)")
        for line in open(log, errors="replace").readlines()[-15:]:
            call.say("    " + line.rstrip()[:300])


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT") or "/tmp/peer-out")
    budget = float(os.environ.get("BUDGET", 540))
    steps, warmup = int(os.environ.get("STEPS", 10)), int(os.environ.get("WARMUP", 3))
    repeats = int(os.environ.get("REPEATS", 2))
    model = Path(os.environ.get("MODEL", "/tmp/peer-model-7b"))
    call = Call(out, budget)
    for folder in (RESULTS, LOGS, UNSLOTH_WORK):
        folder.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(repeats)
    meta = {"model": str(model), "steps": steps, "warmup": warmup, "repeats": repeats, "budget": budget,
            "notes": []}
    try:
        install_sites(call)
        meta["device"], meta["versions"] = describe_machine(call)
        call.say(f"{meta['device']}; " + "; ".join(meta["versions"]))
        meta["model_build_s"] = make_model(call, model)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        call.say(f"stopped before the runs: {exc}")
        meta["notes"].append(f"stopped before the runs: {exc}")
        for run in runs:
            run.update(status="skipped", reason="setup failed")
        print(write_summary(call, meta, runs))
        return 1

    stop = ""  # set when the rest cannot run
    for run in runs:
        if stop:
            run.update(status="skipped", reason=stop)
            continue
        if run["side"] == "unsloth":
            # the batch of this setting's job run just before, else of its latest job run that left a plan
            planned = [r for r in runs if r["side"] == "job" and r["setting"] == run["setting"] and r.get("plan")
                       and r["repeat"] <= run["repeat"]]
            if not planned:
                run.update(status="skipped", reason="no batch plan: this setting's job run left none")
                call.say(f"skip {run['name']}: {run['reason']}")
                continue
            run["batch"], run["batch_from"] = planned[-1]["plan"], planned[-1]["name"]
        need = estimate(runs, run["side"])
        if call.left() - MARGIN_S < need:
            run.update(status="skipped", reason=f"{call.left():.0f} s of the budget left, "
                                                f"{'a job' if run['side'] == 'job' else 'an Unsloth'} run takes "
                                                f"about {need:.0f} s")
            call.say(f"skip {run['name']}: {run['reason']}")
            continue
        run_one(call, run, model, steps, warmup)
        unsloth = [r for r in runs if r["side"] == "unsloth" and r["status"] in ("ok", "error")]
        if (run["side"] == "unsloth" and run["status"] == "error" and len(unsloth) == 1
                and "out of memory" not in run["reason"]):
            stop = f"the first Unsloth run failed ({run['reason'][:120]}): the rest would too"
            meta["notes"].append(stop)
        write_summary(call, meta, runs)
    call.say("done")
    print(write_summary(call, meta, runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
