"""data.uri in any supported format -> the same pandas DataFrame of text columns, whatever the format.

Formats: csv, tsv, jsonl (also .json and .ndjson, one object a line) and parquet, from the extension or
data.format; .gz and .zst compression from the extension (decompressed with pyarrow's codecs: no extra
dependency). Sources: a local path, s3://bucket/key, or hf://datasets/ORG/NAME[@REVISION] (the repo's
Parquet files for data.split, fetched through job/hub.py).

Every column is read as text, whatever its type in the file: an integer label 2 becomes "2", so
data.label: 2 (or "2") selects it, as it would in a CSV. Nulls become "" (and are then dropped as blank
or counted as another label). Every problem names the file and the line, row or column.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from job.config import Config
from job.errors import InputError

FORMATS = ("csv", "tsv", "jsonl", "parquet")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
MAX_FIELD_CHARS = 20_000  # a field this long is a broken file (an unclosed quote swallowing the rest), not a sentence


def detect(uri: str, override: str = "auto") -> tuple[str, str | None]:
    """(format, compression or None) from the URI's extension; data.format other than auto overrides the format."""
    from job.hub_uri import is_hf_uri

    if is_hf_uri(uri):
        return "parquet", None
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    suffixes = [s for s in re.findall(r"\.[a-z0-9]+", name)]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    if override and override != "auto":
        return override, compression
    fmt = EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise InputError(f"data.uri {uri}: cannot tell the format from the name; use a .csv, .tsv, .jsonl, .json "
                         "or .parquet file (optionally .gz or .zst), or set data.format to csv, tsv, jsonl or parquet")
    return fmt, compression


def read_rows(cfg: Config, work_dir: Path, columns: list[str]) -> pd.DataFrame:
    """The needed columns of data.uri as text, in file order."""
    from job.hub_uri import is_hf_uri

    uri = cfg.data.uri
    if is_hf_uri(uri):
        return read_hub_dataset(cfg, columns)
    fmt, compression = detect(uri, cfg.data.format)
    path = fetch_file(cfg, work_dir)
    if compression is not None:
        path = decompress(path, compression, uri, work_dir / ("input.decompressed." + fmt))
    if fmt == "csv":
        return read_csv(path, uri, columns)
    if fmt == "tsv":
        return read_tsv(path, uri, columns)
    if fmt == "jsonl":
        return read_jsonl(path, uri, columns)
    return read_parquet([path], uri, columns)


