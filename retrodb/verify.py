"""`retrodb verify`: prove a snapshot is whole and consistent, and list what interrupted commands left.

Verification is a list of checks (`CHECKS`), each a function over a
`Verification` that records findings: errors (the snapshot is damaged:
a missing or altered file, counts that do not line up, broken chunk ids or
continuation pointers) and warnings (harmless leftovers of an interrupted
command, which the next writing command cleans). A new check (e.g. redaction's
`--absent TEXT`) is one more function passed in `extra`.

It reads one snapshot's tables column by column, one segment at a time, so
memory grows with a segment, not with the database. Checksums read every
byte; `quick` compares sizes only. Files are checked against the table
schemas in `schemas/*.json` (the `schema` check), as manifests are when read.

When the snapshot cannot even be opened (CURRENT empty or garbage, a damaged
manifest), verify still reports: what is wrong, and which snapshots can still
be read, each with its files present or not.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import snapshot as snap
from .atomic import TMP_PREFIX, file_digest
from .database import WORK
from .errors import CorruptDatabase, RetrodbError
from .lock import read_holder
from .snapshot import Snapshot


@dataclass
class Finding:
    level: str  # "error" (the snapshot is damaged), "warning" (a harmless leftover) or "info" (state worth knowing)
    check: str
    message: str
    path: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Verification:
    """What checks share: the snapshot under test, options, and the findings so far."""

    root: Path
    snapshot: Snapshot
    quick: bool = False
    findings: list[Finding] = field(default_factory=list)
    damaged: set[str] = field(default_factory=set)  # segments whose files are missing or altered
    check: str = ""

    def error(self, message: str, path: str | None = None) -> None:
        self.findings.append(Finding("error", self.check, message, path))

    def warn(self, message: str, path: str | None = None) -> None:
        self.findings.append(Finding("warning", self.check, message, path))

    def info(self, message: str, path: str | None = None) -> None:
        self.findings.append(Finding("info", self.check, message, path))

    def readable_segments(self):
        """(name, entry) of the segments whose files passed the file check (and could be decoded so far)."""
        return [(n, s) for n, s in sorted(self.snapshot.segments.items()) if n not in self.damaged]

    def table(self, name: str, seg: dict, kind: str, columns: list[str] | None = None):
        """One of a segment's Parquet tables; a file that cannot be decoded is an error naming it, the segment
        is marked damaged (later checks skip it) and `Undecodable` ends this segment's part of the check."""
        import pyarrow.parquet as pq

        from .schema import arrow_schema

        rec = seg["files"][kind]
        try:
            if kind == "tombstones":
                return pq.read_table(self.root / rec["path"], schema=arrow_schema("tombstones"))
            return pq.read_table(self.root / rec["path"], columns=columns)
        except Exception as exc:
            if not isinstance(exc, (OSError, ValueError)) and not type(exc).__module__.startswith("pyarrow"):
                raise
            self.error(f"{name}: {kind} file cannot be decoded: {str(exc).strip().splitlines()[0]}", rec["path"])
            self.damaged.add(name)
            raise Undecodable() from None


class Undecodable(Exception):
    """Raised by Verification.table after recording the error; the check goes on with the next segment."""


Check = Callable[[Verification], None]


@dataclass
class VerifyReport:
    path: str
    version: int
    quick: bool
    checks: list[str]
    findings: list[Finding]
    segments: int
    files: int
    bytes: int
    seconds: float

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"path": self.path, "version": self.version, "ok": self.ok, "quick": self.quick,
                "errors": len(self.errors), "warnings": len(self.warnings), "checks": self.checks,
                "segments": self.segments, "files": self.files, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "findings": [f.to_dict() for f in self.findings]}


# ---------------------------------------------------------------- checks


