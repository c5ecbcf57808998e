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
from .snapshot import Segment, Snapshot


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
    _segments: list | None = None

    def error(self, message: str, path: str | None = None) -> None:
        self.findings.append(Finding("error", self.check, message, path))

    def warn(self, message: str, path: str | None = None) -> None:
        self.findings.append(Finding("warning", self.check, message, path))

    def info(self, message: str, path: str | None = None) -> None:
        self.findings.append(Finding("info", self.check, message, path))

    def segments(self) -> list[Segment]:
        """Every segment of the snapshot (every group manifest is read once, then kept)."""
        if self._segments is None:
            self._segments = list(self.snapshot.segments.values())
        return self._segments

    def readable_segments(self) -> list[Segment]:
        """The segments whose files passed the file check (and could be decoded so far)."""
        return [s for s in self.segments() if s.name not in self.damaged]

    def table(self, seg: Segment, kind: str, columns: list[str] | None = None):
        """One of a segment's Parquet tables; a file that cannot be decoded is an error naming it, the segment
        is marked damaged (later checks skip it) and `Undecodable` ends this segment's part of the check."""
        import pyarrow.parquet as pq

        from .schema import arrow_schema

        name = seg.name
        rec = seg.files[kind]
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
    """Every file the snapshot references exists and has its recorded size (and sha256 unless quick): segment
    files, group manifests, id runs and index shards."""
    for seg in v.segments():
        for kind, rec in sorted(seg.files.items()):
            if not _check_file(v, rec, f"{seg.name}: {kind} file"):
                v.damaged.add(seg.name)
    for rec in v.snapshot.metadata_records():
        _check_file(v, rec, rec["path"].split("/")[0] if not rec["path"].startswith("manifests/")
                    else "group manifest")


