"""Logging to stderr with timestamps, and a filter that masks secrets wherever they would appear.

Two formats, chosen by JOB_LOG_FORMAT: `text` (the default, one readable line per record) and `json`
(one JSON object per line, for log pipelines). Batch platforms (kubectl logs, CloudWatch, a RunPod
console) keep every byte a program writes, so progress bars redrawn with carriage returns become
walls of text there: bars are drawn only when stderr is a terminal and the format is text;
otherwise the train stage logs one progress line per logging step (job/progress.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from job.clock import utc_timestamp
from job.config import ENV_PREFIX, REDACTED, SECRET_KEYS, Config, redact_text, secret_values
from job.errors import ConfigError

LOG_FORMAT_ENV = "JOB_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
# Libraries that give their loggers a handler of their own when imported (writing straight to stderr,
# past our format and our secret filter; transformers also stops propagation): their records go to
# the root handler instead (LibraryLogger).
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "trl", "peft", "accelerate", "bitsandbytes")

_format = "text"  # set by setup_logging

# Credentials that may sit in the environment (never in the config file, ideally): their values are
# masked in every log line too, whatever prints them.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN",
              # botocore still reads the old name of the session token; ECS/EKS pod identity's token
              "AWS_SECURITY_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
              # experiment trackers (train.report_to)
              "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")


class SecretFilter(logging.Filter):
    def __init__(self, secrets):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        masked = redact_text(text)
        for value in self.secrets:
            masked = masked.replace(value, REDACTED)
        return masked

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:  # the formatters reuse this cached, masked text
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # structured fields of a JSON line are masked like the message
            record.fields = {k: self.mask(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, the record's
    structured `fields` (extra={"fields": {...}}: the train stage's progress numbers) and, for an
    exception, its traceback text."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": utc_timestamp(record.created, millis=True),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format(environ=os.environ) -> str:
    """JOB_LOG_FORMAT: text (default) or json; anything else is a configuration error (exit 2)."""
    value = environ.get(LOG_FORMAT_ENV, "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ConfigError(f"{LOG_FORMAT_ENV}={environ[LOG_FORMAT_ENV]!r}: unknown log format; "
                          f"use one of {', '.join(LOG_FORMATS)}")
    return value


def progress_bars() -> bool:
    """Draw progress bars only for a person watching a terminal; a log file or a JSON pipeline
    gets one line per logging step instead (job/progress.py)."""
    return _format == "text" and sys.stderr.isatty()


def json_lines(environ=os.environ) -> bool:
    """Whether a message printed outside logging (click's usage errors) must be a JSON line too: the
    JSON format is in force, or asked for, when the error came before the group set logging up."""
    return _format == "json" or environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json"


def setup_logging(level=logging.INFO, environ=os.environ) -> None:
    """Configure the root handler on stderr in the JOB_LOG_FORMAT format.

    Warnings (DeprecationWarning, FutureWarning, ...) are logged through the `py.warnings` logger
    (log_warning),
    so they get a timestamp, a level and the secret filter, and are JSON lines in json mode; so do
    the records of transformers & co. (LibraryLogger)."""
    global _format
    fmt, problem = "text", None
    try:
        fmt = log_format(environ)
    except ConfigError as exc:  # reported (exit 2) once the text handler is in place
        problem = exc
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("job").setLevel(level)
    warnings.showwarning = log_warning  # like logging.captureWarnings(True), as one line
    if problem is not None:
        raise problem
    if not progress_bars():
        # Read by huggingface_hub, transformers ("Loading weights", "Writing model shards") and
        # datasets (map, packing) when they are imported, which happens after this.
        # TQDM_DISABLE: the bars libraries draw with tqdm directly, past those switches (transformers'
        # "Converting and de-quantizing GGUF tensors" when it loads a GGUF file).
        for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(name, "1")
    adopt_library_loggers()


def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the job: a warning becomes one WARNING record of the `py.warnings`
    logger (the name logging.captureWarnings uses) naming its category and where it was raised,
    instead of two raw lines on stderr."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)


class LibraryLogger(logging.Logger):
    """The top logger of a library (transformers, datasets, ...): its records always propagate to
    the root handler, and the stderr handler the library adds to it on import is not attached.
    Installed before the library is imported, so no import of transformers (a second) is needed
    for commands that never load it."""

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's name
        pass

    @property
    def propagate(self) -> bool:
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        pass  # transformers sets False (it prints with its own handler, which is not attached)


def adopt_library_loggers() -> None:
    """Make each library's top logger a LibraryLogger; one that exists already (the library was
    imported first) loses its own handlers and propagates."""
    manager = logging.Logger.manager
    for name in LIBRARY_LOGGERS:
        existing = manager.loggerDict.get(name)
        if isinstance(existing, logging.Logger):
            existing.handlers[:] = []
            existing.propagate = True
            continue
        previous = manager.loggerClass
        manager.setLoggerClass(LibraryLogger)
        try:
            logging.getLogger(name)  # also adopts children created earlier (a PlaceHolder is fixed up)
        finally:
            manager.loggerClass = previous  # None by default: logging.getLoggerClass()


def add_secret_filter(cfg: Config | None, environ=os.environ) -> None:
    """Mask the config's secrets and the credentials in the environment in every log line.

    Called with cfg=None before the config is loaded, so that a configuration error is masked too:
    the secret config keys given as environment variables (JOB_STORAGE__SECRET_ACCESS_KEY) count."""
    secrets = (secret_values(cfg) if cfg is not None else []) + _environment_secrets(environ)
    for handler in logging.getLogger().handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, SecretFilter)]
        handler.addFilter(SecretFilter(secrets))


def _environment_secrets(environ) -> list[str]:
    names = SECRET_ENV + tuple(ENV_PREFIX + key.upper().replace(".", "__", 1) for key in SECRET_KEYS)
    return [environ.get(name, "") for name in names]


def mask_usage_error(message: str, argv: list[str], environ=os.environ) -> str:
    """click prints its usage errors itself, quoting stray arguments ("Got unexpected extra argument
    (X)"). After `--set storage.secret_access_key= X` (a space after '='), X is the secret: mask the
    argument that follows a secret key's empty --set, credentials in URLs, and the environment's secrets."""
    hidden = [value for flag, value in zip(argv, argv[1:])
              if flag.endswith("=") and flag.removeprefix("--set=")[:-1].strip() in SECRET_KEYS]
    return SecretFilter(hidden + _environment_secrets(environ)).mask(message)
