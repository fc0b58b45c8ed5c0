"""Logging to stderr with timestamps, and a filter that masks secrets wherever they would appear."""

from __future__ import annotations

import logging
import os
import sys

from job.config import ENV_PREFIX, REDACTED, SECRET_KEYS, Config, redact_text, secret_values

# Credentials that may sit in the environment (never in the config file, ideally): their values are
# masked in every log line too, whatever prints them.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN",
              # botocore still reads the old name of the session token; ECS/EKS pod identity's token
              "AWS_SECURITY_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN")


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
        return True


def setup_logging(level=logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("job").setLevel(level)


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
