"""Input readers: folders of text, JSONL (plain, .gz, .zst), Parquet, stdin.

The planner turns sources into *pieces* (a whole text file, a line range of
a JSONL file, row groups of a Parquet file) and packs pieces into work units
of about `segment_bytes` each; one unit becomes one segment. Readers stream
a unit's pieces as `Document`s, and report bad input as `Issue`s naming the
file and line (or row) so that the --on-error policy can skip or fail.

Each record is its own unit of failure: a JSONL line that cannot be parsed
(malformed, an integer of thousands of digits, nesting thousands deep), a
lone surrogate, an id that is not an id, or a corrupt Parquet row group costs
only itself; the lines and row groups after it are still read. A compressed
file that ends early is reported as truncated after its last whole line.

Folder policy (see docs/design.md, "Input"): regular files are read, and
symlinks to files are followed; hidden entries (names starting with '.') and
symlinks to folders are not entered and are listed as *ignored* (not errors);
FIFOs, sockets and devices are never opened (reading one could block forever)
and, like unreadable folders, symlink loops and file names that are not UTF-8,
are reported as issues.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TEXT_EXTS = (".txt", ".md", ".text", ".rst")
JSONL_EXTS = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst")
PARQUET_EXTS = (".parquet",)
FORMATS = ("auto", "text", "jsonl", "parquet")
BINARY_SNIFF = 8192
MAX_ID_BYTES = 1024  # a document id is at most this many UTF-8 bytes
IGNORED_KINDS = ("hidden", "symlinked-folder")  # skipped by policy: reported, never an error
_BAD_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # control characters and line breaks
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Document:
    doc_id: str
    text: str
    source: str  # file:line, file#row or the file path
    metadata: str | None = None


@dataclass
class Issue:
    # invalid-utf8, binary, empty, malformed-json, missing-field, bad-id, duplicate-id, too-large, unsupported,
    # not-a-file, unreadable, truncated; or, by policy and never an error: hidden, symlinked-folder
    kind: str
    where: str  # file:line (printable: bytes of a non-UTF-8 file name are shown as \xNN)
    message: str
    fields: list[str] | None = None  # missing-field: the fields (or columns) the record does have

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "where": self.where, "message": self.message}
        if self.fields is not None:
            d["fields"] = self.fields
        return d


@dataclass
class Piece:
    fmt: str  # text | jsonl | parquet | lines (stdin JSONL) | documents
    path: str  # absolute path ("<stdin>" for stdin)
    doc_id: str | None = None  # text files: id from the relative path
    start: int = 0  # jsonl: byte offset; parquet: first row group
    end: int = -1  # jsonl: end byte offset (-1: to the end); parquet: row group stop
    first_line: int = 1  # jsonl: line number at `start`; parquet: row number of the first row
    size: int = 0  # bytes, for packing
    lines: list[bytes] | None = None  # stdin JSONL payload
    data: bytes | None = None  # stdin text payload (fmt "text")
    documents: list | None = None  # fmt "documents": Documents made in memory (redact --mode mask)


def unit(segment: int, pieces: list[Piece]) -> dict:
    """An ingest work unit, in the stage contract's shape: {"segment": number, "pieces": [...]}."""
    return {"segment": segment, "pieces": pieces}


def unit_size(u: dict) -> int:
    return sum(p.size for p in u["pieces"])


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


def printable(path) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 become \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- ids


class BadId(ValueError):
    """A value that cannot be a document id (the message says why)."""


