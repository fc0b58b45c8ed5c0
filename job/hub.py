"""Hugging Face Hub sources: hf://ORG/NAME[@REVISION] models and hf://datasets/ORG/NAME[@REVISION] data.

Files come through huggingface_hub.snapshot_download into the job's cache (model.cache_dir or
$JOB_CACHE_DIR, under hub/), in the hub's own cache layout: a restart finds the finished snapshot and
downloads nothing, an interrupted download resumes its partial files, and HF_HUB_OFFLINE=1 reads a
pre-filled cache without a network call. The token is huggingface_hub's business (HF_TOKEN, or the
file `hf auth login` writes): the job never reads, passes or writes it, and job/logs.py masks it.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is first imported: it is imported
here lazily, in the job's own process, so the environment the job starts with is the one that counts.

Exit codes: an unknown repo or revision, a gated or private repo without a usable token, or an offline
cache that lacks the files are bad input (2); a hub that cannot be reached after storage.max_attempts
tries is a storage failure (3).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path

from job.errors import InputError, StorageError
from job.hub_uri import HubRef, is_hf_uri, parse_hf_uri

log = logging.getLogger("job.hub")

# What loading a model needs: config and tokenizer files (json, sentencepiece, tiktoken, BPE merges,
# chat templates) and safetensors weights. Pickled .bin/.pth weights and the original/ consolidated
# checkpoint that Llama repos carry (the same weights again) are never fetched.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
MODEL_IGNORE = ["original/*", "*.bin", "*.pth", "*.pt", "*.ckpt", "*.msgpack", "*.h5", "*.onnx*", "*.gguf"]
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache(cache_root: Path) -> Path:
    return Path(cache_root) / "hub"


def download(ref: HubRef, cache_root: Path, *, allow_patterns: list[str], ignore_patterns: list[str] | None = None,
             max_attempts: int = 10, key: str = "model.uri") -> Path:
    """The snapshot folder (named by its commit sha) holding the repo's files matching the patterns."""
    import httpx2
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from job.storage import RETRY_BASE_SECONDS, RETRY_MAX_SECONDS, download_space  # the storage layer's backoff

    _quiet_progress_bars()
    cache = hub_cache(cache_root)
    jitter = random.Random()  # not the global generator, whose state training checkpoints
    for attempt in range(1, max_attempts + 1):
        try:
            with download_space(cache / ref.repo_id, ref.uri):  # a full cache disk: exit 3 naming it, no retries
                folder = snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                           cache_dir=cache, allow_patterns=allow_patterns,
                                           ignore_patterns=ignore_patterns)
            return Path(folder)
        except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
            raise InputError(f"{key} {ref.uri}: the repo is gated and this job has no access. Accept its license "
                             f"on https://huggingface.co/{_page(ref)} with your account, then set HF_TOKEN to a "
                             "token of that account (read access) in the job's environment") from None
        except RevisionNotFoundError:
            raise InputError(f"{key} {ref.uri}: the repo has no revision {ref.revision!r}; use a branch, tag or "
                             "commit sha that exists (or drop @REVISION for the default branch)") from None
        except RepositoryNotFoundError:
            raise InputError(f"{key} {ref.uri}: no such repo on {constants.ENDPOINT}, or it is private: check the "
                             "name, and for a private repo set HF_TOKEN to a token with read access") from None
        except LocalEntryNotFoundError as exc:
            if constants.HF_HUB_OFFLINE:
                raise InputError(f"{key} {ref.uri}: HF_HUB_OFFLINE=1 and the files are not in the cache "
                                 f"{cache}; run once with network access (or unset HF_HUB_OFFLINE)") from None
            problem = exc  # the hub could not be reached and the cache cannot stand in: retry
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise InputError(f"{key} {ref.uri}: access denied (HTTP {status}); set HF_TOKEN to a token "
                                 "with read access to this repo") from None
            if status is not None and status < 500 and status not in (408, 429):
                raise InputError(f"{key} {ref.uri}: the hub refused the request (HTTP {status}): "
                                 f"{_first_line(exc)}") from None
            problem = exc
        except (httpx2.TransportError, OSError) as exc:  # refused, reset, timed out, a cut body
            problem = exc
        if attempt < max_attempts:
            delay = jitter.random() * min(RETRY_BASE_SECONDS * 2 ** (attempt - 1), RETRY_MAX_SECONDS)
            log.warning("%s %s: the hub failed (%s); attempt %d of %d again in %.1f s", key, ref.uri,
                        _first_line(problem), attempt + 1, max_attempts, delay)
            time.sleep(delay)
    raise StorageError(f"{key} {ref.uri}: the hub at {constants.ENDPOINT} could not be reached after {max_attempts} "
                       f"attempts ({_first_line(problem)}); the partial download is kept and a rerun resumes it")


