"""Where rows come from: the containers users have their data in, each read strictly into plain row mappings.

JSONL (plain or gzip-compressed), CSV / TSV, Parquet, Arrow (an IPC file or stream, or a ``datasets.save_to_disk``
folder). Every row comes with a location a user can open: ``file:line`` for text (a CSV record's first line), and
``file:row N`` for Parquet / Arrow, counted from 0 as ``dataset[N]`` counts. A ``columns`` mapping
(``{prompt: question, completion: answer}``) renames a file's columns to the format's fields. The byte-level
checks (NUL bytes, UTF-8, far-too-long rows) are the JSONL reader's, shared. No torch import here.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from hwcompat.errors import InputError

if TYPE_CHECKING:
    from hwcompat.data.rows import Report

Row = tuple[int, str, dict]  # (line or row number, "file:line" / "file:row N", the row)
MAX_GUNZIPPED = 4 << 30  # a training file decompressed past this is a mistake (or a gzip bomb), not data
ARROW_BATCH = 1024
PYARROW_HINT = "pip install pyarrow (or hwcompat[data])"


def container(path: str | Path) -> str:
    """The container a path names, from its name (and, for a folder, the files ``save_to_disk`` writes)."""
    p = Path(path)
    if p.is_dir():
        return "datasets folder"
    name = p.name.lower()
    if name.endswith(".gz"):
        return "gzip JSONL"
    suffix = Path(name).suffix
    return {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet", ".arrow": "Arrow"}.get(suffix, "JSONL")


def rows(path: str | Path, report: "Report", max_seq_len: int | None = None,
         columns: dict[str, str] | None = None) -> Iterator[Row]:
    """Every row of a data file of any container, after its checks; problems go to ``report`` with a location."""
    kind = container(path)
    report.sources[str(path)] = kind
    read = {"JSONL": _jsonl, "gzip JSONL": _gzip_jsonl, "CSV": _csv, "TSV": _csv, "Parquet": _parquet,
            "Arrow": _arrow, "datasets folder": _datasets_folder}[kind]
    try:
        source = read(Path(path), report, max_seq_len)
        yield from _renamed(source, columns, Path(path), report) if columns else source
    except InputError as exc:
        report.error(str(exc))


def _renamed(source: Iterator[Row], columns: dict[str, str], path: Path, report: "Report") -> Iterator[Row]:
    """Rename the file's columns to the format's fields; a mapped column the first row lacks is one clear error
    that lists the file's columns, not one 'missing' per row."""
    first = True
    for n, where, row in source:
        if first:
            absent = [theirs for theirs in columns.values() if theirs not in row]
            if absent:
                raise InputError(f"{path}: columns: {', '.join(map(repr, absent))} not in the file; its columns: "
                                 f"{', '.join(sorted(map(str, row)))[:300]}")
            first = False
        renamed = {k: v for k, v in row.items() if k not in columns.values()}
        renamed.update({ours: row[theirs] for ours, theirs in columns.items()})
        yield n, where, renamed


def _raw(path: Path) -> bytes:
    from hwcompat.userfile import read_regular

    return read_regular(path, "data file")  # a regular file only: a FIFO, a pipe (<(…)) or /dev/zero is refused


