"""`retrodb redact`: privacy removal that leaves nothing behind.

Selection runs in DuckDB over every column of the snapshot's documents that
holds user data (text, metadata, source, doc_id) with RE2 (one parallel scan,
all selectors in one alternation); Python only looks at the candidate rows,
with the same RE2 (`google-re2`), to find exact spans and validate PII
candidates. Mode `mask` (the default for text selectors) replaces each span
with the token in text, metadata (JSON-escaped) and source, and gives a
matching id a salted hash; `drop` (the default with doc-id selectors) removes
the documents. Execution, all under one writer lock: (1) write the check file
(the strings to remove), tombstone the matched documents (and, in mask mode,
add their masked versions as a new segment) and record a pending redaction in
the snapshot; (2) compact every affected segment, physically without the
removed rows, keys carried over; (3) purge every older snapshot (noted in
purged.jsonl for `log`) and file that still holds removed rows, whatever the
retention; (4) check every touched file for the removed strings, then drop them
from the check file; (5) append the audit entry (once) and commit with the
pending mark cleared. A crash anywhere leaves a consistent database whose
`verify` reports the redaction as incomplete; rerunning `redact` finishes it,
check included: a redaction never closes while the text is still on disk.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path

from . import faults
from .snapshot import segment_name, segment_number
from .errors import BadOption, RetrodbError
from .pii import (DETECTORS, PatternError, compile_re2, find as find_pii, finditer_spans, json_variants,
                  literal_pattern, uses_unicode_classes)

MODES = ("drop", "mask")
AUDIT_LOG = "audit.jsonl"
AUDIT_SALT = "audit.salt"
CHECK_FILE = "redact-check.json"  # the pending redaction's absence check (needles until it passed), see _finish
PURGED_LOG = "purged.jsonl"  # snapshots a redaction deleted: version, time, command (no content), for `log`
DEFAULT_MASK = "[REDACTED]"
SAMPLE_CONTEXT = 40
COLUMNS = ("text", "metadata", "doc_id", "source")  # every documents column that holds user data
REDACTED_ID_PREFIX = "redacted-"


@dataclass
class Selector:
    kind: str  # doc-id | literal | regex | pii
    value: str  # the id, literal, pattern or detector name

    def patterns(self, ignore_case: bool = False) -> list[str]:
        """The RE2 patterns (DuckDB and Python alike) of a text selector, case folding inline. A literal also
        matches its JSON-escaped form (how a quote, a backslash or a newline is stored in `metadata`)."""
        if self.kind == "pii":
            return [DETECTORS[self.value].pattern]
        ps = [literal_pattern(v) for v in json_variants(self.value)] if self.kind == "literal" else [self.value]
        return [f"(?i:{p})" if ignore_case else p for p in ps]

    def describe_for_audit(self, key: bytes) -> dict:
        if self.kind == "pii":
            return {"kind": "pii", "detector": self.value}
        if self.kind == "doc-id":
            return {"kind": "doc-id"}
        # never the literal or pattern itself: an HMAC under the database's slow-derived audit key, enough to
        # match a later request (one key derivation per redaction, then one HMAC per selector)
        return {"kind": self.kind, "hmac_sha256": hmac.new(key, f"{self.kind}\0{self.value}".encode(),
                                                          hashlib.sha256).hexdigest()}


def build_selectors(doc_ids=(), literals=(), regexes=(), pii=(), from_file: str | Path | None = None,
                    ids_file: str | Path | None = None) -> list[Selector]:
    """Selectors from command-line values; a value that cannot work raises `BadOption` (a usage error)."""
    from .delete import read_lines

    sel = [Selector("doc-id", d) for d in doc_ids]
    if ids_file:
        sel += [Selector("doc-id", d) for d in read_lines(ids_file, strip=True)]
    sel += [Selector("literal", t) for t in literals]
    if from_file:
        sel += [Selector("literal", t) for t in read_lines(from_file, strip=False)]
    for pattern in regexes:
        try:
            regex = compile_re2(pattern)
        except PatternError as exc:
            raise BadOption("--regex", f"{pattern!r} is not a valid RE2 regular expression: {exc}",
                            hint="RE2 syntax: no look-arounds or back-references; \\w \\d \\b are ASCII, "
                                 "\\pL is any letter") from None
        if regex.search("") is not None:
            raise BadOption("--regex", f"{pattern!r} matches the empty string, so it would select everything",
                            hint="make it match at least one character (e.g. + instead of *)")
        sel.append(Selector("regex", pattern))
    for name in pii:
        for n in (x.strip() for x in name.split(",")):
            if n and n not in DETECTORS:
                raise BadOption("--pii", f"unknown PII detector {n!r}; choose from {', '.join(DETECTORS)}")
            if n:
                sel.append(Selector("pii", n))
    if not sel:
        raise RetrodbError("nothing selected", hint="give --doc-id, --ids-file, --literal, --regex, --pii or --from-file")
    for s in sel:
        if s.kind in ("literal", "doc-id") and not s.value:
            raise BadOption("--" + s.kind, f"empty {s.kind} selector")
    return sel


def default_mode(selectors: list[Selector]) -> str:
    """drop when a selector names documents by id, otherwise mask (only the matches go)."""
    return "drop" if any(s.kind == "doc-id" for s in selectors) else "mask"


def read_lines(path: str | Path) -> list[str]:
    """One text per line (a UTF-8 BOM and line ends removed, blank lines skipped), for --from-file/--absent-file."""
    from .delete import read_lines as read

    return read(path, strip=False)


Span = tuple[int, int, str]  # start, end, selector kind


@dataclass
class Match:
    segment: str
    doc_id: str
    first_chunk_id: int
    num_chunks: int
    num_tokens: int
    spans: dict[str, list[Span]] = field(default_factory=dict)  # column -> merged spans (text selectors)
    whole: bool = False  # selected by id

    @property
    def columns(self) -> list[str]:
        return [c for c in COLUMNS if self.spans.get(c)]


@dataclass
class RedactionPlan:
    mode: str
    matches: list[Match]
    samples: list[str]
    values: dict[tuple[str, str], dict] = field(repr=False, default_factory=dict)  # (segment, doc_id) -> row

    @property
    def documents(self) -> int:
        """Distinct documents (a document may also have physical copies in segments old snapshots hold)."""
        return len({m.doc_id for m in self.matches})

    @property
    def chunks(self) -> int:
        return sum(m.num_chunks for m in self.matches)

    @property
    def segments(self) -> list[str]:
        return sorted({m.segment for m in self.matches})

    def matched_strings(self) -> list[str]:
        """The distinct removed strings (text selectors, every column), for checking their absence afterwards."""
        out = set()
        for m in self.matches:
            row = self.values.get((m.segment, m.doc_id), {})
            for col, spans in m.spans.items():
                out.update((row.get(col) or "")[a:b] for a, b, _ in spans)
        return sorted(s for s in out if s)

    def summary(self) -> dict:
        """The plan, with what each mode would cost (no user data)."""
        by_column = {c: len({m.doc_id for m in self.matches if m.spans.get(c)}) for c in COLUMNS}
        return {"mode": self.mode, "documents": self.documents, "chunks": self.chunks, "segments": self.segments,
                "samples": self.samples, "columns": by_column,
                "cost": {"drop": {"documents_removed": self.documents, "chunks_removed": self.chunks},
                         "mask": None if any(m.whole for m in self.matches) else
                         {"documents_masked": self.documents, "chunks_rewritten": self.chunks,
                          "ids_replaced_by_salted_hash": by_column["doc_id"],
                          "metadata_masked": by_column["metadata"], "sources_masked": by_column["source"]}}}


def _merge(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for a, b, k in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b), out[-1][2])
        else:
            out.append((a, b, k))
    return out


class _TextMatcher:
    """All text selectors at once: one RE2 alternation for DuckDB's scan, an RE2 set that says which patterns
    match a value, then those patterns' spans (validated, for PII)."""

    def __init__(self, selectors: list[Selector], ignore_case: bool):
        import re2

        self.selectors = selectors
        self.entries = [(sel, p) for sel in selectors for p in sel.patterns(ignore_case and sel.kind != "pii")]
        # what DuckDB may select with: the same pattern, a detector's superset, or nothing at all when a pattern
        # uses Unicode property classes (whose tables differ between the two RE2 builds): then Python sees all
        sql = [DETECTORS[sel.value].prefilter if sel.kind == "pii" else None if uses_unicode_classes(p) else p
               for sel, p in self.entries]
        self.prefilter = None if None in sql else "|".join(f"(?:{p})" for p in sql)
        options = re2.Options()
        options.log_errors = False
        options.max_mem = 256 << 20
        self.set = re2.Set.SearchSet(options)
        for _, p in self.entries:
            self.set.Add(p)
        self.set.Compile()

    def spans(self, value: str | None) -> list[Span]:
        if not value or not self.entries:
            return []
        out: list[Span] = []
        for i in self.set.Match(value) or ():
            sel, pattern = self.entries[i]
            found = find_pii(DETECTORS[sel.value], value) if sel.kind == "pii" else finditer_spans(pattern, value)
            out += [(a, b, sel.value if sel.kind == "pii" else sel.kind) for a, b in found]
        return _merge(out)


