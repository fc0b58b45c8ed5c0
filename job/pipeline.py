"""Stages, fingerprints and markers: run what is missing, skip what is done, refuse to mix results.

Each stage declares the config keys it depends on and the stages whose outputs it reads. Its
fingerprint hashes those config values, the upstream fingerprints and the job version. When a stage
finishes, `_stages/<stage>.json` is written last (after every output), so a marker means "complete".
When a stage writes its first byte into the run (job/stage_store.py), `_stages/<stage>.started.json`
records the fingerprint: partial outputs (train checkpoints) are reused by a rerun with the same
settings and refused, naming the changed keys, when the settings differ, unless the user forces the
stage. A stage that failed before writing anything leaves no `.started` marker, so a rerun with
corrected input is not refused.

Nothing is deleted or rewritten before the new input is known to be good: config.yaml is written,
and a forced stage's old results (and every later stage's) are cleared, only at that first write,
after the stage has read and checked its inputs. Every stale stage is refused before anything runs.

In a multi-GPU run (job/distributed.py) only rank 0 runs the pipeline: it decides, runs the
single-process stages and writes every marker. A stage declared `all_ranks` (train) runs on every
rank: the other ranks wait in `RankProtocol.wait` and run what rank 0 announces just before the stage
starts (`run_announced`); the runner ends them with rank 0's exit code (job/distributed.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import job
from job import layout, memory_plan, peaks
from job.clock import utc_timestamp
from job.config import Config, get_key, redact_text, to_dict, to_yaml
from job.distributed import SINGLE, RankProtocol, Ranks
from job.errors import ConfigError, InputError, Preempted, StaleStageError
from job.input_identity import describe
from job.memory import out_of_memory
from job.platform import free_gpu_memory
from job.run_files import folder_in_place, marker_schema, read_run_json
from job.stage_store import StageStore
from job.storage import Store

log = logging.getLogger("job.pipeline")

@dataclass
class Stage:
    name: str
    run: Callable[[Config, "Context"], dict]
    config_keys: tuple[str, ...]
    """Sections ("train") or keys ("data.uri") whose values change this stage's result."""
    ignore: tuple[str, ...] = ()
    """Keys under config_keys that do not change the result (how often to log or checkpoint)."""
    needs: tuple[str, ...] = ()
    """Upstream stages whose outputs this stage reads."""
    outputs: tuple[str, ...] = ()
    """Paths under run_uri this stage writes (cleared when it is rerun with other settings)."""
    enabled: Callable[[Config], bool] = lambda cfg: True
    disabled_reason: str | Callable[[Config], str] = ""
    """The key that disables the stage, as `key: false` (a function of the config when several can)."""
    all_ranks: bool = False
    """Runs on every process of a multi-GPU run (data-parallel training), not on rank 0 alone."""
    inputs: Optional[Callable[[Config], dict]] = None
    """{"data.uri": identity or None} of the files outside the run it reads (job/input_identity.py):
    part of the fingerprint, so the same URI with other content makes the stage stale."""

    def reason(self, cfg: Config) -> str:
        """Why the stage is disabled: `key: false`."""
        return self.disabled_reason(cfg) if callable(self.disabled_reason) else self.disabled_reason