def _check_file(v: Verification, rec: dict, what: str) -> bool:
    path = v.root / rec["path"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        v.error(f"{what} is missing", rec["path"])
        return False
    if size != rec["bytes"]:
        v.error(f"{what} has {size:,} bytes, the manifest says {rec['bytes']:,}", rec["path"])
        return False
    if not v.quick and file_digest(path) != rec["sha256"]:
        v.error(f"{what} content differs from its recorded sha256", rec["path"])
        return False
    return True


def check_rows(v: Verification) -> None:
    """Per segment: documents, chunks, keys and index agree with each other and with the manifest counts;
    each document's chunks are consecutive rows with ids first_chunk_id + position; continuation pointers
    name the next chunk of the same document (null for its last)."""
    dim = (v.snapshot.config.get("embedder") or {}).get("dim")
    for seg in v.readable_segments():
        name, files = seg.name, seg.files
        try:
            docs = v.table(seg, "documents", ["doc_id", "num_tokens", "num_chunks", "first_chunk_id"])
            chunks = v.table(seg, "chunks", ["chunk_id", "doc_id", "position", "num_tokens", "continuation_id"])
        except Undecodable:
            continue
        for what, have, want in (("documents", docs.num_rows, seg.documents),
                                 ("chunks", chunks.num_rows, seg.chunks),
                                 ("tokens (documents)", _sum(docs["num_tokens"]), seg.tokens),
                                 ("tokens (chunks)", _sum(chunks["num_tokens"]), seg.tokens),
                                 ("chunks (documents.num_chunks)", _sum(docs["num_chunks"]), seg.chunks)):
            if have != want:
                v.error(f"{name}: {have:,} {what}, the manifest says {want:,}", files["documents"]["path"])
        doc_ids = docs["doc_id"].to_numpy(zero_copy_only=False)
        if len(set(doc_ids.tolist())) != len(doc_ids):
            v.error(f"{name}: a document id appears twice in the segment", files["documents"]["path"])
        if _sum(docs["num_chunks"]) == chunks.num_rows:
            _check_chunk_layout(v, name, files["chunks"]["path"], docs, chunks)
        if "store" in files:
            _check_store(v, seg)
        if "keys" in files:
            _check_keys(v, name, files["keys"]["path"], seg.chunks, dim)
        if "index" in files:
            count = _hnsw_element_count(v.root / files["index"]["path"])
            if count != seg.chunks:
                v.error(f"{name}: index holds {count:,} elements for {seg.chunks:,} chunks", files["index"]["path"])


def _check_store(v: Verification, seg: Segment) -> None:
    """The chunk store holds what documents.parquet and chunks.parquet say, row for row."""
    import pyarrow.compute as pc

    from .store import ChunkStore

    rec = seg.files["store"]
    try:
        store = ChunkStore(v.root / rec["path"]).table()
        chunks = v.table(seg, "chunks", ["chunk_id", "doc_id", "position", "char_start", "char_end", "tokens",
                                         "continuation_id"])
        docs = v.table(seg, "documents", ["doc_id", "text"])
    except Undecodable:
        return
    except Exception as exc:
        if not isinstance(exc, (OSError, ValueError)) and not type(exc).__module__.startswith("pyarrow"):
            raise
        v.error(f"{seg.name}: store file cannot be decoded: {str(exc).strip().splitlines()[0]}", rec["path"])
        v.damaged.add(seg.name)
        return
    if store is None or store.num_rows != chunks.num_rows:
        v.error(f"{seg.name}: store holds {0 if store is None else store.num_rows:,} rows for {chunks.num_rows:,} "
                "chunks", rec["path"])
        return
    for column in ("chunk_id", "doc_id", "position", "continuation_id"):
        if not store[column].cast(chunks[column].type).equals(chunks[column]):
            v.error(f"{seg.name}: store column {column} differs from chunks.parquet", rec["path"])
            return
    if not pc.all(pc.equal(pc.list_flatten(store["tokens"]), pc.list_flatten(chunks["tokens"]))).as_py() \
            and store.num_rows:
        v.error(f"{seg.name}: store tokens differ from chunks.parquet", rec["path"])
    text_of = dict(zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist()))
    want = [text_of.get(d, "")[a:b] for d, a, b in zip(chunks["doc_id"].to_pylist(), chunks["char_start"].to_pylist(),
                                                       chunks["char_end"].to_pylist())]
    if store["text"].to_pylist() != want:
        v.error(f"{seg.name}: store text differs from the documents' text over the chunks' spans", rec["path"])


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
    for seg in v.readable_segments():
        name = seg.name
        try:
            t = v.table(seg, "documents", ["first_chunk_id", "num_chunks"])
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
    for seg in v.readable_segments():
        name = seg.name
        rec = seg.files.get("tombstones")
        counts = [seg.deleted_documents, seg.deleted_chunks, seg.deleted_tokens]
        if rec is None:
            if any(counts):
                v.error(f"{name}: the manifest counts deleted rows but the segment has no tombstones file")
            continue
        try:
            t = v.table(seg, "tombstones")
            docs = v.table(seg, "documents", ["doc_id", "first_chunk_id", "num_chunks", "num_tokens"])
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
    """Every other retained snapshot still has all its files (sizes only), so `--at` works on each. A group
    manifest shared by several snapshots is checked once, and a file once; each snapshot that references a
    missing or altered one is named."""
    bad: dict[str, str] = {}  # path -> "a missing" / "an altered"
    checked = {rec["path"] for rec in v.snapshot.all_records()}
    by_group: dict[tuple, list[str]] = {(r.path, r.removed): [] for r in v.snapshot.group_refs if r.path}

    def state(rec: dict) -> str | None:
        if rec["path"] in checked and rec["path"] not in bad:
            return None
        checked.add(rec["path"])
        path = v.root / rec["path"]
        if not path.exists():
            bad[rec["path"]] = "a missing"
        elif path.stat().st_size != rec["bytes"]:
            bad[rec["path"]] = "an altered"
        return bad.get(rec["path"])

    for version in snap.retained_versions(v.root):
        if version == v.snapshot.version:
            continue
        try:
            other = snap.read_manifest(v.root, version)
            found = [rec["path"] for rec in other.metadata_records() if state(rec)]
            for i, ref in enumerate(other.group_refs):
                key = (ref.path, ref.removed)  # the same file with other segments removed is another group
                if ref.path is None or key not in by_group:
                    by_group[key] = [rec["path"] for seg in other.group(i).values()
                                     for rec in seg.files.values() if state(rec)]
                found += by_group[key]
        except RetrodbError as exc:
            v.error(f"retained snapshot v{version} cannot be read: {exc.message}")
            continue
        for path in dict.fromkeys(found):
            v.error(f"retained snapshot v{version} references {bad[path]} file", path)


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
    for top, what in ((snap.SEGMENTS, "segment"), ("indexes", "index shard")):
        for d in sorted((root / top).iterdir()) if (root / top).exists() else []:
            files = [p for p in d.iterdir() if not p.name.startswith(TMP_PREFIX)] if d.is_dir() else [d]
            stray = [p for p in files if _rel(root, p) not in referenced]
            if stray and len(stray) == len(files):
                v.warn(f"{what} directory no retained snapshot references (`retrodb vacuum --full` removes it)",
                       _rel(root, d))
            else:
                for p in stray:
                    v.warn("file no retained snapshot references (`retrodb vacuum --full` removes it)", _rel(root, p))
    for top in ("ids", snap.GROUPS):
        for p in sorted((root / top).iterdir()) if (root / top).exists() else []:
            if not p.name.startswith(TMP_PREFIX) and _rel(root, p) not in referenced:
                v.warn("file no retained snapshot references (`retrodb vacuum --full` removes it)", _rel(root, p))
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
            out.update(rec["path"] for rec in snap.read_manifest(root, version).all_records())
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

    pending = v.snapshot.pending.get("redaction")
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
    for seg in v.readable_segments():
        name = seg.name
        for kind in ("documents", "chunks", "tombstones", "neighbours", "store"):
            rec = seg.files.get(kind)
            if rec is None:
                continue
            want = arrow_schema(kind, token_type)
            if kind == "store":
                problem = _store_schema_problem(v.root / rec["path"], want)
                if problem:
                    v.error(f"{name}: store file {problem} (schemas/store.json)", rec["path"])
                continue
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
    import json

    from .schema import group_problems

    for version in snap.retained_versions(v.root):
        path = v.root / snap.MANIFESTS / snap.manifest_name(version)
        try:
            problems = manifest_problems(json.loads(path.read_bytes()))
        except (OSError, ValueError) as exc:
            problems = [f"not readable JSON ({exc})"]
        for problem in problems:
            v.error(f"manifest v{version}: {problem} (schemas/manifest.json)", _rel(v.root, path))
    if v.snapshot.list_record:
        from .schema import group_list_problems

        rec = v.snapshot.list_record
        try:
            problems = group_list_problems(json.loads((v.root / rec["path"]).read_bytes()))
        except (OSError, ValueError) as exc:
            problems = [f"not readable JSON ({exc})"]
        for problem in problems:
            v.error(f"group list: {problem}", rec["path"])
    for ref in v.snapshot.group_refs:
        if ref.path is None:
            continue
        try:
            problems = group_problems(json.loads((v.root / ref.path).read_bytes()))
        except (OSError, ValueError) as exc:
            problems = [f"not readable JSON ({exc})"]
        for problem in problems:
            v.error(f"group manifest: {problem} (schemas/group.json)", ref.path)