def doc_id_of(value) -> str | None:
    """The document id for an input value, or None when the record has none (then its content hash is used).

    An id is a JSON string or integer. An integer is stored as its decimal string, so `1` and `"1"` name the
    same document (the second is reported as a duplicate). A string must be valid Unicode, at most
    MAX_ID_BYTES UTF-8 bytes, without control characters or line breaks (an id must fit on one line of an
    --ids-file) and without leading or trailing whitespace. Missing, null and "" mean "no id".
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = {bool: "boolean", float: "number with a fraction", list: "array", dict: "object"}.get(
            type(value), type(value).__name__)
        raise BadId(f"the id is a {kind}; an id must be a string or an integer")
    text = str(value) if isinstance(value, int) else value
    if m := _SURROGATE.search(text):
        raise BadId(f"the id holds a lone surrogate (U+{ord(m.group()):04X}); it is not valid Unicode")
    if m := _BAD_ID_CHARS.search(text):
        raise BadId(f"the id holds a control character or line break (U+{ord(m.group()):04X} at character "
                    f"{m.start() + 1})")
    if text != text.strip():
        raise BadId("the id starts or ends with whitespace")
    size = len(text.encode("utf-8"))
    if size > MAX_ID_BYTES:
        raise BadId(f"the id is {size:,} bytes long; the limit is {MAX_ID_BYTES:,}")
    return text


def _surrogate_in(text: str, what: str) -> str | None:
    m = _SURROGATE.search(text)
    if m is None:
        return None
    return (f"{what} holds a lone surrogate (U+{ord(m.group()):04X} at character {m.start() + 1}), which is not "
            "valid Unicode; fix the producer of this file")


# ---------------------------------------------------------------- opening input files safely


class NotAFile(OSError):
    """A path that is not a regular file (FIFO, socket, device, folder)."""


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: str | Path):
    """Open an input file for binary reading, refusing anything but a regular file without blocking on it.

    O_NONBLOCK makes opening a FIFO return at once; fstat then tells what was opened (no race with a file
    replaced between listing and reading).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(f"{_file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _os_reason(exc: OSError) -> str:
    import errno

    if isinstance(exc, NotAFile):
        return str(exc)
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT:
        return "no such file (a broken symlink?)"
    return exc.strerror or str(exc)


# ---------------------------------------------------------------- planning


def _jsonl_pieces(path: Path, target: int) -> list[Piece]:
    """Split a plain JSONL file into line-aligned byte ranges of about `target` bytes."""
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        if path.name.lower().endswith((".gz", ".zst")) or size <= target:
            return [Piece("jsonl", str(path), size=size)]
        pieces = []
        start, line = 0, 1
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


def _parquet_pieces(path: Path, target: int) -> list[Piece]:
    import pyarrow.parquet as pq

    with open_input(path) as f:
        meta = pq.ParquetFile(f).metadata
    pieces: list[Piece] = []
    group_start, row, first_row, acc = 0, 1, 1, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        row += meta.row_group(g).num_rows
        if acc >= target or g == meta.num_row_groups - 1:
            pieces.append(Piece("parquet", str(path), start=group_start, end=g + 1, first_line=first_row, size=acc))
            group_start, first_row, acc = g + 1, row, 0
    return pieces or [Piece("parquet", str(path), start=0, end=0, size=0)]


def plan_pieces(sources: list[str], fmt: str, target: int, opts: ReadOptions | None = None
                ) -> tuple[list[Piece], list[Issue]]:
    """Resolve sources (files, folders, '-') into ordered pieces; what cannot be read becomes an issue, and
    what the folder policy leaves out (hidden entries, symlinked folders) an issue of an IGNORED_KINDS kind."""
    pieces: list[Piece] = []
    issues: list[Issue] = []

    def add_file(path: Path, doc_id: str, explicit: bool) -> None:
        where = printable(path)
        try:
            mode = os.stat(path).st_mode  # follows symlinks: a link to a file is read as that file
        except OSError as exc:
            issues.append(Issue("unreadable", where, f"cannot read: {_os_reason(exc)}"))
            return
        if not stat.S_ISREG(mode):
            issues.append(Issue("not-a-file", where, f"skipped: {_file_kind(mode)}, not a regular file"
                                + (" (pipe it into `-` to read it as stdin)" if stat.S_ISFIFO(mode) else "")))
            return
        kind = fmt if fmt != "auto" else detect_format(path)
        if kind is None:
            if not explicit:
                issues.append(Issue("unsupported", where, "skipped: not a .txt/.md/.jsonl[.gz|.zst]/.parquet file "
                                    "(--format text reads every file as text)"))
                return
            kind = "text"
        try:
            if kind == "text":
                try:
                    doc_id = doc_id_of(doc_id)
                except BadId as exc:
                    why = f"cannot be a document id: {exc}" if printable(doc_id) == doc_id else \
                        "is not valid UTF-8, and a document id is UTF-8 text"
                    issues.append(Issue("bad-id", where, f"skipped: the file name {why}; rename the file"))
                    return
                pieces.append(Piece("text", str(path), doc_id=doc_id, size=os.stat(path).st_size))
            elif kind == "jsonl":
                pieces.extend(_jsonl_pieces(path, target))
            else:
                pieces.extend(_parquet_pieces(path, target))
        except OSError as exc:
            issues.append(Issue("unreadable", where, f"cannot read: {_os_reason(exc)}"))
        except Exception as exc:  # pyarrow raises ArrowInvalid for a broken Parquet footer
            issues.append(Issue("unreadable", where, f"not a readable {kind} file: {exc}"))

    def walk(folder: Path) -> None:
        def unreadable(exc: OSError) -> None:
            issues.append(Issue("unreadable", printable(exc.filename or folder),
                                f"cannot read folder: {_os_reason(exc)}; its files were not ingested"))

        for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    issues.append(Issue("hidden", printable(here / d), "hidden folder not read (give it as a "
                                        "source of its own to ingest it)"))
                elif (here / d).is_symlink():
                    issues.append(Issue("symlinked-folder", printable(here / d), "symlink to a folder not followed "
                                        "(give it as a source of its own to ingest it)"))
                else:
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                f = here / name
                if name.startswith("."):
                    issues.append(Issue("hidden", printable(f), "hidden file not read (give it as a source of its "
                                        "own to ingest it)"))
                    continue
                add_file(f.absolute(), f.relative_to(folder).as_posix(), explicit=False)

    if "-" in sources:
        from .errors import UsageError

        if len(sources) > 1:
            raise UsageError("- (stdin) must be the only source", hint="ingest the files in a separate command")
        if fmt == "parquet":
            raise UsageError("stdin is read as JSONL, or as one text document with --format text; not as Parquet",
                             hint="give the Parquet file's path")
    for src in sources:
        if src == "-":
            pieces.append(Piece("text" if fmt == "text" else "lines", "<stdin>"))
            continue
        path = Path(src)
        try:
            is_dir = path.is_dir()
            exists = is_dir or os.path.lexists(path)
        except OSError as exc:
            issues.append(Issue("unreadable", printable(src), f"cannot read: {_os_reason(exc)}"))
            continue
        if is_dir:
            walk(path)
        elif exists:
            add_file(path.absolute(), path.name, explicit=True)
        else:
            issues.append(Issue("unreadable", printable(src), "no such file or folder"))
    return pieces, issues


def pack_units(pieces: list[Piece], target: int, first_segment: int) -> list[dict]:
    """Pack pieces in order into units of about `target` bytes, numbered from `first_segment`."""
    units: list[dict] = []
    current = unit(first_segment, [])
    for piece in pieces:
        if current["pieces"] and unit_size(current) + piece.size > target:
            units.append(current)
            current = unit(first_segment + len(units), [])
        current["pieces"].append(piece)
    if current["pieces"]:
        units.append(current)
    return units


def stdin_units(stream, target: int, next_segment, fmt: str = "jsonl") -> Iterator[dict]:
    """Cut stdin into units as it arrives (it is read once): JSONL lines, or with fmt "text" one document."""
    if fmt == "text":
        data = stream.read()
        if data:
            yield unit(next_segment(), [Piece("text", "<stdin>", size=len(data), data=data)])
        return
    lines: list[bytes] = []
    size, first = 0, 1
    for lineno, line in enumerate(stream, 1):
        lines.append(line)
        size += len(line)
        if size >= target:
            yield unit(next_segment(), [Piece("lines", "<stdin>", first_line=first, size=size, lines=lines)])
            lines, size, first = [], 0, lineno + 1
    if lines:
        yield unit(next_segment(), [Piece("lines", "<stdin>", first_line=first, size=size, lines=lines)])


# ---------------------------------------------------------------- reading


def read_unit(u: dict, opts: ReadOptions) -> Iterator[Document | Issue]:
    for piece in u["pieces"]:
        if piece.fmt == "documents":
            yield from piece.documents
        elif piece.fmt == "text":
            yield from _read_text(piece)
        elif piece.fmt == "parquet":
            yield from _read_parquet(piece, opts)
        else:
            yield from _read_jsonl(piece, opts)


def _read_text(piece: Piece) -> Iterator[Document | Issue]:
    where = printable(piece.path)
    data = piece.data
    if data is None:
        try:
            with open_input(piece.path) as f:
                data = f.read()
        except OSError as exc:
            yield Issue("unreadable", where, f"cannot read: {_os_reason(exc)}")
            return
    if b"\x00" in data[:BINARY_SNIFF]:
        yield Issue("binary", where, "skipped: binary file (NUL bytes); not text")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield Issue("invalid-utf8", f"{where}:{line}", f"invalid UTF-8 at byte {exc.start}; convert the file to UTF-8")
        return
    del data
    if not text.strip():
        yield Issue("empty", where, "skipped: empty document")
        return
    yield Document(piece.doc_id or content_id(text), text, where)


class _ZstdReader(io.RawIOBase):
    """A zstd stream (one or more frames) that raises EOFError if the data ends inside a frame.

    zstandard's own stream_reader returns a clean end of file for a truncated stream; this one does not.
    """

    def __init__(self, raw):
        import zstandard

        self._raw = raw
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._obj = self._new()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            block = self._raw.read(1 << 20)
            if not block:
                if self._in_frame:
                    raise EOFError("the compressed data ends in the middle of a zstd frame (truncated file)")
                return 0
            while block:
                self._in_frame = True
                self._pending += self._obj.decompress(block)
                if not self._obj.eof:
                    break
                block = self._obj.unused_data  # the next frame, if any
                self._obj = self._new()
                self._in_frame = False
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_jsonl(piece: Piece):
    """(stream of decompressed bytes, the file under it)."""
    name = piece.path.lower()
    raw = open_input(piece.path)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20), raw
    raw.seek(piece.start)
    return raw, raw


