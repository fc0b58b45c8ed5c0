"""Parse a GGUF file once while transformers reads it back several times.

transformers' GGUF loader builds a fresh `gguf.GGUFReader` for every question it asks the same file:
AutoTokenizer (twice: the model type, then the vocabulary), AutoModelForCausalLM (twice: the config, then
the tensors). GGUFReader parses the whole key-value section in Python, and for a 49k-token vocabulary
with 48k merges that is ~100k strings: 4-12 s per parse on a 2-core CPU, most of the read-back's time
(profiled on SmolLM2-135M: four parses ~70% of a file's check, a 135M model's forward pass ~1 s). Its
weight mapping also calls `gguf.get_tensor_name_map(arch, n_blocks)` once per submodule (~400 times for
30 layers, each rebuilding the same table).

Inside `parse_once()`, both are memoized on the `gguf` module, where transformers imports them from at
call time (`from gguf import GGUFReader` inside its functions). Nothing transformers computes changes:
the reader is read-only (the tensors are a read-only memmap) and the name table is a pure function of
its arguments. If a future transformers imports them differently, the memo is simply not used.

Contexts nest: an inner `parse_once()` inside an outer one uses the outer memo, so a caller that reads
the same file in several steps (the export's tensor check, tokenizer check and logits read-back; the
GGUF conversion's model and tokenizer) wraps them all and parses each file once in total.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache


@contextlib.contextmanager
def parse_once():
    import gguf

    if getattr(gguf.GGUFReader, "_parse_once", False):  # inside an outer parse_once(): its memo serves
        yield
        return
    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        if mode != "r":
            return real_reader(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)  # a rewritten file is parsed again
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    reader._parse_once = True
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, lru_cache(maxsize=None)(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map
        readers.clear()