def _store_schema_problem(path: Path, want) -> str | None:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path), "r") as source:
            have = pa.ipc.open_file(source).schema
    except (OSError, pa.ArrowException) as exc:
        return f"is not a readable Arrow IPC file: {str(exc).strip().splitlines()[0]}"
    if not have.equals(want):
        return f"has the schema {have}, not {want}".replace("\n", "; ")
    return None


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


def check_summaries(v: Verification) -> None:
    """The root's counts are the sum of its groups' summaries, and each group's summary is what its segments
    add up to (stats, log and planning read the summaries alone), and each group holds only segments of its
    range."""
    from dataclasses import replace

    from .snapshot import combine, load_group, summarize

    refs = v.snapshot.group_refs
    for i, ref in enumerate(refs):
        if ref.path is None:
            continue
        segs = list(v.snapshot.group(i).values())
        if summarize(segs) != ref.summary:
            v.error("the root's summary of a group differs from its segments", ref.path)
        upper = refs[i + 1].lo if i + 1 < len(refs) else None
        if any(s.number < ref.lo or (upper is not None and s.number >= upper) for s in segs):
            v.error("a group manifest holds a segment outside its range", ref.path)
        if ref.removed:
            held = set(load_group(v.root, replace(ref, removed=())))
            if not set(ref.removed) <= held:
                v.error("the root removes segments its group manifest does not hold", ref.path)
    if v.snapshot.format_version >= 2 and combine(r.summary for r in refs) != v.snapshot.totals_summary:
        v.error("the root's totals differ from the sum of its groups' summaries")