def check_files(v: Verification) -> None:
    """Every file the snapshot references exists and has its recorded size (and sha256 unless quick)."""
    for name, seg in sorted(v.snapshot.segments.items()):
        for kind, rec in sorted(seg["files"].items()):
            path = v.root / rec["path"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                v.error(f"{name}: {kind} file is missing", rec["path"])
                v.damaged.add(name)
                continue
            if size != rec["bytes"]:
                v.error(f"{name}: {kind} file has {size:,} bytes, the manifest says {rec['bytes']:,}", rec["path"])
                v.damaged.add(name)
            elif not v.quick and file_digest(path) != rec["sha256"]:
                v.error(f"{name}: {kind} file content differs from its recorded sha256", rec["path"])
                v.damaged.add(name)


def check_rows(v: Verification) -> None:
    """Per segment: documents, chunks, keys and index agree with each other and with the manifest counts;
    each document's chunks are consecutive rows with ids first_chunk_id + position; continuation pointers
    name the next chunk of the same document (null for its last)."""
    dim = (v.snapshot.config.get("embedder") or {}).get("dim")
    for name, seg in v.readable_segments():
        files = seg["files"]
        try:
            docs = v.table(name, seg, "documents", ["doc_id", "num_tokens", "num_chunks", "first_chunk_id"])
            chunks = v.table(name, seg, "chunks", ["chunk_id", "doc_id", "position", "num_tokens", "continuation_id"])
        except Undecodable:
            continue
        for what, have, want in (("documents", docs.num_rows, seg["documents"]),
                                 ("chunks", chunks.num_rows, seg["chunks"]),
                                 ("tokens (documents)", _sum(docs["num_tokens"]), seg["tokens"]),
                                 ("tokens (chunks)", _sum(chunks["num_tokens"]), seg["tokens"]),
                                 ("chunks (documents.num_chunks)", _sum(docs["num_chunks"]), seg["chunks"])):
            if have != want:
                v.error(f"{name}: {have:,} {what}, the manifest says {want:,}", files["documents"]["path"])
        doc_ids = docs["doc_id"].to_numpy(zero_copy_only=False)
        if len(set(doc_ids.tolist())) != len(doc_ids):
            v.error(f"{name}: a document id appears twice in the segment", files["documents"]["path"])
        if _sum(docs["num_chunks"]) == chunks.num_rows:
            _check_chunk_layout(v, name, files["chunks"]["path"], docs, chunks)
        if "keys" in files:
            _check_keys(v, name, files["keys"]["path"], seg["chunks"], dim)
        if "index" in files:
            count = _hnsw_element_count(v.root / files["index"]["path"])
            if count != seg["chunks"]:
                v.error(f"{name}: index holds {count:,} elements for {seg['chunks']:,} chunks", files["index"]["path"])


def _sum(column) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(column).as_py() or 0)


def _check_chunk_layout(v: Verification, name: str, path: str, docs, chunks) -> None:
    n_chunks = docs["num_chunks"].to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(n_chunks)[:-1]]).astype(np.int64)
    row_doc = np.repeat(np.arange(docs.num_rows), n_chunks)
    want_pos = np.arange(chunks.num_rows, dtype=np.int64) - starts[row_doc]
    want_id = docs["first_chunk_id"].to_numpy()[row_doc] + want_pos
    chunk_ids = chunks["chunk_id"].to_numpy()
    problems = [
        ("doc_id does not match its document's rows",
         chunks["doc_id"].to_numpy(zero_copy_only=False) != docs["doc_id"].to_numpy(zero_copy_only=False)[row_doc]),
        ("position is not its index within the document", chunks["position"].to_numpy() != want_pos),
        ("chunk_id is not first_chunk_id + position", chunk_ids != want_id),
    ]
    last = np.zeros(chunks.num_rows, dtype=bool)
    last[starts + n_chunks - 1] = n_chunks > 0
    cont = chunks["continuation_id"]
    null = cont.is_null().to_numpy(zero_copy_only=False)
    values = cont.fill_null(-1).to_numpy()
    nxt = np.append(chunk_ids[1:], -1)
    problems.append(("continuation_id is not null on a document's last chunk", last & ~null))
    problems.append(("continuation_id does not name the next chunk of the same document",
                     ~last & (null | (values != nxt))))
    for message, bad in problems:
        if bad.any():
            row = int(np.argmax(bad))
            v.error(f"{name}: {int(bad.sum()):,} chunk(s): {message} (first: row {row}, chunk_id {chunk_ids[row]})",
                    path)


