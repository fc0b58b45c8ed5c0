#!/usr/bin/env bash
# Outside CI: load a run's GGUF export in llama.cpp and compare greedy answers with transformers on merged/.
#
#   scripts/llama_cpp_check.sh RUN_DIR [N_PROMPTS=10]    # from the repository root, the project's venv active
#
# RUN_DIR: a finished local run with export.enabled=true (merged/, export/*.gguf, data/eval.jsonl), e.g.
#   job run --config examples/quickstart.yaml --set export.enabled=true --set export.gguf=[f16,bf16,q8_0] \
#           --set run_uri=/tmp/qs-export
# llama.cpp comes from the PyPI wheel llama-cpp-py-sync (prebuilt libllama + CFFI bindings, 5.5 MB, no
# compiler, no build), installed into its own virtualenv (LLAMA_VENV, default ~/.cache/qlora-job/llama-cpp-venv),
# never into the project's. LLAMA_WHEEL=path/to.whl installs that file instead of asking PyPI.
# (llama-cpp-python works too but builds llama.cpp from source, about 25 minutes on 2 cores.)
# The wheel's libllama needs glibc >= 2.38 (Ubuntu 24.04, Debian 13; its only 2.38 symbols are C23's
# __isoc23_strtol family). On an older system set LLAMA_GLIBC to a newer glibc's library folder, e.g.
# Debian 13's libc6 (`apt-get download libc6` with a trixie source list, then `dpkg -x libc6_*.deb glibc`)
# (LLAMA_GLIBC=$PWD/glibc/usr/lib/x86_64-linux-gnu): the llama.cpp half then runs under that loader.
# Writes RUN_DIR/llama_cpp_reference.json (transformers) and RUN_DIR/llama_cpp_check.json (the comparison)
# and prints one line per file. Exit 1 when llama.cpp tokenizes a prompt differently from transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:?RUN_DIR}; n=${2:-10}
version=0.11739   # the wheel this check was run with (docs/gguf-llamacpp-check.md)
venv=${LLAMA_VENV:-$HOME/.cache/qlora-job/llama-cpp-venv}
if ! "$venv/bin/python" -c "import llama_cpp_py_sync" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --only-binary=:all: "${LLAMA_WHEEL:-llama-cpp-py-sync==$version}"
fi
ls "$run"/export/*.gguf >/dev/null
python scripts/llama_cpp_check.py reference "$run" "$run/llama_cpp_reference.json" -n "$n"
loader=()
if [[ -n ${LLAMA_GLIBC:-} ]]; then
    loader=("$LLAMA_GLIBC/ld-linux-x86-64.so.2" --library-path "$LLAMA_GLIBC:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu")
fi
"${loader[@]}" "$venv/bin/python" scripts/llama_cpp_check.py llama "$run/llama_cpp_reference.json" "$run/llama_cpp_check.json" \
    --threads "$(nproc)"
