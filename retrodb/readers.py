"""Input readers: folders of text, JSONL (plain, .gz, .zst), Parquet, stdin.

The planner turns sources into *pieces* (a whole text file, a line range of
a JSONL file, row groups of a Parquet file) and packs pieces into work units
of about `segment_bytes` each; one unit becomes one segment. Readers stream
a unit's pieces as `Document`s, and report bad input as `Issue`s naming the
file and line (or row) so that the --on-error policy can skip or fail.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

TEXT_EXTS = (".txt", ".md", ".text", ".rst")
JSONL_EXTS = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst")
PARQUET_EXTS = (".parquet",)
FORMATS = ("auto", "text", "jsonl", "parquet")
BINARY_SNIFF = 8192


@dataclass
class Document:
    doc_id: str
    text: str
    source: str  # file:line, file#row or the file path
    metadata: str | None = None


@dataclass
class Issue:
    kind: str  # invalid-utf8, binary, empty, malformed-json, missing-field, duplicate-id, unsupported, unreadable
    where: str  # file:line
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Piece:
    fmt: str  # text | jsonl | parquet | lines
    path: str  # absolute path ("<stdin>" for lines)
    doc_id: str | None = None  # text files: id from the relative path
    start: int = 0  # jsonl: byte offset; parquet: first row group
    end: int = -1  # jsonl: end byte offset (-1: to the end); parquet: row group stop
    first_line: int = 1  # jsonl: line number at `start`; parquet: row number of the first row
    size: int = 0  # bytes, for packing
    lines: list[bytes] | None = None  # stdin payload
    documents: list | None = None  # fmt "documents": Documents made in memory (redact --mode mask)


@dataclass
class WorkUnit:
    segment: int
    pieces: list[Piece] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


@dataclass
class ReadOptions:
    text_field: str = "text"
    id_field: str = "id"


def detect_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_EXTS):
        return "jsonl"
    if name.endswith(PARQUET_EXTS):
        return "parquet"
    if name.endswith(TEXT_EXTS):
        return "text"
    return None


def content_id(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------- planning


def _jsonl_pieces(path: Path, target: int) -> list[Piece]:
    """Split a plain JSONL file into line-aligned byte ranges of about `target` bytes."""
    size = path.stat().st_size
    if path.name.lower().endswith((".gz", ".zst")) or size <= target:
        return [Piece("jsonl", str(path), size=size)]
    pieces = []
    start, line = 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + target, size))
            if f.tell() < size:
                f.readline()
            end = f.tell()
            f.seek(start)
            lines_in = 0
            remaining = end - start
            while remaining > 0:
                block = f.read(min(remaining, 1 << 22))
                lines_in += block.count(b"\n")
                remaining -= len(block)
            pieces.append(Piece("jsonl", str(path), start=start, end=end, first_line=line, size=end - start))
            start, line = end, line + lines_in
    return pieces


def _parquet_pieces(path: Path, target: int, text_field: str) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    pieces: list[Piece] = []
    group_start, row, first_row, acc = 0, 1, 1, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        row += meta.row_group(g).num_rows
        if acc >= target or g == meta.num_row_groups - 1:
            pieces.append(Piece("parquet", str(path), start=group_start, end=g + 1, first_line=first_row, size=acc))
            group_start, first_row, acc = g + 1, row, 0
    return pieces or [Piece("parquet", str(path), start=0, end=0, size=0)]


def plan_pieces(sources: list[str], fmt: str, target: int, opts: ReadOptions) -> tuple[list[Piece], list[Issue]]:
    """Resolve sources (files, folders, '-') into ordered pieces; unreadable paths become issues."""
    pieces: list[Piece] = []
    issues: list[Issue] = []

    def add_file(path: Path, doc_id: str, explicit: bool) -> None:
        kind = fmt if fmt != "auto" else detect_format(path)
        if kind is None:
            if not explicit:
                issues.append(Issue("unsupported", str(path), "skipped: not a .txt/.md/.jsonl[.gz|.zst]/.parquet file"))
                return
            kind = "text"
        try:
            if kind == "text":
                pieces.append(Piece("text", str(path), doc_id=doc_id, size=path.stat().st_size))
            elif kind == "jsonl":
                pieces.extend(_jsonl_pieces(path, target))
            else:
                pieces.extend(_parquet_pieces(path, target, opts.text_field))
        except OSError as exc:
            issues.append(Issue("unreadable", str(path), f"cannot read: {exc.strerror or exc}"))
        except Exception as exc:  # pyarrow raises ArrowInvalid for a broken Parquet footer
            issues.append(Issue("unreadable", str(path), f"not a readable {kind} file: {exc}"))

    for src in sources:
        if src == "-":
            pieces.append(Piece("lines", "<stdin>"))
            continue
        path = Path(src)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    f = Path(dirpath) / name
                    add_file(f.resolve(), f.relative_to(path).as_posix(), explicit=False)
        elif path.exists():
            add_file(path.resolve(), path.name, explicit=True)
        else:
            issues.append(Issue("unreadable", src, "no such file or folder"))
    return pieces, issues


def pack_units(pieces: list[Piece], target: int, first_segment: int) -> list[WorkUnit]:
    """Pack pieces in order into units of about `target` bytes, numbered from `first_segment`."""
    units: list[WorkUnit] = []
    current = WorkUnit(first_segment)
    for piece in pieces:
        if current.pieces and current.size + piece.size > target:
            units.append(current)
            current = WorkUnit(first_segment + len(units))
        current.pieces.append(piece)
    if current.pieces:
        units.append(current)
    return units


def stdin_units(stream, target: int, next_segment) -> Iterator[WorkUnit]:
    """Cut JSONL read from a binary stream into units as it arrives (stdin is read once)."""
    lines: list[bytes] = []
    size, first = 0, 1
    for lineno, line in enumerate(stream, 1):
        lines.append(line)
        size += len(line)
        if size >= target:
            yield WorkUnit(next_segment(), [Piece("lines", "<stdin>", first_line=first, size=size, lines=lines)])
            lines, size, first = [], 0, lineno + 1
    if lines:
        yield WorkUnit(next_segment(), [Piece("lines", "<stdin>", first_line=first, size=size, lines=lines)])


# ---------------------------------------------------------------- reading


def read_unit(unit: WorkUnit, opts: ReadOptions) -> Iterator[Document | Issue]:
    for piece in unit.pieces:
        if piece.fmt == "documents":
            yield from piece.documents
        elif piece.fmt == "text":
            yield from _read_text(piece)
        elif piece.fmt == "parquet":
            yield from _read_parquet(piece, opts)
        else:
            yield from _read_jsonl(piece, opts)


def _read_text(piece: Piece) -> Iterator[Document | Issue]:
    try:
        data = Path(piece.path).read_bytes()
    except OSError as exc:
        yield Issue("unreadable", piece.path, f"cannot read: {exc.strerror or exc}")
        return
    if b"\x00" in data[:BINARY_SNIFF]:
        yield Issue("binary", piece.path, "skipped: binary file (NUL bytes); not text")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield Issue("invalid-utf8", f"{piece.path}:{line}", f"invalid UTF-8 at byte {exc.start}; convert the file to UTF-8")
        return
    if not text.strip():
        yield Issue("empty", piece.path, "skipped: empty document")
        return
    yield Document(piece.doc_id or content_id(text), text, piece.path)


def _open_jsonl(piece: Piece):
    name = piece.path.lower()
    if name.endswith(".gz"):
        return gzip.open(piece.path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(piece.path, "rb"), closefd=True))
    f = open(piece.path, "rb")
    f.seek(piece.start)
    return f


def _jsonl_lines(piece: Piece) -> Iterator[tuple[int, bytes]]:
    if piece.lines is not None:
        yield from enumerate(piece.lines, piece.first_line)
        return
    with _open_jsonl(piece) as f:
        remaining = piece.end - piece.start if piece.end >= 0 else None
        for lineno, line in enumerate(f, piece.first_line):
            yield lineno, line
            if remaining is not None:
                remaining -= len(line)
                if remaining <= 0:
                    return


def _record_document(record, where: str, opts: ReadOptions) -> Document | Issue:
    if not isinstance(record, dict):
        return Issue("malformed-json", where, "not a JSON object; each line must be an object")
    text = record.get(opts.text_field)
    if text is None:
        return Issue("missing-field", where, f"no '{opts.text_field}' field; choose the text field with --text-field")
    if not isinstance(text, str):
        return Issue("missing-field", where, f"'{opts.text_field}' is {type(text).__name__}, not a string")
    if not text.strip():
        return Issue("empty", where, "skipped: empty document")
    raw_id = record.get(opts.id_field)
    doc_id = content_id(text) if raw_id is None or raw_id == "" else str(raw_id)
    rest = {k: v for k, v in record.items() if k not in (opts.text_field, opts.id_field)}
    metadata = json.dumps(rest, ensure_ascii=False, default=str) if rest else None
    return Document(doc_id, text, where, metadata)


def _read_jsonl(piece: Piece, opts: ReadOptions) -> Iterator[Document | Issue]:
    try:
        for lineno, line in _jsonl_lines(piece):
            where = f"{piece.path}:{lineno}"
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Issue("invalid-utf8", where, f"invalid UTF-8 at column {exc.start + 1}")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Issue("malformed-json", where, f"malformed JSON: {exc.msg} at column {exc.colno}")
                continue
            yield _record_document(record, where, opts)
    except (OSError, EOFError) as exc:
        yield Issue("unreadable", piece.path, f"cannot read (corrupt or truncated?): {exc}")
    except Exception as exc:  # zstandard.ZstdError and friends
        yield Issue("unreadable", piece.path, f"cannot decompress: {exc}")


def _read_parquet(piece: Piece, opts: ReadOptions) -> Iterator[Document | Issue]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    names = pf.schema_arrow.names
    if opts.text_field not in names:
        yield Issue(
            "missing-field", piece.path, f"no '{opts.text_field}' column (columns: {', '.join(names)}); use --text-field"
        )
        return
    row = piece.first_line
    for batch in pf.iter_batches(row_groups=list(range(piece.start, piece.end)), batch_size=1024):
        for record in batch.to_pylist():
            yield _record_document(record, f"{piece.path}#row{row}", opts)
            row += 1
