"""hf://ORG/NAME[@REVISION] and hf://datasets/ORG/NAME[@REVISION]: the URI syntax alone, so that the
config can check a URI without importing the download machinery (job/hub.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from job.errors import InputError

SCHEME = "hf://"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_URI = re.compile(rf"hf://(?P<datasets>datasets/)?(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^@\s]+))?/?")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str | None  # None: the repo's default branch

    @property
    def uri(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        return f"{SCHEME}{kind}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hf_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse_hf_uri(uri: str, key: str = "model.uri") -> HubRef:
    match = _URI.fullmatch(uri)
    if not match:
        example = "hf://datasets/ORG/NAME[@REVISION]" if uri.startswith(f"{SCHEME}datasets/") else "hf://ORG/NAME[@REVISION]"
        raise InputError(f"{key}: {uri!r} is not a Hugging Face Hub URI; expected {example}, "
                         "e.g. hf://meta-llama/Llama-2-7b-hf or hf://datasets/stanfordnlp/snli@main")
    return HubRef(match["repo"], "dataset" if match["datasets"] else "model", match["revision"])
