#!/usr/bin/env bash
# The wheels for the Unsloth side of the peer benchmark (bench/peer_compare.py, bench/peer_unsloth.py):
# unsloth 2026.10.9, unsloth_zoo 2026.10.9, trl 1.15.0, datasets 4.8.5 and cut_cross_entropy 25.1.1, for
# x86-64 CPython 3.12 (the GPU machine), downloaded into DEST (default .whl-peer). Run on the CPU machine,
# in the project root, after the job's wheels (.whl, ../shared/gpu/fetch-wheels.sh):
#   bash bench/fetch-peer-wheels.sh
# Keep DEST out of git (it is not for commits, and the GPU call carries it by name):
#   echo /.whl-peer/ >> .git/info/exclude
#
# trl 1.15.0 and datasets 4.8.5 are what unsloth 2026.10.9 pins (trl<=1.15.0, datasets<5), older than the
# job's (trl 1.16, datasets 5.2): on the GPU machine they go into a site folder of their own (/tmp/site-peer).
# Unsloth's declared dependencies that the run does not use are not fetched (torchao, tyro, pydantic's own
# pin, diffusers, hf_transfer, msgspec, json5, structlog, nest-asyncio); xformers and flash-attn neither.
#
# .whl, .whl-peer and the project must fit one 64 MiB working tree, so the two Unsloth wheels are trimmed:
#   unsloth      without studio/ (the web UI, about 26 MB) and unsloth_cli/         28.6 MB -> 1.9 MB
#   unsloth_zoo  without unsloth_zoo/mlx/ (Apple only) except __init__.py and runtime.py (imported
#                on every platform)                                                    2.9 MB -> 2.0 MB
# Nothing on the CUDA path is removed. Each trimmed wheel gets a new RECORD (sha256 and size of every kept
# file), so pip installs it as usual; the unsloth wheel still declares its `unsloth` console script
# (unsloth_cli), which nothing here runs. On a second run pip sees that the two trimmed wheels differ from
# the index's, downloads them again, and they are trimmed again.
set -euo pipefail
dest=${DEST:-.whl-peer}
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$dest" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 cut_cross_entropy==25.1.1
python3 - "$dest" <<'PY'
import base64
import csv
import hashlib
import io
import os
import sys
import zipfile

dest = sys.argv[1]
KEEP_MLX = {"unsloth_zoo/mlx/__init__.py", "unsloth_zoo/mlx/runtime.py"}
RULES = {  # wheel: which entries to drop
    "unsloth-2026.10.9-py3-none-any.whl": lambda n: n.startswith(("studio/", "unsloth_cli/")),
    "unsloth_zoo-2026.10.9-py3-none-any.whl": lambda n: n.startswith("unsloth_zoo/mlx/") and n not in KEEP_MLX,
}


def trim(path, drop):
    with zipfile.ZipFile(path) as src:
        infos = src.infolist()
        record = next(i for i in infos if i.filename.endswith(".dist-info/RECORD"))
        dropped = [i for i in infos if drop(i.filename)]
        if not dropped:
            print(f"{os.path.basename(path)}: already trimmed")
            return
        rows, tmp = [], path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in infos:  # every kept entry as it was (name, date, mode)
                if info is record or drop(info.filename):
                    continue
                data = src.read(info)
                dst.writestr(info, data, compresslevel=9)
                if not info.filename.endswith("/"):
                    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                    rows.append([info.filename, "sha256=" + digest, str(len(data))])
            rows.append([record.filename, "", ""])  # RECORD lists itself without a hash
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            info = zipfile.ZipInfo(record.filename, date_time=record.date_time)
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, record.external_attr
            dst.writestr(info, text.getvalue(), compresslevel=9)  # RECORD last, as wheels have it
    before = os.path.getsize(path)
    os.replace(tmp, path)
    print(f"{os.path.basename(path)}: dropped {len(dropped)} entries, {before / 1e6:.1f} MB -> "
          f"{os.path.getsize(path) / 1e6:.1f} MB")


for name, drop in RULES.items():
    path = os.path.join(dest, name)
    if not os.path.exists(path):
        sys.exit(f"missing {path}")
    trim(path, drop)
PY
du -sh "$dest"
if git check-ignore -q "$dest" 2>/dev/null; then
  echo "with .whl (about 52 MB) and the project, the GPU call's working tree must stay within 64 MiB"
else
  echo "warning: $dest is not ignored by git; add it: echo /${dest#./}/ >> .git/info/exclude" >&2
fi