def check_ids(v: Verification) -> None:
    """The id index: every document of every live segment is in the id runs, once, with its segment, first
    chunk id and counts; each run is sorted by doc_id (a lookup relies on it)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .ids import run_schema, segment_rows

    if not v.snapshot.ids_indexed:
        v.info("document ids are found by reading every segment until the next commit upgrades this database")
        return
    runs = []
    for run in v.snapshot.id_runs:
        t = pq.read_table(v.root / run["path"], schema=run_schema())
        ids = t["doc_id"]
        if t.num_rows > 1 and not pc.all(pc.less_equal(ids.slice(0, t.num_rows - 1), ids.slice(1))).as_py():
            v.error("id run is not sorted by doc_id", run["path"])
        if t.num_rows != run["rows"]:
            v.error(f"id run holds {t.num_rows:,} rows, the root says {run['rows']:,}", run["path"])
        runs.append(t)
    live = {s.number for s in v.segments()}
    indexed = pa.concat_tables(runs) if runs else run_schema().empty_table()
    indexed = indexed.filter(pc.is_in(indexed["segment"], value_set=pa.array(sorted(live), pa.int64())))
    want = pa.concat_tables([segment_rows(v.root, s) for s in v.readable_segments()] or [run_schema().empty_table()])
    key = [("segment", "ascending"), ("doc_id", "ascending")]
    have = indexed.sort_by(key).to_pylist()
    want_rows = want.sort_by(key).to_pylist()
    if have != want_rows and not v.damaged:
        missing = [r for r in want_rows if r not in have]
        extra = len(have) - (len(want_rows) - len(missing))
        first = f" (first: {missing[0]['doc_id']!r} of seg-{missing[0]['segment']:06d})" if missing else ""
        v.error(f"the id index misses {len(missing):,} document(s){first} and has {max(extra, 0):,} row(s) too many")


def check_indexes(v: Verification) -> None:
    """The index units of the root: every segment with keys is searched once (its own index, listed in the root,
    or the shard it names, or exactly when it has neither); a shard's file holds its vectors, its ranges name
    live segments that name it back (or are dead), and its dead ranges lie within its ranges."""
    import numpy as np

    from .shards import covered, read_dead, read_ranges

    units = {u["name"]: u for u in v.snapshot.index_units}
    by_segment = {u["segment"]: u for u in units.values() if u["kind"] == "segment"}
    members: dict[str, set[int]] = {n: set() for n, u in units.items() if u["kind"] == "shard"}
    for seg in v.segments():
        if seg.shard is not None:
            if seg.shard not in units:
                v.error(f"{seg.name} names index shard {seg.shard}, which the root does not list")
            else:
                members[seg.shard].add(seg.number)
            if "index" in seg.files:
                v.error(f"{seg.name} has an index of its own and a shard")
        elif "index" in seg.files and "keys" in seg.files:
            u = by_segment.get(seg.number)
            if u is None or u["files"]["index"] != seg.files["index"] or \
                    u["files"].get("tombstones") != seg.files.get("tombstones"):
                v.error(f"{seg.name}: its index is not listed (as it is) among the root's index units")
    for n, u in by_segment.items():
        seg = v.snapshot.segment(n)
        if seg is None or seg.shard is not None or "index" not in seg.files:
            v.error(f"the root lists an index unit for {u['name']}, which is not a live segment with its own index")
    for name, u in units.items():
        if u["kind"] != "shard":
            continue
        path = u["files"]["index"]["path"]
        count = _hnsw_element_count(v.root / path)
        if count != u["vectors"]:
            v.error(f"index shard {name} holds {count:,} elements, the root says {u['vectors']:,}", path)
        ranges = read_ranges(v.root, u)
        dead = read_dead(v.root, u)
        if covered(ranges[:, :2]) != u["vectors"]:
            v.error(f"index shard {name}: its ranges cover {covered(ranges[:, :2]):,} chunks for {u['vectors']:,} "
                    "vectors", u["files"]["ranges"]["path"])
        if u["files"].get("store"):
            from .store import ChunkStore

            ids = np.sort(ChunkStore(v.root / u["files"]["store"]["path"]).ids)
            labels = np.concatenate([np.arange(lo, hi) for lo, hi in ranges[:, :2].tolist()]) if len(ranges) \
                else np.zeros(0, np.int64)
            removed = np.concatenate([np.arange(lo, hi) for lo, hi in dead.tolist()]) if len(dead) \
                else np.zeros(0, np.int64)
            live_labels = np.setdiff1d(labels, removed)  # rows of dead chunks may be gone (a redaction)
            if len(np.setdiff1d(ids, labels)) or len(np.setdiff1d(live_labels, ids)):
                v.error(f"index shard {name}: its store does not hold the rows of its live vectors",
                        u["files"]["store"]["path"])
        if u["live"] != u["vectors"] - covered(dead):
            v.error(f"index shard {name}: {u['live']:,} live vectors in the root, {u['vectors'] - covered(dead):,} by "
                    "its dead ranges")
        for lo, hi, number in ranges.tolist():
            if number in members[name]:
                continue
            d = dead[(dead[:, 0] < hi) & (dead[:, 1] > lo)] if len(dead) else dead
            if covered(np.clip(d, lo, hi)) != hi - lo:
                v.error(f"index shard {name} holds live vectors of seg-{number:06d}, which does not name it")
                break


CHECKS: list[tuple[str, Check]] = [
    ("pending", check_pending),
    ("files", check_files),
    ("schema", check_schema),
    ("rows", check_rows),
    ("chunk_ids", check_chunk_ids),
    ("tombstones", check_tombstones),
    ("summaries", check_summaries),
    ("ids", check_ids),
    ("indexes", check_indexes),
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
    files = [rec for seg in v.segments() for rec in seg.files.values()] + db.snapshot.metadata_records()
    return VerifyReport(str(db.root), db.version, quick, names, v.findings, len(v.segments()), len(files),
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
        try:
            records = s.all_records()
        except RetrodbError as err:
            findings.append(Finding("warning", "snapshots", f"v{version} ({s.command}, {s.created}) can be read but "
                                    f"not all of it: {err.message}", _rel(root, path)))
            continue
        missing = [rec["path"] for rec in records
                   if not (root / rec["path"]).is_file() or (root / rec["path"]).stat().st_size != rec["bytes"]]
        if missing:
            findings.append(Finding("warning", "snapshots", f"v{version} ({s.command}, {s.created}) "
                                    f"can be read but {len(missing)} of its files are missing or altered",
                                    _rel(root, path)))
        else:
            complete.append(version)
            findings.append(Finding("warning", "snapshots", f"v{version} ({s.command}, {s.created}, "
                                    f"{s.totals()['documents']:,} documents) can be read and has all its files",
                                    _rel(root, path)))
    if complete:
        newest = complete[-1]
        findings.append(Finding("error", "current", f"the newest complete snapshot is v{newest}; to make it current "
                                f"again: printf '{snap.manifest_name(newest)}\\n' > {root / snap.CURRENT}"))
    else:
        findings.append(Finding("error", "current", "no snapshot can be read with all its files"))
    return VerifyReport(str(root), -1, False, ["current", "snapshots"], findings, 0, 0, 0, seconds)