def fetch_model(uri: str, cache_root: Path, max_attempts: int = 10, key: str = "model.uri") -> Path:
    """A local folder with the model files of hf://ORG/NAME[@REVISION] (downloaded once, then reused)."""
    ref = parse_hf_uri(uri, key)
    log.info("%s %s: fetching %s from the hub into %s", key, uri, "the default branch" if ref.revision is None
             else f"revision {ref.revision}", hub_cache(cache_root))
    folder = download(ref, cache_root, allow_patterns=MODEL_PATTERNS, ignore_patterns=MODEL_IGNORE,
                      max_attempts=max_attempts, key=key)
    log.info("%s %s: commit %s", key, uri, folder.name)
    return folder


def revision_identity(uri: str, cache_root: Path, timeout: float = 10.0) -> dict | None:
    """{"commit": sha} that hf://...[@REVISION] names now, for the stage fingerprints (job/stages/__init__.py):
    a branch that moved makes the stage stale in `job plan` and `job run`. A commit sha is its own answer;
    with HF_HUB_OFFLINE=1 the ref the cache recorded answers; otherwise one metadata request. None when it
    cannot be known now (the hub is down, no access) and the cache has no commit for it: the pipeline then
    keeps what the marker recorded.

    A hub that does not answer (a 503, a timeout) while the cache holds the revision: the stage will run
    from that cached commit (huggingface_hub falls back to it), so that commit is the identity, with a
    warning; recording "unknown" would call the run stale once the hub is back."""
    try:
        ref = parse_hf_uri(uri)
    except InputError:
        return None
    if ref.revision and _COMMIT.fullmatch(ref.revision):
        return {"commit": ref.revision}
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        return None
    cached = _cached_commit(ref, cache_root)
    if constants.HF_HUB_OFFLINE:
        return {"commit": cached} if cached else None
    try:
        info = HfApi().repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision, timeout=timeout)
        return {"commit": info.sha} if info.sha else None
    except Exception as exc:  # noqa: BLE001 - unknown is an answer here; the stage reports the real error when it runs
        if cached and _unreachable(exc):
            log.warning("%s: the hub did not answer (%s); using the commit the cache holds for %s: %s (the run "
                        "records it; pin @%s to keep it when the hub is back)", uri, _first_line(exc),
                        ref.revision or "the default branch", cached, cached)
            return {"commit": cached}
        return None


def _cached_commit(ref: HubRef, cache_root: Path) -> str | None:
    """The commit the hub cache recorded for the revision (refs/<branch or tag>), if any."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    path = hub_cache(cache_root) / repo_folder_name(repo_id=ref.repo_id, repo_type=ref.repo_type) / "refs" / (
        ref.revision or constants.DEFAULT_REVISION)
    try:
        commit = path.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _unreachable(exc: BaseException) -> bool:
    """The hub is down or unreachable (5xx, 408, 429, a transport error), as opposed to a refusal (401,
    404: the repo or revision is gone or private, which the stage reports when it runs)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status >= 500 or status in (408, 429)
    return True  # timeouts, refused connections


def resolved_revision(uri: str, folder: Path) -> str | None:
    """The commit sha a hub download resolved to (its snapshot folder's name); None for other URIs."""
    if not is_hf_uri(uri):
        return None
    return folder.name if _COMMIT.fullmatch(folder.name) else None


def _page(ref: HubRef) -> str:
    return f"datasets/{ref.repo_id}" if ref.repo_type == "dataset" else ref.repo_id


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _quiet_progress_bars() -> None:
    """The hub's messages through the job's log handlers only (secret masking, JSON lines), not also
    through the plain stderr handler huggingface_hub adds to its logger; no redrawn download bars in a
    batch job's log (the job logs what it fetches), while a terminal keeps them."""
    import sys

    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)
    if not sys.stderr.isatty() and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