def _jsonl_lines(piece: Piece) -> Iterator[tuple[int, bytes]]:
    if piece.lines is not None:
        yield from enumerate(piece.lines, piece.first_line)
        return
    f, raw = _open_jsonl(piece)
    try:
        remaining = piece.end - piece.start if piece.end >= 0 else None
        for lineno, line in enumerate(f, piece.first_line):
            yield lineno, line
            if remaining is not None:
                remaining -= len(line)
                if remaining <= 0:
                    return
    finally:
        f.close()
        raw.close()


def _record_document(record, where: str, opts: ReadOptions) -> Document | Issue:
    if not isinstance(record, dict):
        return Issue("malformed-json", where, "not a JSON object; each line must be an object")
    text = record.get(opts.text_field)
    if text is None:
        fields = sorted(str(k) for k in record)
        return Issue("missing-field", where, f"no '{opts.text_field}' field (fields: {', '.join(fields) or 'none'}); "
                     "choose the text field with --text-field", fields=fields)
    if not isinstance(text, str):
        return Issue("missing-field", where, f"'{opts.text_field}' is {type(text).__name__}, not a string",
                     fields=sorted(str(k) for k in record))
    if problem := _surrogate_in(text, f"'{opts.text_field}'"):
        return Issue("invalid-utf8", where, problem)
    if not text.strip():
        return Issue("empty", where, "skipped: empty document")
    try:
        doc_id = doc_id_of(record.get(opts.id_field))
    except BadId as exc:
        return Issue("bad-id", where, f"'{opts.id_field}': {exc}")
    rest = {k: v for k, v in record.items() if k not in (opts.text_field, opts.id_field)}
    metadata = json.dumps(rest, ensure_ascii=False, default=str) if rest else None
    if metadata is not None and (problem := _surrogate_in(metadata, "the metadata")):
        return Issue("invalid-utf8", where, problem)
    return Document(doc_id or content_id(text), text, where, metadata)