def plan_redaction(snapshot, selectors: list[Selector], mode: str | None = None, ignore_case: bool = False,
                   sample_size: int = 5, segments: list | None = None) -> RedactionPlan:
    """Which documents (and spans, in every column that holds user data) the selectors match in `snapshot` (in
    `segments` of it only, when given: a physical scope, see `plan_physical`)."""
    from .sql import connect_readonly

    mode = mode or default_mode(selectors)
    if mode not in MODES:
        raise BadOption("--mode", f"unknown mode {mode!r}; use drop or mask")
    if mode == "mask" and any(s.kind == "doc-id" for s in selectors):
        raise BadOption("--mode", "mask needs text selectors (--literal, --regex, --pii, --from-file)",
                        hint="to remove whole documents by id use --mode drop")
    ids = sorted({s.value for s in selectors if s.kind == "doc-id"})
    matcher = _TextMatcher([s for s in selectors if s.kind != "doc-id"], ignore_case)
    conds, params = [], []
    if ids:
        conds.append("doc_id IN (SELECT unnest(?::VARCHAR[]))")
        params.append(ids)
    if matcher.entries and matcher.prefilter is not None:
        conds += [f"regexp_matches(coalesce({c}, ''), ?)" for c in COLUMNS]
        params += [matcher.prefilter] * len(COLUMNS)
    elif matcher.entries:
        conds.append("true")  # Python matches every row
    wanted = set(ids)
    matched: list[Match] = []
    values: dict[tuple[str, str], dict] = {}
    con = connect_readonly(snapshot, segments=segments)
    try:  # one parallel scan for all selectors and columns; Python sees the candidates, a batch at a time
        cur = con.execute(f"SELECT segment, first_chunk_id, num_chunks, num_tokens, {', '.join(COLUMNS)} "
                          "FROM documents WHERE " + " OR ".join(f"({c})" for c in conds), params)
        while batch := cur.fetchmany(4096):
            for seg, first, n, ntok, *cols in batch:
                row = dict(zip(COLUMNS, cols))
                spans = {c: s for c in COLUMNS if (s := matcher.spans(row[c]))}
                if row["doc_id"] not in wanted and not spans:
                    continue  # a candidate that failed validation
                matched.append(Match(seg, row["doc_id"], first, n, ntok, spans, whole=row["doc_id"] in wanted))
                values[(seg, row["doc_id"])] = row
    finally:
        con.close()
    matches = sorted(matched, key=lambda m: (m.segment, m.first_chunk_id))
    samples = []
    for m in matches:
        for col in m.columns:
            where = f"[{col}] of " + ("a document whose id matches" if m.spans.get("doc_id") else repr(m.doc_id))
            samples.append(f"{where}: " + _masked_context(values[(m.segment, m.doc_id)][col], m.spans[col]))
            break
        if len(samples) >= sample_size:
            break
    return RedactionPlan(mode, matches, samples, values)


