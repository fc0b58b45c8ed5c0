"""merged/ on this machine, for the stages that read the merge's result (evaluate, export).

A run folder on this machine (a local run_uri) holds the only copy: the merge moved its files in, and
later stages read them there. For a run in S3 the merge stage leaves the model it uploaded in its work
folder, stamped with its fingerprint once the upload is complete. A later stage on the same machine,
reading that very result, uses it instead of downloading merged/ again (13 GB for a 7B); anywhere else
merged/ is downloaded and checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from job.layout import MERGED, local_merged, local_merged_stamp
from job.model_files import check_model_folder
from job.run_files import download_run_folder
from job.storage import redact_uri


def forget_local_merged(work_root: Path) -> None:
    """The merge stage starts: its local copy no longer stands for any result until it is stamped again."""
    local_merged_stamp(work_root).unlink(missing_ok=True)


def stamp_local_merged(work_root: Path, fingerprint: str) -> None:
    """The merge stage has uploaded merged/ from local_merged(work_root): stamp it with the merge's fingerprint."""
    local_merged_stamp(work_root).write_text(fingerprint)


def merged_folder(ctx, merge_marker: dict) -> Path:
    """merged/ on local disk: the run's own when the run is a folder on this machine, the merge stage's
    own folder when it ran here for this very result, else a fresh download from the run; checked (a
    merged/ changed after the merge, a truncated shard or a missing file, ends in exit 2, not a traceback)."""
    folder = ctx.store.local_folder(MERGED)
    if folder is None or not folder.is_dir():  # else the run is a folder on this machine: read merged/ there
        stamp, local = local_merged_stamp(ctx.work_root), local_merged(ctx.work_root)
        if stamp.is_file() and stamp.read_text().strip() == merge_marker["fingerprint"] and local.is_dir():
            return local
        folder = ctx.work_dir / MERGED
        shutil.rmtree(folder, ignore_errors=True)
        ctx.log.info("%s: downloading %s/ from the run (the merge ran elsewhere or earlier)",
                     ctx.log.name.rpartition(".")[2], MERGED)
        download_run_folder(ctx.store, MERGED, folder, "merge")
    check_model_folder(folder, redact_uri(ctx.store.uri_of(MERGED)), what=f"{MERGED}/",
                       remedy="rerun with --force merge to write it again (and redo the stages after it)")
    return folder