def parse_json_line(text: str):
    """json.loads, with the errors of one line (too deep, a huge integer) as ValueError with a short reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply for the JSON parser") from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise ValueError(f"malformed JSON: {str(exc).split(';')[0]}") from None


def _read_jsonl(piece: Piece, opts: ReadOptions) -> Iterator[Document | Issue]:
    path = printable(piece.path)
    lineno = piece.first_line - 1
    try:
        for lineno, line in _jsonl_lines(piece):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Issue("invalid-utf8", where, f"invalid UTF-8 at column {exc.start + 1}")
                continue
            try:
                record = parse_json_line(text)
            except ValueError as exc:
                yield Issue("malformed-json", where, str(exc))
                continue
            yield _record_document(record, where, opts)
    except OSError as exc:
        yield Issue("unreadable", f"{path}:{lineno + 1}", f"cannot read after line {lineno}: {_os_reason(exc)}")
    except EOFError as exc:  # gzip and zstd streams that end early
        yield Issue("truncated", f"{path}:{lineno + 1}", f"the file is truncated after line {lineno}: {exc}; "
                    "the lines before were read")
    except Exception as exc:  # zstandard.ZstdError, zlib.error: corrupt compressed data
        yield Issue("unreadable", f"{path}:{lineno + 1}", f"corrupt compressed data after line {lineno}: {exc}")


def _read_parquet(piece: Piece, opts: ReadOptions) -> Iterator[Document | Issue]:
    import pyarrow.parquet as pq

    path = printable(piece.path)
    try:
        f = open_input(piece.path)
        pf = pq.ParquetFile(f)
    except Exception as exc:
        reason = _os_reason(exc) if isinstance(exc, OSError) else str(exc)
        yield Issue("unreadable", path, f"not a readable parquet file: {reason}")
        return
    with f:
        names = pf.schema_arrow.names
        if opts.text_field not in names:
            yield Issue("missing-field", path, f"no '{opts.text_field}' column (columns: {', '.join(names)}); "
                        "use --text-field", fields=list(names))
            return
        row = piece.first_line
        for g in range(piece.start, piece.end):
            end = row + pf.metadata.row_group(g).num_rows
            try:
                for batch in pf.iter_batches(row_groups=[g], batch_size=1024):
                    for record in batch.to_pylist():
                        yield _record_document(record, f"{path}#row{row}", opts)
                        row += 1
            except Exception as exc:  # a corrupt page: this row group's remaining rows are lost, not the file
                yield Issue("unreadable", f"{path}#row{row}", f"rows {row}-{end - 1} (row group {g}) cannot be "
                            f"read, skipped: {str(exc).splitlines()[0]}")
            row = end