def _masked_context(text: str, spans: list[Span]) -> str:
    """A sample line that shows where a match is without showing it, or any other match near it."""
    a, b, _ = spans[0]
    lo, hi = max(0, a - SAMPLE_CONTEXT), min(len(text), b + SAMPLE_CONTEXT)
    parts, last = [], lo
    for x, y, kind in spans:
        if y <= lo or x >= hi:
            continue
        parts.append(" ".join(text[last:max(x, lo)].split()))
        parts.append(f"«{kind}: {y - x} chars»")
        last = min(y, hi)
    parts.append(" ".join(text[last:hi].split()))
    return "…" + " ".join(p for p in parts if p) + "…"


def mask_text(text: str, spans: list[Span], token: str) -> str:
    out, last = [], 0
    for a, b, _ in spans:
        out.append(text[last:a])
        out.append(token)
        last = b
    out.append(text[last:])
    return "".join(out)


def mask_metadata(raw: str, spans: list[Span], token: str) -> str | None:
    """Metadata (a JSON object as text) with its matches masked; the token is JSON-escaped so that a match inside
    a string stays a valid string. A match that cuts through JSON syntax removes the whole metadata (None)."""
    masked = mask_text(raw, spans, json.dumps(token, ensure_ascii=False)[1:-1])
    try:
        json.loads(masked)
    except ValueError:
        return None
    return masked