@dataclass
class Context:
    """What a stage gets besides the config: where to write, a scratch folder, upstream results."""

    store: Store
    work_dir: Path
    fingerprint: str
    upstream: dict = field(default_factory=dict)
    """name -> marker of every stage this one needs."""
    log: logging.Logger = log
    stop: Optional[object] = None
    """A job.platform.StopRequest the train stage polls (SIGTERM -> checkpoint -> exit 75)."""
    ranks: Ranks = SINGLE
    """This process's place in a multi-GPU run; only `ranks.is_main` may write to the store."""

    phases: dict = field(default_factory=dict)
    """Phase name -> seconds, filled by `timer` and recorded in the stage's marker as `phase_seconds`."""
    memory: dict = field(default_factory=dict)
    """The marker's `memory`: "plan" (this stage's line of job/memory_plan.py; the train stage sets it
    after the model download) and "measured" (its peaks, job/peaks.py)."""
    started: float = field(default_factory=time.monotonic)

    @contextmanager
    def timer(self, phase: str) -> Iterator[None]:
        """Time the body as one phase of the stage (seconds add up when a phase runs twice)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[phase] = round(self.phases.get(phase, 0.0) + time.monotonic() - t0, 3)

    def seconds(self, phase: str) -> float:
        """A finished phase's seconds (for the stage's metrics), rounded for people."""
        return round(self.phases.get(phase, 0.0), 2)

    def elapsed(self) -> float:
        """Seconds since the stage started."""
        return round(time.monotonic() - self.started, 2)

    @property
    def work_root(self) -> Path:
        """The job's work folder on this machine, which holds every stage's `work_dir` (job/layout.py)."""
        return self.work_dir.parent


@dataclass
class Status:
    stage: str
    state: str  # done | pending | stale | disabled
    reason: str = ""
    fingerprint: str = ""
    changed: list = field(default_factory=list)


def flat_config(cfg: Config, keys: tuple[str, ...], ignore: tuple[str, ...] = ()) -> dict:
    """{"train.lora_r": 64, ...} for every key under the given sections/keys, secrets redacted."""
    flat = {}
    for key in keys:
        value = get_key(cfg, key)
        if hasattr(value, "__dataclass_fields__"):
            for name, item in to_dict(value).items():
                flat[f"{key}.{name}"] = item
        else:
            flat[key] = redact_text(value) if isinstance(value, str) else value
    return {k: _same_uri(k, v) for k, v in flat.items() if k not in ignore}


def _same_uri(key: str, value):
    """'s3://b/model/' and 's3://b/model' name the same thing: a trailing slash changes no fingerprint.
    hf://ORG/NAME@REVISION counts by the commit it names (the stage's input identity, job/hub.py), not by how
    it is spelled: no revision, @main and @<sha> of the same commit are the same input."""
    from job.hub_uri import is_hf_uri

    if isinstance(value, str) and key.endswith("uri") and is_hf_uri(value):
        return value.split("@", 1)[0].rstrip("/")
    stripped = value.rstrip("/") if key.endswith("uri") and isinstance(value, str) else ""
    return stripped if stripped and not stripped.endswith(":") else value  # "/" and "s3://" stay


def fingerprint(stage: Stage, cfg: Config, upstream: dict[str, str], inputs: Optional[dict] = None) -> str:
    payload = {"config": flat_config(cfg, stage.config_keys, stage.ignore), "upstream": upstream,
               "version": job.__version__}
    if inputs:  # absent for stages without outside inputs: their fingerprints stay as they were
        payload["inputs"] = inputs
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    def __init__(self, stages: list[Stage], cfg: Config, store: Store, work_dir: Path, stop=None,
                 ranks: Ranks = SINGLE, protocol: Optional[RankProtocol] = None):
        self.stop = stop
        self.ranks = ranks
        self.protocol = protocol or RankProtocol(ranks)
        """How rank 0 brings the other ranks of a multi-GPU run along (job/distributed.py)."""
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.cfg = cfg
        self.store = store
        self.work_dir = Path(work_dir)
        self.forced: tuple[str, ...] = ()
        self._identities: dict[str, dict] = {}
        """The forced stage and every stage after it: their markers no longer count."""
        self._config_recorded = False
        self._layout_checked = False

    # -- markers -------------------------------------------------------------------------------

    def marker(self, name: str, started: bool = False) -> Optional[dict]:
        """The stage's marker, checked against its schema (job/run_files.py): a damaged one is exit 2
        naming the file and `--force <stage>`; None when there is none."""
        return read_run_json(self.store, layout.marker(name, started), name, marker_schema(name),
                             remedy="to redo the stage (and the stages after it)")

    def _write_marker(self, name: str, record: dict, started: bool = False) -> None:
        self.store.write_text(layout.marker(name, started), json.dumps(record, indent=2, default=str) + "\n")

    # -- status --------------------------------------------------------------------------------

    def status(self) -> list[Status]:
        """Every stage's state without running anything (what `job plan` prints)."""
        if not self._layout_checked:
            # A file where the markers' folder belongs hides every marker: each stage would look "not run
            # yet", and the first marker write would fail only after the stage's work.
            if self.store.exists(layout.MARKERS):
                raise InputError(f"{self.store.uri_of(layout.MARKERS)} is a file, where the run keeps its stage "
                                 "markers (a folder); it was changed outside the job. Restore the folder, or move "
                                 "the file away and rerun (the stages then run again)")
            self._layout_checked = True
        result, fps = [], {}
        for name in self.order:
            stage = self.stages[name]
            if not stage.enabled(self.cfg):
                result.append(Status(name, "disabled", stage.reason(self.cfg)))
                continue
            upstream = {n: fps.get(n, "") for n in stage.needs if self.stages[n].enabled(self.cfg)}
            fp = fingerprint(stage, self.cfg, upstream, self._inputs(stage))
            fps[name] = fp
            result.append(self._status_of(stage, fp, upstream))
        return result

    def _inputs(self, stage: Stage) -> Optional[dict]:
        """The identity of the stage's outside inputs, looked up once per process (one stat or HEAD).
        Where one cannot be known now (the file is gone, the endpoint is down), what the stage's marker
        recorded stands in: a finished stage stays done without its input, and one that has to run
        fails on that input with the real error."""
        if stage.inputs is None:
            return None
        if stage.name not in self._identities:
            self._identities[stage.name] = stage.inputs(self.cfg)
        current = dict(self._identities[stage.name])
        unknown = [k for k, v in current.items() if v is None]
        if unknown:
            recorded = {}
            for record in (self.marker(stage.name), self.marker(stage.name, started=True)):
                if record is not None and stage.name not in self.forced:
                    recorded = record.get("inputs") or {}
                    break
            for key in unknown:
                current[key] = recorded.get(key)
        return current

    def _status_of(self, stage: Stage, fp: str, upstream: dict) -> Status:
        if stage.name in self.forced:
            return Status(stage.name, "pending", "forced", fp)
        done = self.marker(stage.name)
        started = self.marker(stage.name, started=True)
        for record, what in ((done, "finished"), (started, "partial")):
            if record is None:
                continue
            if record.get("fingerprint") == fp:
                if what == "finished":
                    return Status(stage.name, "done", f"finished {record.get('finished_at', '')}".strip(), fp)
                continue
            changed = self._changed(stage, record, upstream)
            return Status(stage.name, "stale", f"{what} results were made with other settings: "
                          + "; ".join(changed), fp, changed)
        if started is not None:
            return Status(stage.name, "pending", "partial results exist and will be reused (resume)", fp)
        return Status(stage.name, "pending", "not run yet", fp)

    def _changed(self, stage: Stage, record: dict, upstream: dict) -> list[str]:
        old, new = record.get("config", {}), flat_config(self.cfg, stage.config_keys, stage.ignore)
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
        for key, identity in (self._inputs(stage) or {}).items():
            was = (record.get("inputs") or {}).get(key)
            if was != identity:
                changed.append(f"{key} content changed ({describe(was)} -> {describe(identity)})")
        for name, fp in upstream.items():
            if record.get("upstream", {}).get(name) != fp:
                changed.append(f"stage {name} changed")
        if record.get("version") != job.__version__:
            changed.append(f"job version {record.get('version')} -> {job.__version__}")
        return changed or ["fingerprint differs"]

    # -- running -------------------------------------------------------------------------------

    def run(self, selected: Optional[list[str]] = None, force: Optional[str] = None) -> dict[str, dict]:
        """Run the selected stages in order (all by default). Returns name -> marker. In a multi-GPU
        run the caller (job/runner.py) ends the waiting ranks afterwards: `protocol.ending()`."""
        selected = list(selected or self.order)
        for name in selected + ([force] if force else []):
            if name not in self.stages:
                raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(self.order)}")
        if force and force not in selected:
            raise ConfigError(f"--force {force}: stage {force} is not among the stages to run ({', '.join(selected)});"
                              f" add it to --stages")
        if force and not self.stages[force].enabled(self.cfg):
            # Forcing clears the stage's results and every later stage's: a disabled stage would rebuild
            # none of them (its old export/ or merged/ deleted, exit 0). Refused before anything is touched.
            reason = self.stages[force].reason(self.cfg)
            raise ConfigError(f"--force {force}: stage {force} is disabled ({reason}): its results and the later "
                              f"stages' would be deleted and nothing would redo them. Nothing was changed; set "
                              f"{reason.split(':')[0]}=true (--set {reason.split(':')[0]}=true) to redo it")
        if force:
            # Forcing a stage invalidates it and every stage after it, selected or not: their
            # results were built on what is about to be replaced. They are deleted only when the
            # forced stage writes its first byte (`_begin_writing`), after it has checked its inputs.
            self.forced = tuple(self.order[self.order.index(force):])

        results: dict[str, dict] = {}
        statuses = {s.stage: s for s in self.status()}
        # Refuse before running anything: an earlier stage must not redo its work (and rewrite the run)
        # for a pipeline that stops at a later stage anyway.
        for name in selected:
            if statuses[name].state == "stale":
                raise StaleStageError(
                    f"stage {name}: {statuses[name].reason}. Refusing to mix results; rerun with "
                    f"--force {name} to redo it (and the stages after it), or use another run_uri.")
        # Every stage still to run must fit this machine: refused here, before anything runs, when the
        # model is on this machine already (else by the train stage, right after the download).
        self.check_memory([n for n in selected if statuses[n].state != "done"])
        for name in self.order:
            stage, status = self.stages[name], statuses[name]
            if status.state == "disabled":
                if name in selected:
                    log.info("stage %s: skipped (%s)", name, status.reason)
                continue
            if name not in selected:
                if status.state == "done":
                    results[name] = self.marker(name)
                continue
            missing = [n for n in stage.needs if self.stages[n].enabled(self.cfg) and n not in results]
            if missing:
                raise ConfigError(f"stage {name} needs the results of {', '.join(missing)}: run "
                                  f"`job run --stages {','.join(missing + [name])}` (or `job run`)")
            if status.state == "stale":
                raise StaleStageError(
                    f"stage {name}: {status.reason}. Refusing to mix results; rerun with "
                    f"--force {name} to redo it (and the stages after it), or use another run_uri.")
            if status.state == "done":
                log.info("stage %s: done already (fingerprint %s), skipping", name, status.fingerprint)
                results[name] = self.marker(name)
                continue
            if self.stop is not None and self.stop.is_set():
                raise Preempted(f"stopped by SIGTERM before stage {name}; finished stages are kept, rerun to go on")
            results[name] = self._run_stage(stage, {n: results[n] for n in stage.needs if n in results})
            statuses = {s.stage: s for s in self.status()}  # downstream fingerprints depend on this one
        return results

    # -- the other ranks of a multi-GPU run ------------------------------------------------------

    def run_announced(self, word: dict) -> None:
        """Ranks other than 0: run the all-ranks stage rank 0 announced (`RankProtocol.wait` calls this
        for each word). Rank 0 alone decides, checks and writes markers; this rank only runs the stage."""
        stage = self.stages[word["stage"]]
        work_dir = layout.stage_work_dir(self.work_dir, stage.name)
        work_dir.mkdir(parents=True, exist_ok=True)
        log.info("stage %s: running on %s (fingerprint %s)", stage.name, self.ranks, word["fingerprint"])
        ctx = Context(store=StageStore(self.store, hidden=tuple(word.get("hidden", ()))), work_dir=work_dir,
                      fingerprint=word["fingerprint"], upstream=word["upstream"],
                      log=logging.getLogger(f"job.{stage.name}"), stop=self.stop, ranks=self.ranks)
        with out_of_memory(stage.name):
            stage.run(self.cfg, ctx)
        free_gpu_memory()  # this process only waits from here on; rank 0 may merge on a GPU

    # -- memory ------------------------------------------------------------------------------------

    def memory_plan(self, stages: list[str]):
        """(plans, machine) for these stages, or None while the model is not on this machine yet."""
        model_dir = memory_plan.local_model_dir(self.cfg)
        if model_dir is None:
            return None
        return memory_plan.plan_for(self.cfg, model_dir, stages, gpu=stages != ["format"])

    def _memory_plan(self, name: str) -> Optional[dict]:
        planned = self.memory_plan([name])
        return planned[0][0].record() if planned else None

    def check_memory(self, selected: list[str]) -> None:
        """Log the plan of every stage still to run and refuse (exit 2) if one cannot fit; when the model
        is not on this machine yet, the train stage does this once it has downloaded it."""
        todo = [n for n in memory_plan.run_stages(self.cfg) if n in selected]
        planned = self.memory_plan(todo) if todo else None
        if planned is None:
            if todo:
                log.info("memory plan: once the model is downloaded (the train stage)")
            return
        for line in memory_plan.format_plan(*planned):
            log.info("%s", line)
        memory_plan.refuse_unless_fits(*planned, self.cfg.model.uri)

    def _clear_forced(self) -> None:
        """Delete the results of the forced stage and every stage after it: all markers first (a crash
        mid-way leaves no marker claiming a result that is half gone), then the outputs."""
        # exists(), not marker(): a damaged marker (or a folder in its place) is what --force repairs
        names = [n for n in self.forced if any(self.store.exists(m) or folder_in_place(self.store, m)
                                               for m in (layout.marker(n), layout.marker(n, started=True)))]
        if not names:
            return
        log.info("forced: clearing the earlier results of %s (%s)", ", ".join(names),
                 ", ".join(o for n in names for o in self.stages[n].outputs))
        for name in names:
            self.store.delete(layout.marker(name))
        for name in names:
            for output in self.stages[name].outputs:
                self.store.delete(output)
            self.store.delete(layout.marker(name, started=True))

    def _begin_writing(self, stage: Stage, started_record: dict) -> None:
        """Called once, at the stage's first write into the run: its inputs were read and checked."""
        if not self._config_recorded:
            # The run folder describes the settings its results are made with: written only now, never
            # by a run that was refused or failed on its input.
            self.store.write_text(layout.CONFIG, to_yaml(self.cfg))
            self._config_recorded = True
        if stage.name in self.forced:
            self._clear_forced()
            self.forced = ()
            previous = None
        else:
            previous = self.marker(stage.name, started=True)
        if previous is None or previous.get("fingerprint") != started_record["fingerprint"]:
            self._write_marker(stage.name, started_record, started=True)

    def _run_stage(self, stage: Stage, upstream_markers: dict) -> dict:
        upstream = {n: m["fingerprint"] for n, m in upstream_markers.items()}
        inputs = self._inputs(stage)
        fp = fingerprint(stage, self.cfg, upstream, inputs)
        record = {"stage": stage.name, "fingerprint": fp, "version": job.__version__, "upstream": upstream,
                  "config": flat_config(self.cfg, stage.config_keys, stage.ignore)}
        if inputs:
            record["inputs"] = inputs
        work_dir = layout.stage_work_dir(self.work_dir, stage.name)
        work_dir.mkdir(parents=True, exist_ok=True)
        log.info("stage %s: running (fingerprint %s)", stage.name, fp)
        t0, started_at = time.monotonic(), utc_timestamp()
        # A forced stage must not read its own old outputs (train would resume from old checkpoints).
        hidden = stage.outputs if stage.name in self.forced else ()
        store = StageStore(self.store, lambda: self._begin_writing(stage, {**record, "started_at": started_at}),
                           hidden=hidden)
        ctx = Context(store=store, work_dir=work_dir, fingerprint=fp, upstream=upstream_markers,
                      log=logging.getLogger(f"job.{stage.name}"), stop=self.stop, ranks=self.ranks)
        ctx.memory["plan"] = self._memory_plan(stage.name)
        announce = self.protocol.all_ranks if stage.all_ranks else nullcontext  # the others hear of all-ranks stages
        with announce({"stage": stage.name, "fingerprint": fp, "upstream": upstream_markers, "hidden": list(hidden)}):
            # exit 5 naming the stage and the setting to change, no traceback; peaks measured either way
            with out_of_memory(stage.name), peaks.measured(ctx.memory.setdefault("measured", {})):
                metrics = stage.run(self.cfg, ctx) or {}
        store._commit()  # a stage that wrote nothing still replaces what a forced run cleared
        record.update(started_at=started_at, finished_at=utc_timestamp(),
                      seconds=round(time.monotonic() - t0, 3), phase_seconds=ctx.phases, memory=ctx.memory,
                      metrics=metrics)
        self._write_marker(stage.name, record)  # last: the marker is the proof of completion
        log.info("stage %s: done in %.1f s", stage.name, record["seconds"])
        return record
