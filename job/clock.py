"""The one timestamp format of the job: UTC, ISO 8601, second resolution (markers, LATEST, the lease,
reports), or millisecond resolution for JSON log lines."""

from __future__ import annotations

import time
from typing import Optional


def utc_timestamp(seconds: Optional[float] = None, millis: bool = False) -> str:
    """2026-11-29T16:39:04Z for `seconds` since the epoch (now by default); 2026-11-29T16:39:04.083Z with millis."""
    seconds = time.time() if seconds is None else seconds
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{int(seconds * 1000) % 1000:03d}Z" if millis else f"{text}Z"