def _check_keys(v: Verification, name: str, path: str, chunks: int, dim: int | None) -> None:
    from .schema import spec

    want_dtype = np.dtype(spec("keys")["dtype"])
    try:
        with open(v.root / path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except ValueError as exc:
        v.error(f"{name}: keys file is not a .npy array ({exc})", path)
        return
    want = (chunks, dim) if dim else (chunks,) + tuple(shape[1:])
    if tuple(shape) != want or dtype != want_dtype:
        v.error(f"{name}: keys are {dtype}{list(shape)}, expected {want_dtype}{list(want)}", path)


def _hnsw_element_count(path: Path) -> int:
    """hnswlib's saved header starts with offsetLevel0, max_elements, cur_element_count (size_t each)."""
    with open(path, "rb") as f:
        return struct.unpack("<QQQ", f.read(24))[2]


def check_chunk_ids(v: Verification) -> None:
    """Chunk ids are unique across the snapshot: every document owns the range first_chunk_id .. + num_chunks - 1
    (check_rows proves it), and no two ranges overlap."""
    firsts, counts, owners, names = [], [], [], []
    for name, seg in v.readable_segments():
        try:
            t = v.table(name, seg, "documents", ["first_chunk_id", "num_chunks"])
        except Undecodable:
            continue
        firsts.append(t["first_chunk_id"].to_numpy())
        counts.append(t["num_chunks"].to_numpy().astype(np.int64))
        owners.append(np.full(t.num_rows, len(names)))
        names.append(name)
    if not names:
        return
    first, count, owner = (np.concatenate(x) for x in (firsts, counts, owners))
    order = np.argsort(first, kind="stable")
    first, end, owner = first[order], first[order] + count[order], owner[order]
    overlap = first[1:] < end[:-1]
    if overlap.any():
        i = int(np.argmax(overlap))
        v.error(f"{int(overlap.sum()):,} chunk id range(s) overlap, e.g. id {first[i + 1]} is used in both "
                f"{names[owner[i]]} and {names[owner[i + 1]]}")


def check_tombstones(v: Verification) -> None:
    """Tombstones name documents of their own segment (with the same chunk range), once, and the manifest's
    deleted_* counts are their totals."""
    for name, seg in v.readable_segments():
        rec = seg["files"].get("tombstones")
        counts = [seg.get(k, 0) for k in ("deleted_documents", "deleted_chunks", "deleted_tokens")]
        if rec is None:
            if any(counts):
                v.error(f"{name}: the manifest counts deleted rows but the segment has no tombstones file")
            continue
        try:
            t = v.table(name, seg, "tombstones")
            docs = v.table(name, seg, "documents", ["doc_id", "first_chunk_id", "num_chunks", "num_tokens"])
        except Undecodable:
            continue
        by_id = {d: (f, n, k) for d, f, n, k in zip(*(docs[c].to_pylist() for c in docs.column_names))}
        ids = t["doc_id"].to_pylist()
        if len(set(ids)) != len(ids):
            v.error(f"{name}: a document is tombstoned twice", rec["path"])
        tokens = 0
        for d, f, n in zip(ids, t["first_chunk_id"].to_pylist(), t["num_chunks"].to_pylist()):
            if d not in by_id:
                v.error(f"{name}: tombstone for {d!r}, which is not a document of this segment", rec["path"])
            elif by_id[d][:2] != (f, n):
                v.error(f"{name}: tombstone for {d!r} says chunks {f}+{n}, the document has "
                        f"{by_id[d][0]}+{by_id[d][1]}", rec["path"])
            else:
                tokens += by_id[d][2]
        have = [t.num_rows, _sum(t["num_chunks"]), tokens]
        if have != counts:
            v.error(f"{name}: tombstones hold {have[0]} documents / {have[1]} chunks / {have[2]} tokens, the "
                    f"manifest says {counts[0]} / {counts[1]} / {counts[2]}", rec["path"])


def check_retained(v: Verification) -> None:
    """Every other retained snapshot still has all its files (sizes only), so `--at` works on each. Files it
    shares with the snapshot under test were checked by check_files."""
    checked = {rec["path"] for rec in v.snapshot.files()}
    for version in snap.retained_versions(v.root):
        if version == v.snapshot.version:
            continue
        try:
            other = snap.read_manifest(v.root, version)
        except RetrodbError as exc:
            v.error(f"retained snapshot v{version} cannot be read: {exc.message}")
            continue
        for rec in other.files():
            if rec["path"] in checked:
                continue
            path = v.root / rec["path"]
            if not path.exists() or path.stat().st_size != rec["bytes"]:
                v.error(f"retained snapshot v{version} references {'a missing' if not path.exists() else 'an altered'}"
                        f" file", rec["path"])


def check_leftovers(v: Verification) -> None:
    """Leftovers of interrupted commands (harmless, cleaned by the next writer, or by vacuum): temporary files,
    unfinished jobs, uncommitted manifests, unreferenced segment files, a stale writer lock."""
    root = v.root
    for tmp in sorted(root.rglob(f"{TMP_PREFIX}*")):
        v.warn("temporary file of an interrupted write (the next writing command removes it)", _rel(root, tmp))
    work = root / WORK
    for job in sorted(work.iterdir()) if work.exists() else []:
        v.warn(f"unfinished job {job.name} (rerun the same command to resume it; any other writing command "
               "removes it)", _rel(root, job))
    current = snap.current_version(root)
    for version in snap.manifest_versions(root):
        if version > current:
            v.warn(f"manifest v{version} was never committed (the next writing command removes it)",
                   f"{snap.MANIFESTS}/{snap.manifest_name(version)}")
    referenced = referenced_paths(root)
    seg_root = root / snap.SEGMENTS
    for d in sorted(seg_root.iterdir()) if seg_root.exists() else []:
        files = [p for p in d.iterdir() if not p.name.startswith(TMP_PREFIX)] if d.is_dir() else [d]
        stray = [p for p in files if _rel(root, p) not in referenced]
        if stray and len(stray) == len(files):
            v.warn("segment directory no retained snapshot references (`retrodb vacuum` removes it)", _rel(root, d))
        else:
            for p in stray:
                v.warn("file no retained snapshot references (`retrodb vacuum` removes it)", _rel(root, p))
    holder = read_holder(root)
    if holder:
        if holder.get("host") not in (None, socket.gethostname()):
            v.warn(f"the writer lock names pid {holder.get('pid')} on host {holder['host']} ('{holder.get('command')}'"
                   "); if that process is gone, the next writer takes the lock over", "LOCK")
        elif _alive(holder.get("pid")):
            v.warn(f"a writer is running now: pid {holder['pid']} ('{holder.get('command')}', since "
                   f"{holder.get('since')}); its uncommitted files show up as leftovers", "LOCK")
        else:
            v.warn(f"stale writer lock of pid {holder.get('pid')} ('{holder.get('command')}', since "
                   f"{holder.get('since')}), which is gone; the next writer takes it over", "LOCK")


def referenced_paths(root: Path) -> set[str]:
    """Relative paths of every file a committed, retained snapshot references."""
    out: set[str] = set()
    for version in snap.retained_versions(root):
        try:
            out.update(rec["path"] for rec in snap.read_manifest(root, version).files())
        except RetrodbError:
            continue
    return out


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_pending(v: Verification) -> None:
    """A redaction that did not finish is an error: the text may still be on disk."""
    from .redact import CHECK_FILE

    pending = (v.snapshot.data.get("pending") or {}).get("redaction")
    if not pending and (v.root / CHECK_FILE).exists():
        v.warn("leftover of a redaction interrupted before it started (it may list the strings to remove); the next "
               "`retrodb redact` removes it", CHECK_FILE)
    if pending:
        v.error(f"redaction incomplete (started by v{pending['audit']['version_before'] + 1}, segments "
                f"{', '.join(pending['segments'])}): removed text may still be on disk; rerun `retrodb redact "
                f"{v.root}` (any selector) to finish it")


def check_neighbours(v: Verification) -> None:
    """Stored neighbours: well-formed files, no chunk a redaction removed, staleness (see retrodb/neighbours.py)."""
    from .neighbours import verify_check

    verify_check(v)


def check_schema(v: Verification) -> None:
    """Every Parquet file has the columns, types and nullability of its table in schemas/*.json (token ids of
    the config's token type), and every retained manifest fits schemas/manifest.json."""
    import pyarrow.parquet as pq

    from .schema import arrow_schema, manifest_problems

    token_type = v.snapshot.config["tokenizer"].get("token_type", "uint32")
    for name, seg in v.readable_segments():
        for kind in ("documents", "chunks", "tombstones", "neighbours"):
            rec = seg["files"].get(kind)
            if rec is None:
                continue
            want = arrow_schema(kind, token_type)
            try:
                meta = pq.read_metadata(v.root / rec["path"])
            except Exception as exc:
                if not isinstance(exc, (OSError, ValueError)) and not type(exc).__module__.startswith("pyarrow"):
                    raise
                v.error(f"{name}: {kind} file is not readable Parquet: {str(exc).strip().splitlines()[0]}",
                        rec["path"])
                v.damaged.add(name)
                break
            for problem in _schema_differences(meta, want):
                v.error(f"{name}: {kind} file {problem} (schemas/{kind}.json)", rec["path"])
    for version in snap.retained_versions(v.root):
        path = v.root / snap.MANIFESTS / snap.manifest_name(version)
        try:
            import json

            problems = manifest_problems(json.loads(path.read_bytes()))
        except (OSError, ValueError) as exc:
            problems = [f"not readable JSON ({exc})"]
        for problem in problems:
            v.error(f"manifest v{version}: {problem} (schemas/manifest.json)", _rel(v.root, path))


def _schema_differences(meta, want) -> list[str]:
    """How a Parquet file's schema (from its metadata) differs from `want`: missing, mistyped or unknown
    columns, and nulls in a column the schema says is never null."""
    have = meta.schema.to_arrow_schema()
    out = []
    for want_field in want:
        name = want_field.name
        if name not in have.names:
            out.append(f"has no column '{name}'")
            continue
        got = have.field(name)
        if not got.type.equals(want_field.type):
            out.append(f"column '{name}' is {got.type}, not {want_field.type}")
        elif got.nullable and not want_field.nullable:
            j = have.get_field_index(name)
            stats = [meta.row_group(i).column(j).statistics for i in range(meta.num_row_groups)]
            nulls = sum(s.null_count for s in stats if s is not None and s.has_null_count)
            if nulls or any(s is None or not s.has_null_count for s in stats):
                out.append(f"column '{name}' holds {nulls or 'unknown'} null(s); the schema says it never is")
    extra = [n for n in have.names if n not in want.names]
    if extra:
        out.append(f"has columns the schema does not know: {', '.join(extra)}")
    return out


CHECKS: list[tuple[str, Check]] = [
    ("pending", check_pending),
    ("files", check_files),
    ("schema", check_schema),
    ("rows", check_rows),
    ("chunk_ids", check_chunk_ids),
    ("tombstones", check_tombstones),
    ("neighbours", check_neighbours),
    ("retained", check_retained),
    ("leftovers", check_leftovers),
]


def verify(root: str | Path, *, at: int | None = None, quick: bool = False,
           extra: list[tuple[str, Check]] | None = None) -> VerifyReport:
    """Run every check (plus `extra`) on the current snapshot (or version `at`) of the database at `root`."""
    from .database import open as open_db

    started = time.perf_counter()
    try:
        db = open_db(root, at)
    except CorruptDatabase as exc:  # CURRENT or a manifest is damaged: say so, and what can still be read
        return diagnose(Path(root), exc, time.perf_counter() - started)
    v = Verification(db.root, db.snapshot, quick)
    names = []
    for name, check in CHECKS + list(extra or []):
        v.check = name
        names.append(name)
        try:
            check(v)
        except RetrodbError as exc:
            v.error(f"could not complete: {exc.message}")
        except (OSError, ValueError, KeyError, struct.error) as exc:  # a file too damaged to parse
            v.error(f"could not complete: {type(exc).__name__}: {exc}")
        except Exception as exc:  # pyarrow's ArrowInvalid for a broken Parquet file
            if type(exc).__module__.startswith("pyarrow"):
                v.error(f"could not complete: {type(exc).__name__}: {exc}")
            else:
                raise
    files = db.snapshot.files()
    return VerifyReport(str(db.root), db.version, quick, names, v.findings, len(db.snapshot.segments), len(files),
                        sum(f["bytes"] for f in files), time.perf_counter() - started)


def diagnose(root: Path, exc: CorruptDatabase, seconds: float) -> VerifyReport:
    """The report for a database whose snapshot cannot be opened: the damage, then every manifest on disk
    that can still be read, with whether its files are all present (sizes), newest complete one named."""
    findings = [Finding("error", "current", exc.message)]
    complete = []
    for version in snap.manifest_versions(root):
        path = root / snap.MANIFESTS / snap.manifest_name(version)
        try:
            s = Snapshot(root, snap.load_manifest(path))
        except RetrodbError as err:
            findings.append(Finding("error", "snapshots", f"v{version} cannot be read: {err.message}",
                                    _rel(root, path)))
            continue
        missing = [rec["path"] for rec in s.files()
                   if not (root / rec["path"]).is_file() or (root / rec["path"]).stat().st_size != rec["bytes"]]
        if missing:
            findings.append(Finding("warning", "snapshots", f"v{version} ({s.data['command']}, {s.data['created']}) "
                                    f"can be read but {len(missing)} of its files are missing or altered",
                                    _rel(root, path)))
        else:
            complete.append(version)
            findings.append(Finding("warning", "snapshots", f"v{version} ({s.data['command']}, {s.data['created']}, "
                                    f"{s.totals()['documents']:,} documents) can be read and has all its files",
                                    _rel(root, path)))
    if complete:
        newest = complete[-1]
        findings.append(Finding("error", "current", f"the newest complete snapshot is v{newest}; to make it current "
                                f"again: printf '{snap.manifest_name(newest)}\\n' > {root / snap.CURRENT}"))
    else:
        findings.append(Finding("error", "current", "no snapshot can be read with all its files"))
    return VerifyReport(str(root), -1, False, ["current", "snapshots"], findings, 0, 0, 0, seconds)