def redacted_id(key: bytes, doc_id: str) -> str:
    """What a matching document id becomes in mask mode: stable for the database (salted), never reversible."""
    return REDACTED_ID_PREFIX + hmac.new(key, b"doc-id\0" + doc_id.encode(), hashlib.sha256).hexdigest()[:32]


# ---------------------------------------------------------------- audit log


def audit_salt(root: Path) -> bytes:
    """The database's audit salt (created once; kept out of snapshots)."""
    path = root / AUDIT_SALT
    if not path.exists():
        from .atomic import atomic_write_bytes

        atomic_write_bytes(path, secrets.token_hex(32).encode())
    return path.read_bytes().strip()


@lru_cache(maxsize=8)
def audit_key(salt: bytes) -> bytes:
    """The one slow key derivation of a redaction; selectors and ids are then HMACed under it."""
    return hashlib.pbkdf2_hmac("sha256", b"retrodb audit key", salt, 200_000)


def doc_id_hash(salt: bytes, doc_id: str) -> str:
    return hmac.new(salt, doc_id.encode(), hashlib.sha256).hexdigest()


def _append_line(path: Path, obj: dict) -> None:
    """Append one JSON line and fsync it (O_APPEND: earlier lines are never rewritten)."""
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines_json(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash mid-append
    return out


def append_audit(root: Path, entry: dict) -> None:
    """Append the audit entry of a redaction, once (a rerun after a crash does not append it twice)."""
    if not any(e.get("redaction") == entry.get("redaction") for e in _read_lines_json(root / AUDIT_LOG)):
        _append_line(root / AUDIT_LOG, entry)


def purged_versions(root: Path) -> list[dict]:
    """Snapshots redactions deleted: version, created, command, purged_at, purged_by (no content)."""
    return _read_lines_json(Path(root) / PURGED_LOG)


def audit_entry(root: Path, plan: RedactionPlan, selectors: list[Selector], ignore_case: bool,
                version_before: int, version_after: int) -> dict:
    salt = audit_salt(root)
    key = audit_key(salt)
    return {
        "redaction": f"v{version_before + 1}",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": plan.mode,
        "ignore_case": ignore_case,
        "selectors": [s.describe_for_audit(key) for s in selectors],
        "documents": plan.documents,
        "chunks": plan.chunks,
        "segments": plan.segments,
        "columns": {c: n for c, n in plan.summary()["columns"].items() if n},
        "doc_id_hashes": sorted({doc_id_hash(salt, m.doc_id) for m in plan.matches}),
        "chunk_ranges": sorted({(m.first_chunk_id, m.num_chunks) for m in plan.matches}),  # ids, never text
        "version_before": version_before,
        "version_after": version_after,
    }


# ---------------------------------------------------------------- execution


@dataclass
class RedactReport:
    version: int
    plan: dict
    dry_run: bool = False
    purged_snapshots: list[int] = field(default_factory=list)
    purged_files: int = 0
    compacted_segments: list[str] = field(default_factory=list)
    masked_documents: int = 0
    resumed: bool = False
    checked_files: int = 0
    checked_needles: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _physical_scope(root: Path, snapshot, doc_ids: list[str] | None) -> list:
    """Every segment any retained snapshot references (the current snapshot's entry wins for its own), with its
    tombstones left out: redaction looks at physical rows, not the current view (a tombstoned older version of a
    document, or a segment only an old snapshot still references, holds the text just the same). With only
    document ids to look for (`doc_ids`), only the segments the id runs say may hold them."""
    from . import snapshot as snap
    from .ids import locate

    segments: dict[int, object] = {}
    current = snap.current_version(root)
    versions = [v for v in snap.retained_versions(root) if v <= current and v != snapshot.version]
    for s in [snapshot] + [x for v in versions if (x := _read_root(root, v)) is not None]:
        if doc_ids is None:
            found = s.segments.values()
        else:
            found = [s.segment(n) for n in sorted({d.segment for d in locate(s, doc_ids)})]
        for seg in found:
            segments.setdefault(seg.number, seg)
    return [seg.with_files(drop=["tombstones"]) for _, seg in sorted(segments.items())]


def _read_root(root: Path, version: int):
    from . import snapshot as snap

    try:
        return snap.read_manifest(root, version)
    except RetrodbError:
        return None


def plan_physical(root: Path, snapshot, selectors: list[Selector], mode: str | None,
                  ignore_case: bool) -> RedactionPlan:
    """Like `plan_redaction`, over every physical row that any retained snapshot can reach."""
    doc_ids = None if any(s.kind != "doc-id" for s in selectors) else [s.value for s in selectors]
    return plan_redaction(snapshot, selectors, mode, ignore_case, segments=_physical_scope(root, snapshot, doc_ids))


def _pending(snapshot) -> dict | None:
    return snapshot.pending.get("redaction")


def pending_summary(snapshot) -> dict | None:
    """What the pending redaction (if any) was started with: mode, documents, chunks, segments (no user data)."""
    pending = _pending(snapshot)
    if not pending:
        return None
    audit = pending["audit"]
    return {"mode": audit["mode"], "documents": audit["documents"], "chunks": audit["chunks"],
            "segments": pending["segments"], "redaction": audit.get("redaction")}


def redact(root: str | Path, selectors: list[Selector], *, mode: str | None = None, mask_token: str = DEFAULT_MASK,
           ignore_case: bool = False, dry_run: bool = False, wait: float = 0.0, device: str = "auto",
           progress=None) -> RedactReport:
    """Remove every document the selectors match (drop) or every matched span (mask: in the text, the metadata,
    the source; a matching id becomes a salted hash) from every file. `mode` None: mask for text selectors,
    drop when documents are named by id. With no selectors, finish the pending redaction."""
    import time

    from .database import Database

    started = time.perf_counter()
    if mode is not None and mode not in MODES:
        raise BadOption("--mode", f"unknown mode {mode!r}; use drop or mask")
    if mask_token == "":
        raise BadOption("--mask-token", "must not be empty")
    text_selectors = [s for s in selectors if s.kind != "doc-id"]
    if (mode or default_mode(selectors)) == "mask" and _TextMatcher(text_selectors, ignore_case).spans(mask_token):
        raise BadOption("--mask-token", f"{mask_token!r} matches the selectors itself, so the masked text would "
                        "still hold what is removed", hint="choose another --mask-token")
    db = Database(root)
    if not selectors and not _pending(db.snapshot):
        raise RetrodbError("nothing selected", hint="give --doc-id, --ids-file, --literal, --regex, --pii or --from-file")
    if dry_run:
        summary = plan_physical(db.root, db.snapshot, selectors, mode, ignore_case).summary() if selectors \
            else pending_summary(db.snapshot)
        report = RedactReport(db.version, summary, dry_run=True)
        report.seconds = time.perf_counter() - started
        return report
    with db.writer("redact", wait=wait) as w:
        resumed = pending_summary(w.base)
        report = RedactReport(w.base.version, resumed, resumed=bool(resumed))
        if resumed:  # a redaction that crashed: finish it (with its own absence check) before anything else
            _finish(w, report)
        elif (w.root / CHECK_FILE).exists():  # the marker of a redaction that closed just before a crash
            (w.root / CHECK_FILE).unlink()
        plan = plan_physical(w.root, w.base, selectors, mode, ignore_case) if selectors else None
        if plan:
            report.plan = plan.summary()
        if plan and plan.matches:
            written = _start(w, plan, selectors, plan.mode, mask_token, ignore_case, device, report)
            faults.point("redact.started")
            _finish(w, report, written)
        report.version = w.base.version
    report.seconds = time.perf_counter() - started
    return report


def _start(w, plan: RedactionPlan, selectors, mode: str, mask_token: str, ignore_case: bool, device: str,
           report: RedactReport) -> set[str]:
    """Commit 1: tombstone the live matches (mask: and add their masked versions), mark the redaction pending.
    Before it, the check file lists the strings the redaction removes, so that whichever run finishes the
    redaction checks for them."""
    from . import tombstones
    from .add import finish_segments, segment_finishers
    from .atomic import atomic_write_bytes
    from .ingest import IngestOptions, stage_sources
    from .readers import Piece

    live = {n: seg for n in {segment_number(name) for name in plan.segments}
            if (seg := w.base.segment(n)) is not None}
    deleted = {n: tombstones.deleted_doc_ids(w.root, seg.files) for n, seg in live.items()}
    to_tombstone = [m for m in plan.matches if segment_number(m.segment) in live
                    and m.doc_id not in deleted[segment_number(m.segment)]]
    edit = w.edit("redact")
    written: set[str] = set()
    if mode == "mask" and to_tombstone:
        docs = _masked_documents(w, plan, to_tombstone, mask_token)
        job = "redact-mask"
        piece = Piece("documents", "<redact>", size=sum(len(d.text) for d in docs), documents=docs)
        staged = stage_sources(w, job, [piece], [], IngestOptions(workers=1), replace=True)
        embedder, index_params = segment_finishers(w.base.config, device)
        finish_segments(w, staged.job_dir, staged.segments, embedder, index_params)
        staged.put_into(edit)
        report.masked_documents = sum(seg.documents for seg in staged.segments.values())
        written.update(seg.name for seg in staged.segments.values())
    tombstones.add(w, edit, [{"segment": segment_number(m.segment), "doc_id": m.doc_id,
                              "first_chunk_id": m.first_chunk_id, "num_chunks": m.num_chunks,
                              "num_tokens": m.num_tokens} for m in to_tombstone])
    entry = audit_entry(w.root, plan, selectors, ignore_case, w.base.version, -1)
    atomic_write_bytes(w.root / CHECK_FILE, json.dumps({
        "redaction": entry["redaction"], "ignore_case": ignore_case, "written": sorted(written),
        "needles": plan.matched_strings()}, ensure_ascii=False).encode())
    edit.pending = dict(edit.pending)
    edit.pending["redaction"] = {"segments": plan.segments, "audit": entry}
    w.commit(edit)
    return written


def _masked_documents(w, plan: RedactionPlan, matches: list[Match], token: str) -> list:
    """The matched documents with every span replaced by `token` in text, metadata and source, and a matching
    id replaced by its salted hash."""
    from .readers import Document

    key = audit_key(audit_salt(w.root))
    out = []
    for m in matches:
        row = plan.values[(m.segment, m.doc_id)]
        sp = m.spans
        text = mask_text(row["text"], sp["text"], token) if sp.get("text") else row["text"]
        metadata = mask_metadata(row["metadata"], sp["metadata"], token) if sp.get("metadata") else row["metadata"]
        source = mask_text(row["source"], sp["source"], token) if sp.get("source") else row["source"]
        doc_id = redacted_id(key, m.doc_id) if sp.get("doc_id") else m.doc_id
        out.append(Document(doc_id, text, source, metadata))
    return out


def _finish(w, report: RedactReport | None = None, written: set[str] = frozenset()) -> None:
    """Compact the affected segments, purge every file and snapshot that still holds removed rows, check every
    file it touched for the removed strings, append the audit entry, and only then commit with the pending mark
    cleared. Idempotent: a rerun after a crash redoes whatever is left, check included."""
    from . import snapshot as snap
    from . import vacuum
    from .atomic import fsync_dir
    from .ids import runs_holding
    from .shards import redact_vectors
    from .stages.compact import CompactStage

    pending = _pending(w.base)
    check = _read_json(w.root / CHECK_FILE)
    if check is None or check.get("redaction") != pending["audit"].get("redaction"):
        raise RetrodbError(
            f"the pending redaction cannot be finished: its check file {CHECK_FILE} is missing or belongs to "
            "another redaction, so the absence of the removed text cannot be checked",
            hint="restore the file from a backup, or prove absence with retrodb verify DB --absent TEXT")
    written = set(written) | set(check.get("written", []))
    affected = {segment_number(n) for n in pending["segments"]}
    chunk_ranges = pending["audit"].get("chunk_ranges", [])
    live_affected = sorted(n for n in affected if w.base.segment(n) is not None)
    replaced: set[str] = set()
    if live_affected:  # compact: each affected live segment is rewritten without its tombstoned rows
        job = "redact-compact"
        job_dir = w.work_dir(job)
        number = w.base.next_segment
        units = [{"segment": number + i, "sources": [[n, w.base.segments[n].to_json()]]}
                 for i, n in enumerate(live_affected)]
        w.write_json(job_dir / "plan.json", {"base_version": w.base.version})
        for unit in units:
            w.new_segment_dir(unit["segment"], job)
        stage = CompactStage(w.root, job_dir, w.base.config.get("index"))
        edit = w.edit("redact")
        for unit in units:
            result = stage.run(unit)
            edit.remove(unit["sources"][0][0])
            if result["entry"]["chunks"]:
                edit.apply(result)
                written.add(segment_name(result["segment"]))
            edit.next_segment = max(edit.next_segment, result["segment"] + 1)
        # index shards keep the vectors of dead rows in their files: rewritten without those of removed chunks;
        # the id runs hold the removed documents' ids: rewritten without the rows of the segments removed
        replaced.update(redact_vectors(w, edit, chunk_ranges))
        edit.purge_ids_of = set(affected)
        faults.point("redact.compacted")
        # the segments this redaction wrote, for the check of a run that resumes after this commit
        from .atomic import atomic_write_bytes

        atomic_write_bytes(w.root / CHECK_FILE, json.dumps({**check, "written": sorted(written)},
                                                          ensure_ascii=False).encode())
        w.commit(edit)
        shutil.rmtree(job_dir, ignore_errors=True)
        if report is not None:
            report.compacted_segments = [segment_name(n) for n in live_affected]
    else:  # a rerun after the compaction's commit (or nothing live was affected): the same, if still needed
        edit = w.edit("redact")
        replaced.update(redact_vectors(w, edit, chunk_ranges))
        edit.purge_ids_of = set(affected)
        if replaced or runs_holding(w.base, affected):
            w.commit(edit)
    removed_neighbours = _purge_neighbours(w, chunk_ranges)
    vacuum.finish_pending(w.root)  # files a killed vacuum had still to delete may hold the text too
    # purge: every other snapshot that references an affected segment (or a file rewritten without the removed
    # rows) goes, whatever the retention
    current = w.base.version
    purged, gone, kept = [], [], []
    stale_files = removed_neighbours | replaced
    for v in snap.retained_versions(w.root):
        if v == current:
            kept.append(w.base)
            continue
        try:
            s = snap.read_manifest(w.root, v)
        except RetrodbError:
            s = None
        if s is None or any(s.segment(n) is not None for n in affected) or _references(s, stale_files):
            if s is not None:  # a trace for `log`: version, time, command; no content
                _append_line(w.root / PURGED_LOG, {"version": v, "created": s.created, "command": s.command,
                                                   "purged_by": pending["audit"].get("redaction"),
                                                   "purged_at": datetime.now(timezone.utc).isoformat(
                                                       timespec="seconds")})
                gone.append(s)
            (w.root / snap.MANIFESTS / snap.manifest_name(v)).unlink(missing_ok=True)
            purged.append(v)
        else:
            kept.append(s)
    fsync_dir(w.root / snap.MANIFESTS)
    faults.point("redact.snapshots_purged")
    # then every file no remaining snapshot references (the affected segments' old files among them); a privacy
    # operation also sweeps the data directories for files no snapshot references, as `vacuum --full` does
    files, directories = vacuum.garbage(w.root, kept, gone, full=True)
    removed = 0
    for rel in sorted(files):
        (w.root / rel).unlink(missing_ok=True)
        removed += 1
    for rel in sorted(directories):
        shutil.rmtree(w.root / rel, ignore_errors=True)
    for parent in {Path(rel).parent for rel in directories}:
        fsync_dir(w.root / parent)
    w.cleanup()  # temporary files and work dirs
    faults.point("redact.files_purged")
    if "needles" in check:  # the check runs until it passes once; then the needles leave the disk
        from .atomic import atomic_write_bytes

        checked, needles = _check_absent(w, check["needles"], check["ignore_case"], written)
        check = {k: v for k, v in check.items() if k != "needles"} | {"checked_files": checked,
                                                                       "checked_needles": needles}
        atomic_write_bytes(w.root / CHECK_FILE, json.dumps(check).encode())
        faults.point("redact.checked")
    entry = dict(pending["audit"])
    edit = w.edit("redact")
    edit.pending = {k: v for k, v in edit.pending.items() if k != "redaction"}
    entry["version_after"] = edit.version
    entry["purged_snapshots"] = len(purged)
    entry["files_removed"] = removed
    append_audit(w.root, entry)  # before the commit that closes the redaction: never lost
    faults.point("redact.audited")
    w.commit(edit)
    (w.root / CHECK_FILE).unlink(missing_ok=True)
    if report is not None:
        report.purged_snapshots = purged
        report.purged_files = removed
        report.checked_files = check.get("checked_files", 0)
        report.checked_needles = check.get("checked_needles", 0)


def _references(s, paths: set[str]) -> bool:
    """Whether snapshot `s` references any of `paths` (neighbours files: its groups; index files: its root)."""
    if not paths:
        return False
    if any(rec["path"] in paths for rec in s.metadata_records()):
        return True
    if any(r["path"] in paths for u in s.index_units for r in u["files"].values() if r):
        return True
    return any(rec["path"] in paths for rec in s.files())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def _purge_neighbours(w, chunk_ranges) -> set[str]:
    """Rewrite the current snapshot's neighbours files that name removed chunks (a commit, when any does);
    returns every neighbours file still on disk that names them, so the snapshots holding those go too."""
    from . import neighbours

    return neighbours.purge(w, chunk_ranges)


def _check_absent(w, strings: list[str], ignore_case: bool, written: set[str]) -> tuple[int, int]:
    """Scan the segments this redaction wrote, and every file outside the segments (the check file itself
    excepted), for the removed strings; (files, needles) checked. (`retrodb verify --absent` scans everything,
    token ids and keys too; this check costs what the redaction touched.)"""
    from .absent import AbsenceScanner

    files = [p for p in sorted(w.root.rglob("*")) if p.is_file() and p.name != CHECK_FILE
             and (p.relative_to(w.root).parts[0] != "segments" or p.parent.name in written)]
    if not strings:
        return len(files), 0
    scanner = AbsenceScanner(strings, ignore_case=ignore_case)
    hits = [h for p in files for h in scanner.scan_file(p, p.relative_to(w.root).as_posix())]
    if hits:
        raise RetrodbError(
            f"redaction check failed: removed text still found in {len(hits)} place(s), first in {hits[0].file} "
            f"({hits[0].location})", hint="the redaction stays pending; report this bug, then rerun retrodb redact")
    return len(files), len(strings)


def absent_check(texts: list[str], ignore_case: bool = False, keys: bool = False, threshold: float = 0.999):
    """A `verify` check (for `retrodb verify --absent`): every file under the database, scanned for `texts`,
    their LM token ids and (with `keys`) their keys; each hit is an error naming the document (or file) and
    place. After it ran, `check.summary` says what was checked: files, bytes, texts, kinds, hits."""

    def check(v) -> None:
        from .absent import absence_scanner

        embedder = None
        if keys:
            from .embedder import embedder_for

            embedder = embedder_for(v.snapshot.config)
        scanner = absence_scanner(texts, ignore_case=ignore_case, tokenizer_path=v.snapshot.config["tokenizer"]["path"],
                                  check_keys=keys, embedder=embedder, threshold=threshold)
        hits = scanner.scan(v.root)
        check.summary = {"files": scanner.files, "bytes": scanner.bytes, "texts": len(texts),
                         "ignore_case": ignore_case, "kinds": scanner.kinds(), "found": len(hits)}
        for h in hits:
            v.error(f"absent text #{h.needle + 1} found ({h.what}) in {h.describe()}", h.file)

    check.summary = None
    return check
