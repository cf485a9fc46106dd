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
    from hwcompat.data.problems import Report

Row = tuple[int, str, dict]  # (line or row number, "file:line" / "file:row N", the row)
MAX_GUNZIPPED = 4 << 30  # a training file decompressed past this is a mistake (or a gzip bomb), not data
ARROW_BATCH = 1024
PYARROW_HINT = "pip install pyarrow (or hwcompat[data])"


def container(path: str | Path) -> str:
    """The container a path names, from its name (and, for a folder, the files ``save_to_disk`` writes). A ``.gz``
    name is the container its inner name says (``train.csv.gz`` is gzip CSV), JSONL when that says nothing else."""
    p = Path(path)
    if p.is_dir():
        return "datasets folder"
    name = p.name.lower()
    gz = name.endswith(".gz")
    inner = {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet", ".arrow": "Arrow"}.get(
        Path(name.removesuffix(".gz")).suffix, "JSONL")
    if gz and inner in ("Parquet", "Arrow"):
        return f"gzip {inner}"  # refused with a reason: those are compressed inside already
    return f"gzip {inner}" if gz else inner


TABLES = ("Parquet", "Arrow", "datasets folder")


def location(file: str | Path, n: int) -> str:
    """Where row ``n`` of a file is, as a user opens it: ``file:line`` for text, ``file:row N`` for a table."""
    return f"{file}:row {n}" if container(file) in TABLES else f"{file}:{n}"


def rows(path: str | Path, report: "Report", max_seq_len: int | None = None,
         columns: dict[str, str] | None = None) -> Iterator[Row]:
    """Every row of a data file of any container, after its checks; problems go to ``report`` with a location."""
    kind = container(path)
    report.sources[str(path)] = kind
    read = {"JSONL": _jsonl, "gzip JSONL": _gzip_jsonl, "CSV": _csv, "TSV": _csv, "gzip CSV": _csv,
            "gzip TSV": _csv, "Parquet": _parquet, "Arrow": _arrow, "gzip Parquet": _gzip_table,
            "gzip Arrow": _gzip_table, "datasets folder": _datasets_folder}[kind]
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
        absent = [theirs for theirs in columns.values() if theirs not in row]
        if absent and first:
            raise InputError(f"{path}: columns: {', '.join(map(repr, absent))} not in the file; its columns: "
                             f"{', '.join(sorted(map(str, row)))[:300]}")
        first = False
        if absent:  # a later JSONL row without the mapped key: that row's problem, at its line
            report.error(f"{where}: {', '.join(map(repr, absent))} missing (columns maps "
                         f"{', '.join(k for k, v in columns.items() if v in absent)} to it)")
            continue
        renamed = {k: v for k, v in row.items() if k not in columns.values()}
        renamed.update({ours: row[theirs] for ours, theirs in columns.items()})
        yield n, where, renamed


def _raw(path: Path) -> bytes:
    from hwcompat.userfile import read_regular

    return read_regular(path, "data file")  # a regular file only: a FIFO, a pipe (<(…)) or /dev/zero is refused


