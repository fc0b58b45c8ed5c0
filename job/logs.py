"""Logging to stderr with timestamps, and a filter that masks secrets wherever they would appear."""

from __future__ import annotations

import logging
import os
import sys

from job.config import REDACTED, Config, redact_text, secret_values

# Credentials that may sit in the environment (never in the config file, ideally): their values are
# masked in every log line too, whatever prints them.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN")


class SecretFilter(logging.Filter):
    def __init__(self, secrets):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact_text(message)
        for value in self.secrets:
            masked = masked.replace(value, REDACTED)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def setup_logging(level=logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("job").setLevel(level)


def add_secret_filter(cfg: Config, environ=os.environ) -> None:
    secrets = secret_values(cfg) + [environ.get(name, "") for name in SECRET_ENV]
    for handler in logging.getLogger().handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, SecretFilter)]
        handler.addFilter(SecretFilter(secrets))