def read_csv(path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """Read the needed columns as text with pyarrow's strict, multi-threaded parser; fail with the
    file and the row, line or column for anything malformed (pandas' C parser silently fills short
    rows with empty strings, which would hide a broken file)."""
    raw = path.read_bytes()
    if (kind := binary_kind(raw)) is not None:
        raise InputError(f"{name} is {kind}, not a CSV")
    if raw.startswith(codecs.BOM_UTF8):  # spreadsheet tools write one
        raw = raw[len(codecs.BOM_UTF8):]
    if b"\r" in raw and b"\n" not in raw:
        # Old Mac line endings (a lone CR ends each line). Quoted newlines stay inside their field.
        raw = raw.replace(b"\r", b"\n")
    if not raw.strip():
        raise InputError(f"{name}: the file is empty; expected a CSV with a header row and data rows")
    text = _utf8(raw, name)

    try:
        header = next(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InputError(f"{name}: line 1: the header row is not valid CSV ({exc})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(_missing_message(name, missing, header, hint=_near_misses(missing, header)))

    bad_rows = []
    table = None
    for block_size in (16 << 20, len(raw) + 1):  # a field over 16 MB needs one block for the whole file
        bad_rows.clear()
        try:
            table = pacsv.read_csv(
                io.BytesIO(raw),
                read_options=pacsv.ReadOptions(block_size=block_size),
                parse_options=pacsv.ParseOptions(newlines_in_values=True,
                                                 invalid_row_handler=lambda row: bad_rows.append(row) or "skip"),
                convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                     column_types={c: pa.string() for c in columns},
                                                     strings_can_be_null=False, quoted_strings_can_be_null=False))
            break
        except pa.ArrowInvalid as exc:
            if "straddling" in str(exc) and block_size != len(raw) + 1:
                continue
            raise InputError(f"{name}: malformed CSV: {exc}") from None
    if bad_rows:
        row = bad_rows[0]
        line = first_bad_line(text, row.expected_columns) or "?"
        kind = "fewer" if row.actual_columns < row.expected_columns else "more"
        raise InputError(f"{name}: line {line} has {kind} fields than the header ({row.actual_columns} instead of "
                         f"{row.expected_columns}): {row.text[:80]!r}; {len(bad_rows)} such row(s)")
    if table.num_rows == 0:
        raise InputError(f"{name}: has a header but no data rows")
    frame = table.to_pandas()[columns]
    check_field_lengths(frame, name, columns, hint="; usually an unclosed quote")
    return frame


# Files people hand over as "the CSV" that are something else: the first bytes tell which.
# The job reads gzip, zstd and Parquet itself: for those the way out is the right name.
MAGIC = ((b"\x1f\x8b", "a gzip file (compressed): end its name in .gz (data.csv.gz) or decompress it (gunzip)"),
         (b"\x28\xb5\x2f\xfd", "a zstd file (compressed): end its name in .zst or decompress it (zstd -d)"),
         (b"BZh", "a bzip2 file (compressed): decompress it (bunzip2)"),
         (b"\xfd7zXZ\x00", "an xz file (compressed): decompress it (unxz)"),
         (b"PAR1", "a Parquet file: end its name in .parquet or set data.format: parquet"),
         (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel workbook (.xls): save it as CSV UTF-8"),
         (codecs.BOM_UTF32_LE, "UTF-32 text: re-save it as UTF-8"),
         (codecs.BOM_UTF32_BE, "UTF-32 text: re-save it as UTF-8"),
         (codecs.BOM_UTF16_LE, "UTF-16 text (what Excel's \"Unicode Text\" writes): re-save it as UTF-8"),
         (codecs.BOM_UTF16_BE, "UTF-16 text: re-save it as UTF-8"))


def binary_kind(raw: bytes) -> str | None:
    """What the file is when its first bytes say it is not CSV text, else None."""
    if raw.startswith(b"PK\x03\x04"):
        if b"xl/" in raw[:4096] or b"[Content_Types].xml" in raw[:4096]:
            return "an Excel workbook (.xlsx): save it as CSV UTF-8"
        return "a zip archive: unzip it and point data.uri at the CSV inside"
    return next((kind for magic, kind in MAGIC if raw.startswith(magic)), None)


def first_bad_line(text: str, expected: int) -> int | None:
    """The line (1-based, counted, quoted newlines included) where the first record whose field count
    differs from the header's starts. Only runs when pyarrow reported one (its row number is unknown
    when values may hold newlines)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for fields in reader:
            if fields and len(fields) != expected and reader.line_num > 1:
                return start
            start = reader.line_num + 1
    except csv.Error:
        return start
    return None


def _near_misses(missing: list[str], header: list[str]) -> str:
    """'; did you mean ' sentence1'?' when a header name differs only in spaces or case."""
    hints = [h for m in missing for h in header if h != m and h.strip().lower() == m.strip().lower()]
    return f"; did you mean {' / '.join(map(repr, hints))}? (spaces and case count)" if hints else ""


def fetch_file(cfg: Config, work_dir: Path) -> Path:
    """A local path to data.uri: the file itself, or a verified download of the s3:// object."""
    from job.storage import is_s3, open_store, split_uri

    uri = cfg.data.uri
    if not is_s3(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise InputError(f"data.uri: no such file: {uri}")
        return path
    parent, name = split_uri(uri)
    local = work_dir / ("input" + "".join(re.findall(r"\.[A-Za-z0-9]+$", name)))  # input.csv, input.parquet
    open_store(parent, cfg.storage).download_file(name, local)
    return local


def decompress(path: Path, compression: str, name: str, target: Path) -> Path:
    """The decompressed copy of a .gz / .zst file, streamed through pyarrow's codec."""
    try:
        with pa.CompressedInputStream(pa.OSFile(str(path)), compression) as stream, open(target, "wb") as out:
            while chunk := stream.read(16 << 20):
                out.write(chunk)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        target.unlink(missing_ok=True)
        raise InputError(f"{name}: not a valid {compression} file ({str(exc).splitlines()[0]}); check the "
                         "file, or drop the compression extension if it is not compressed") from None
    return target


_QUOTED_FIELD = re.compile(rb'(^|\t)"', re.MULTILINE)


def read_tsv(path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """Tab-separated, one record a line. Quotes are text (as in SNLI's own .txt files), unless the file is
    quoted the way pandas (`to_csv(sep="\t")`), the csv module and spreadsheets write TSV: a field that holds
    a quote, tab or newline wrapped in quotes, inner quotes doubled. When every field that starts with a
    quote parses that way, the file is read that way (as those tools read it back), so the same rows give
    the same text as from a CSV; one that does not (`"Stop" said the man`) keeps every quote as text."""
    raw = _text_bytes(path, name, "TSV")
    if _QUOTED_FIELD.search(raw) and (records := _quoted_tsv(raw.decode("utf-8"))) is not None:
        return _tsv_table(records, name, columns)
    header = raw.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8").split("\t")
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(_missing_message(name, missing, header))
    bad_rows = []
    try:
        table = pacsv.read_csv(io.BytesIO(raw), parse_options=pacsv.ParseOptions(
            delimiter="\t", quote_char=False, invalid_row_handler=lambda row: bad_rows.append(row) or "skip"),
            convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                 column_types={c: pa.string() for c in columns},
                                                 strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise InputError(f"{name}: malformed TSV: {exc}") from None
    if bad_rows:
        row = bad_rows[0]
        lines = raw.decode("utf-8").split("\n")
        line = next((i + 1 for i, text in enumerate(lines) if text.rstrip("\r") == row.text), "?")
        raise InputError(f"{name}: line {line} has {row.actual_columns} tab-separated fields instead of the header's "
                         f"{row.expected_columns}: {row.text[:80]!r}; {len(bad_rows)} such row(s)")
    return to_text_frame(table, name, columns)


def _quoted_tsv(text: str) -> list[tuple[int, list[str]]] | None:
    """(first line, fields) of each record of a quoted TSV; None when a quote is not CSV quoting."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", strict=True)
    records, start = [], 1
    try:
        for fields in reader:
            if fields:
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error:
        return None
    return records


def _tsv_table(records: list[tuple[int, list[str]]], name: str, columns: list[str]) -> pd.DataFrame:
    header = records[0][1]
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(_missing_message(name, missing, header))
    bad = [(line, fields) for line, fields in records[1:] if len(fields) != len(header)]
    if bad:
        line, fields = bad[0]
        raise InputError(f"{name}: line {line} has {len(fields)} tab-separated fields instead of the header's "
                         f"{len(header)}: {chr(9).join(fields)[:80]!r}; {len(bad)} such row(s)")
    index = {c: header.index(c) for c in columns}
    return to_text_frame(pa.table({c: pa.array([fields[index[c]] for _, fields in records[1:]], pa.string())
                                   for c in columns}), name, columns)


def read_jsonl(path: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """One JSON object a line; pyarrow's parser, with a line-by-line pass to name the line when it fails or
    when a column mixes types (a label that is 2 in one line and "2" in another)."""
    import pyarrow.json as pajson

    raw = _text_bytes(path, name, "JSON lines")
    # The needed columns are declared text: pyarrow would otherwise turn "2020-01-01" into a timestamp. A
    # number, boolean or escape pyarrow refuses (a lone surrogate), or a column absent from every line,
    # goes to the line-by-line pass, which converts or names the line.
    try:
        table = pajson.read_json(io.BytesIO(raw), read_options=pajson.ReadOptions(
            block_size=max(1 << 20, min(len(raw) + 1, 64 << 20))), parse_options=pajson.ParseOptions(
            explicit_schema=pa.schema([(c, pa.string()) for c in columns])))
        if any(table.column(c).null_count == table.num_rows for c in columns):
            raise pa.ArrowInvalid("a column with no values")
    except pa.ArrowInvalid:
        table = _jsonl_by_line(raw.decode("utf-8"), name, columns)
    return to_text_frame(table.select(columns) if set(columns) <= set(table.column_names) else table, name, columns)


def _jsonl_by_line(text: str, name: str, columns: list[str]) -> pa.Table:
    rows, present = [], set()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            hint = "; a .json file must hold one object a line (JSON lines), not one array" if number == 1 and \
                line.lstrip().startswith("[") else ""
            raise InputError(f"{name}: line {number} is not valid JSON "
                             f"({exc.msg} at column {exc.colno}){hint}") from None
        if not isinstance(record, dict):
            raise InputError(f"{name}: line {number} is a JSON {type(record).__name__}, expected an object "
                             "(one record a line)")
        rows.append({c: _as_text(record.get(c), name, number, c) for c in columns})
        present.update(c for c in columns if c in record)
    return pa.table({c: pa.array([row[c] for row in rows], pa.string()) for c in columns if c in present})


def _as_text(value, name: str, line: int, column: str):
    if value is None:
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # json.loads accepts "\ud800"; no UTF-8 file can hold it
            raise InputError(f"{name}: line {line}, column {column}: {value[exc.start:exc.end]!r} is half of a "
                             "UTF-16 surrogate pair (an escaped \\ud800-\\udfff without its partner), not text; "
                             "fix the escape or drop the line") from None
        return value
    if isinstance(value, (dict, list)):
        raise InputError(f"{name}: line {line}, column {column}: holds a JSON {type(value).__name__}, expected text "
                         "or a number")
    return json.dumps(value) if isinstance(value, bool) else str(value)


def read_parquet(paths: list[Path], name: str, columns: list[str]) -> pd.DataFrame:
    import pyarrow.parquet as pq

    tables = []
    for path in paths:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{name}: {Path(path).name} is not a readable Parquet file "
                             f"({str(exc).splitlines()[0]})") from None
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise InputError(_missing_message(name, missing, schema.names))
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{name}: {Path(path).name}: cannot read the Parquet data "
                             f"({str(exc).splitlines()[0]})") from None
        # Each file to text on its own: shards of a Hub dataset may store a column as int64 in one and as
        # string in another, which pyarrow cannot concatenate, while as text they agree.
        tables.append(to_text_table(table, name if len(paths) == 1 else f"{name}: {Path(path).name}", columns))
    return text_frame(tables[0] if len(tables) == 1 else pa.concat_tables(tables), name, columns)


def read_hub_dataset(cfg: Config, columns: list[str]) -> pd.DataFrame:
    """The Parquet files of data.split in a Hub dataset repo (the layout the Hub serves: SPLIT-*.parquet,
    CONFIG/SPLIT-*.parquet or CONFIG/SPLIT/*.parquet), downloaded once into the job's cache."""
    from job import hub
    from job.platform import cache_dir

    uri, split = cfg.data.uri, cfg.data.split
    ref = hub.parse_hf_uri(uri, "data.uri")
    # The split's name exactly: "validation" must not also read validation_matched-*.parquet (MultiNLI).
    # The Hub names shards SPLIT-00000-of-00002.parquet, so "-" ends the split's name and "_" does not.
    folder = hub.download(ref, cache_dir(cfg), allow_patterns=[f"*{split}-*.parquet", f"*{split}.parquet",
                                                               f"*{split}/*.parquet"],
                          max_attempts=cfg.storage.max_attempts, key="data.uri")
    pattern = re.compile(rf"(^|/){re.escape(split)}(-[^/]*)?\.parquet$|(^|/){re.escape(split)}/[^/]+\.parquet$")
    files = sorted(p for p in folder.rglob("*.parquet") if pattern.search(p.relative_to(folder).as_posix()))
    if not files:
        raise InputError(f"data.uri {uri}: no Parquet files for split {split!r} (looked for {split}-*.parquet and "
                         f"{split}/*.parquet); set data.split to one of the repo's splits "
                         "(train, validation, test, ...)")
    return read_parquet(files, f"{uri} (split {split})", columns)


def to_text_frame(table: pa.Table, name: str, columns: list[str]) -> pd.DataFrame:
    """The columns as pandas text (object) columns without nulls; integers and booleans written as in a CSV."""
    return text_frame(to_text_table(table, name, columns), name, columns)


def text_frame(table: pa.Table, name: str, columns: list[str]) -> pd.DataFrame:
    """A table of text columns (to_text_table) as pandas, refused when empty or holding a broken field."""
    if table.num_rows == 0:
        raise InputError(f"{name}: has no data rows")
    frame = table.to_pandas()[columns]
    check_field_lengths(frame, name, columns)
    return frame


def to_text_table(table: pa.Table, name: str, columns: list[str]) -> pa.Table:
    """The columns as valid UTF-8 string columns, nulls as ""."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(_missing_message(name, missing, table.column_names))
    out = {}
    for c in columns:
        column = table.column(c)
        kind = column.type
        if pa.types.is_dictionary(kind):
            column, kind = column.cast(kind.value_type), kind.value_type
        if pa.types.is_boolean(kind):
            column = pa.chunked_array([pa.array(["true" if v else "false" if v is not None else None
                                                 for v in chunk.to_pylist()], pa.string()) for chunk in column.chunks],
                                      pa.string())
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind) \
                or pa.types.is_null(kind):
            column = column.cast(pa.string())
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            _check_utf8(column, name, c)
            column = column.cast(pa.string())
        else:
            raise InputError(f"{name}: column {c} holds {kind} values, expected text or numbers")
        out[c] = column.fill_null("")
    return pa.table(out, schema=pa.schema([(c, pa.string()) for c in columns]))


def _check_utf8(column: pa.ChunkedArray, name: str, column_name: str) -> None:
    """Parquet stores strings as bytes and does not promise they are UTF-8 (a writer that skipped the
    check): name the first row that is not, instead of failing later in pandas or in the JSON writer."""
    row = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            values = chunk.view(pa.binary() if pa.types.is_string(chunk.type) else pa.large_binary()).to_pylist()
            for i, value in enumerate(values):
                try:
                    if value is not None:
                        value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(f"{name}: row {row + i + 1}, column {column_name}: not valid UTF-8 "
                                     f"({value[exc.start:exc.start + 4]!r}); write the strings as UTF-8") from None
            raise
        row += len(chunk)


def check_field_lengths(frame: pd.DataFrame, name: str, columns: list[str], hint: str = "") -> None:
    """No field over MAX_FIELD_CHARS: one that long is a broken file, not a sentence."""
    lengths = np.stack([frame[c].str.len().to_numpy() for c in columns], axis=1)
    if lengths.max() > MAX_FIELD_CHARS:
        row, col = divmod(int(lengths.argmax()), len(columns))
        raise InputError(f"{name}: row {row + 1}, column {columns[col]}: a field of {int(lengths.max()):,} "
                         f"characters (limit {MAX_FIELD_CHARS:,}){hint}")


def _text_bytes(path: Path, name: str, kind: str) -> bytes:
    """The bytes of a TSV or JSON lines file (`kind`), checked to be UTF-8 text; a file that is something
    else (gzip, Parquet, ...) is named for what it is, as the CSV reader does."""
    raw = Path(path).read_bytes()
    if (what := binary_kind(raw)) is not None:
        raise InputError(f"{name} is {what}, not a {kind} file")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        raise InputError(f"{name}: the file is empty")
    _utf8(raw, name)
    return raw


def _utf8(raw: bytes, name: str) -> str:
    """The text, or bad input naming the line and byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{name}: line {line} (byte {exc.start}) is not valid UTF-8 "
                         f"({raw[exc.start:exc.start + 4]!r}); re-save the file as UTF-8") from None


def _missing_message(name: str, missing: list[str], present: list[str], hint: str = "") -> str:
    """`hint`: a "did you mean" (CSV headers, where near misses are common)."""
    return (f"{name}: missing column(s) {', '.join(map(repr, missing))}; the file has "
            f"{', '.join(map(repr, present)) or 'no columns'}{hint}. Set data.label_column / data.source_column / "
            "data.target_column to the right names")