def _jsonl(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    yield from jsonl_bytes(_raw(path), path, report, max_seq_len)


def _gzip_jsonl(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    """Row by row as the stream decompresses: memory holds one chunk and one line, never the whole file."""
    from hwcompat.data.rows import CHARS_PER_TOKEN_LIMIT, json_line

    max_chars = max_seq_len * CHARS_PER_TOKEN_LIMIT if max_seq_len else None
    lineno, tail = 0, b""
    for chunk in gunzipped(path):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        if max_chars and len(tail) > 4 * max_chars + 1:  # one runaway line: say so now, not at its end
            raise InputError(f"{path}:{lineno + len(lines) + 1}: a row of over {len(tail):,} bytes, far beyond "
                             f"max_seq_len={max_seq_len} tokens; split or drop the row")
        for bline in lines:
            lineno += 1
            if bline.strip():
                row = json_line(bline.removesuffix(b"\r"), lineno, f"{path}:{lineno}", report, max_chars,
                                max_seq_len)
                if row is not None:
                    yield lineno, f"{path}:{lineno}", row
    if tail.strip():
        lineno += 1
        row = json_line(tail.removesuffix(b"\r"), lineno, f"{path}:{lineno}", report, max_chars, max_seq_len)
        if row is not None:
            yield lineno, f"{path}:{lineno}", row


#: Real training text compresses 3-40x (the demo data 4-18x, a templated JSON task 34x); past this ratio a file
#: is padding or a gzip bomb, and reading it would take minutes and gigabytes for nothing.
MAX_GZIP_RATIO = 200
#: ...except that a small file may always decompress to this much.
GZIP_FLOOR = 16 << 20
GZIP_CHUNK = 1 << 20


def gunzipped(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a gzip file, chunk by chunk: every member (``cat a.gz b.gz``, bgzip, ``pigz -i``
    write several), bytes after the last member refused, the output bounded by ``MAX_GZIP_RATIO`` times the file's
    size (``GZIP_FLOOR`` at least) and ``MAX_GUNZIPPED``. The whole stream is checked before the first chunk is
    given (decompressing twice costs seconds, not memory), so a damaged file is one error and no rows."""
    raw = _raw(path)
    for _ in _members(raw, path):
        pass
    yield from _members(raw, path)


def _members(raw: bytes, path: Path) -> Iterator[bytes]:
    import zlib

    limit = min(MAX_GUNZIPPED, max(GZIP_FLOOR, MAX_GZIP_RATIO * len(raw)))
    size, total, members = len(raw), 0, 0
    while raw:
        if members and not raw.startswith(b"\x1f\x8b"):
            raise InputError(f"{path}: {len(raw):,} byte(s) after the gzip data (from byte {size - len(raw):,}) are "
                             "not gzip; the file is damaged or two files were joined: recompress the plain file "
                             "(gzip FILE)")
        d = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip (or zlib) header
        members += 1
        try:
            while raw and not d.eof:
                chunk = d.decompress(raw, GZIP_CHUNK)
                raw = d.unconsumed_tail
                total += len(chunk)
                if total > limit:
                    raise InputError(_too_big(path, limit))
                if chunk:
                    yield chunk
        except zlib.error as exc:
            raise InputError(f"{path}: not a readable gzip file ({exc}); recompress it (gzip FILE) or pass the "
                             "plain file") from None
        if not d.eof:
            raise InputError(f"{path}: the gzip stream is cut short (a partial download or copy?); nothing was read")
        raw = d.unused_data


def _too_big(path: Path, limit: int) -> str:
    if limit >= MAX_GUNZIPPED:
        return f"{path}: decompresses to more than {MAX_GUNZIPPED >> 30} GiB; split the data into several files"
    return (f"{path}: decompresses to more than {limit >> 20} MiB, over {MAX_GZIP_RATIO}x its size: no training "
            "data compresses so well (blank lines or padding? a gzip bomb?); gunzip it, check it and pass the "
            "plain file")


def _gzip_table(path: Path, report: "Report", max_seq_len: int | None) -> Iterator[Row]:
    raise InputError(f"{path}: a gzip-compressed {container(path).split()[1]} file; Parquet and Arrow compress "
                     "inside already: gunzip it and pass the plain file")
    yield from ()


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
    empty cell is an empty field. One quoting rule for both, the one pandas and ``datasets`` read them with: a cell
    may be quoted with ``"`` (a quote inside written twice); a TSV cell that starts with a quote is therefore
    read quote-aware, which ``data check`` says, with the line, since in plain TSV that quote would be text."""
    kind = container(path)
    raw = b"".join(gunzipped(path)) if kind.startswith("gzip") else _raw(path)
    text = _checked_text(raw, path, report)
    if text is None:
        return
    tsv = kind.endswith("TSV")
    csv.field_size_limit(1 << 30)  # a long answer is the length checks' business, not the parser's
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",")
    lines = text.split("\n")
    header, start = None, 1
    try:
        for record in reader:
            where = f"{path}:{start}"
            line, start = start, reader.line_num + 1
            if not record or all(not c.strip() for c in record):
                continue
            source = "\n".join(lines[line - 1:reader.line_num])
            if not _quoting_ok(source, record, tsv, path, line, reader.line_num, len(lines), report):
                continue
            if header is None:
                header = [h.strip() for h in record]
                _check_header(header, where, tsv)
                continue
            if len(record) != len(header):
                report.error(f"{where}: {len(record)} field(s), the header has {len(header)}; quote a cell that "
                             "holds the delimiter or a line break")
                continue
            yield line, where, dict(zip(header, record))
    except csv.Error as exc:
        report.error(f"{path}:{reader.line_num}: not valid {kind} ({exc})")


def _quoting_ok(source: str, record: list[str], tsv: bool, path: Path, first: int, last: int, n_lines: int,
                report: "Report") -> bool:
    """Where quoting changed what a record reads as, say so at the line it began on: a quote never closed
    (it swallowed the rest of the file: an error), a TSV cell read quote-aware (a warning)."""
    if '"' not in source:
        return True
    unclosed = last >= n_lines - 1 and _unclosed_quote(source, tsv)
    if unclosed:
        report.error(f"{path}:{first}: a quoted cell opens on this line and is never closed, so lines {first}-{last} "
                     "read as one cell; close the quote, or write a quote that is text as \"\" inside a quoted cell")
        return False
    if tsv and source.replace("\r", "").split("\t") != [c.replace("\r", "") for c in record]:
        span = f", running across lines {first}-{last}" if last > first else ""
        report.warn("TSV quoting", f"{path}:{first}: a cell starts with a double quote and was read quote-aware, "
                                   f"as pandas and datasets read TSV (its quotes removed{span})")
    return True


def _unclosed_quote(source: str, tsv: bool) -> bool:
    try:
        list(csv.reader(io.StringIO(source, newline=""), delimiter="\t" if tsv else ",", strict=True))
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _check_header(header: list[str], where: str, tsv: bool) -> None:
    if len(header) == 1 and not tsv:
        other = next((d for d in (";", "\t", "|") if d in header[0]), None)
        if other:
            raise InputError(f"{where}: the header is one column, {header[0][:60]!r}, separated by "
                             f"{'a tab' if other == chr(9) else repr(other)}: hwcompat reads CSV separated by commas"
                             + ("; name the file .tsv" if other == "\t" else "; save it as CSV with commas (a "
                                "spreadsheet's 'CSV UTF-8' export) or as .tsv with tabs"))
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
        splits = _json(path / "dataset_dict.json").get("splits")
        splits = [s for s in splits if isinstance(s, str)] if isinstance(splits, list) else []
        raise InputError(f"{path}: a DatasetDict folder; give one split's folder, e.g. "
                         f"{' or '.join(str(path / s) for s in splits[:2]) or str(path / 'train')}")
    if not (path / "state.json").exists():
        raise InputError(f"{path}: a folder; give a data file (JSONL, CSV, Parquet, Arrow) or a folder written by "
                         "datasets' save_to_disk (it holds state.json)")
    files = datasets_files(path)
    n = 0
    for name in files:
        for _, _, row in _arrow(path / name, report, max_seq_len):
            yield n, f"{path}:row {n}", row
            n += 1


def datasets_files(path: Path) -> list[str]:
    """The Arrow files of a ``save_to_disk`` folder, in order, from its state.json (refused when it is not
    the shape ``datasets`` writes: a list of {filename: NAME.arrow} in the folder)."""
    entries = _json(path / "state.json").get("_data_files")
    files = [f.get("filename") if isinstance(f, dict) else f for f in entries] if isinstance(entries, list) else []
    if not files or not all(isinstance(f, str) and "/" not in f and f.endswith(".arrow") for f in files):
        raise InputError(f"{path / 'state.json'}: _data_files: expected a list of {{filename: NAME.arrow}} in the "
                         f"folder, got {entries!r:.200}; write the folder again with datasets' save_to_disk")
    return files


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_raw(path))
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data