def _jsonl(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    yield from jsonl_bytes(_raw(path), path, report, max_seq_len)


def _gzip_jsonl(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    import zlib

    raw = _raw(path)
    out, d = [], zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header
    total = 0
    try:
        while raw:
            chunk = d.decompress(raw, 64 << 20)
            total += len(chunk)
            if total > MAX_GUNZIPPED:
                raise InputError(f"{path}: decompresses to more than {MAX_GUNZIPPED >> 30} GiB; split the data "
                                 "into several files")
            out.append(chunk)
            raw = d.unconsumed_tail
            if d.eof:
                break
    except zlib.error as exc:
        raise InputError(f"{path}: not a readable gzip file ({exc}); recompress it (gzip FILE) or pass the plain "
                         "JSONL") from None
    if not d.eof:
        raise InputError(f"{path}: the gzip stream is cut short (a partial download or copy?); nothing was read")
    yield from jsonl_bytes(b"".join(out), path, report, max_seq_len)


def jsonl_bytes(raw: bytes, path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    from hwcompat.data.rows import CHARS_PER_TOKEN_LIMIT, json_line

    max_chars = max_seq_len * CHARS_PER_TOKEN_LIMIT if max_seq_len else None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for lineno, bline in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        row = json_line(bline.removesuffix(b"\r"), lineno, where, report, max_chars, max_seq_len)
        if row is not None:
            yield lineno, where, row


def _csv(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    """CSV (or TSV) with a header row; each record located by the line it starts on. Every cell is text: an
    empty cell is an empty field."""
    text = _checked_text(_raw(path), path, report)
    if text is None:
        return
    csv.field_size_limit(1 << 30)  # a long answer is the length checks' business, not the parser's
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    header, start = None, 1
    try:
        for record in reader:
            where = f"{path}:{start}"
            line, start = start, reader.line_num + 1
            if not record or all(not c.strip() for c in record):
                continue
            if header is None:
                header = [h.strip() for h in record]
                _check_header(header, where)
                continue
            if len(record) != len(header):
                report.error(f"{where}: {len(record)} field(s), the header has {len(header)}; quote a cell that "
                             "holds the delimiter or a line break")
                continue
            yield line, where, dict(zip(header, record))
    except csv.Error as exc:
        report.error(f"{path}:{reader.line_num}: not valid {container(path)} ({exc})")


def _check_header(header: list[str], where: str) -> None:
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes or not all(header):
        raise InputError(f"{where}: the header row needs one distinct, non-empty name per column"
                         + (f" (repeated: {', '.join(dupes)})" if dupes else ""))


def _checked_text(raw: bytes, path: Path, report: "Report") -> str | None:
    """The file as text after the byte-level checks, each problem at its line."""
    from hwcompat.data.rows import BOM

    if raw.startswith(BOM):
        raw = raw[len(BOM):]
        report.warn("byte order mark", f"{path}:1: the file starts with a UTF-8 BOM; it was ignored")
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        report.error(f"{path}:{line}: NUL byte (\\x00): the file is corrupted (often a "
                     "scraper or an encoding bug); remove the bytes or the row")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        report.error(f"{path}:{line}: invalid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                     "re-encode the file as UTF-8 (a spreadsheet's 'CSV UTF-8' export)")
        return None


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError(f"{path}: Parquet and Arrow data need pyarrow: {PYARROW_HINT}; or export the data as JSONL") from None
    return pyarrow


def _parquet(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    pa = _pyarrow(path)
    try:
        batches = pa.parquet.ParquetFile(pa.BufferReader(_raw(path))).iter_batches(batch_size=ARROW_BATCH)
        yield from _table_rows(batches, path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({str(exc)[:200]})") from None


def _arrow(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    """An Arrow IPC file, or the IPC stream ``datasets`` writes (``data-00000-of-00001.arrow``)."""
    pa = _pyarrow(path)
    raw = _raw(path)
    try:
        try:
            reader = pa.ipc.open_file(pa.BufferReader(raw))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            batches = iter(pa.ipc.open_stream(pa.BufferReader(raw)))
        yield from _table_rows(batches, path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Arrow file ({str(exc)[:200]})") from None


def _table_rows(batches, path: Path, offset: int = 0) -> Iterator[Row]:
    n = offset
    for batch in batches:
        for row in batch.to_pylist():
            yield n, f"{path}:row {n}", row
            n += 1


def _datasets_folder(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    """A ``datasets.Dataset.save_to_disk`` folder: its Arrow files in ``state.json``'s order, rows counted across
    them (row N is ``load_from_disk(folder)[N]``)."""
    if (path / "dataset_dict.json").exists():
        splits = _json(path / "dataset_dict.json").get("splits", [])
        raise InputError(f"{path}: a DatasetDict folder; give one split's folder, e.g. "
                         f"{' or '.join(str(path / s) for s in splits[:2]) or str(path / 'train')}")
    if not (path / "state.json").exists():
        raise InputError(f"{path}: a folder; give a data file (JSONL, CSV, Parquet, Arrow) or a folder written by "
                         "datasets' save_to_disk (it holds state.json)")
    files = [f.get("filename") for f in _json(path / "state.json").get("_data_files", [])]
    if not files or not all(isinstance(f, str) and "/" not in f and f.endswith(".arrow") for f in files):
        raise InputError(f"{path / 'state.json'}: _data_files: expected the folder's .arrow files, got {files!r:.200}")
    n = 0
    for name in files:
        for _, _, row in _arrow(path / name, report, max_seq_len):
            yield n, f"{path}:row {n}", row
            n += 1


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_raw(path))
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data
