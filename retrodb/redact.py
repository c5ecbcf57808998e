"""`retrodb redact`: privacy removal that leaves nothing behind.

Selection runs in DuckDB over the snapshot's Parquet text (parallel scan,
RE2 regexes); Python only looks at the candidate documents, to find exact
spans and validate PII candidates (Luhn, mod-97). Execution, all under one
writer lock: (1) tombstone the matched documents (and, in mask mode, add
their masked versions as a new segment) and record a pending redaction in
the snapshot; (2) compact every affected segment, physically without the
removed rows, keys carried over; (3) purge every older snapshot and file that
still holds removed rows, whatever the retention; (4) check the touched
files for the removed strings; (5) commit with the pending mark cleared and
append an audit entry. A crash anywhere leaves a consistent database whose
`verify` reports the redaction as incomplete; rerunning `redact` finishes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import faults
from .errors import RetrodbError
from .pii import DETECTORS, find as find_pii

MODES = ("drop", "mask")
AUDIT_LOG = "audit.jsonl"
AUDIT_SALT = "audit.salt"
DEFAULT_MASK = "[REDACTED]"
SAMPLE_CONTEXT = 40


@dataclass
class Selector:
    kind: str  # doc-id | literal | regex | pii
    value: str  # the id, literal, pattern or detector name

    def describe_for_audit(self, salt: bytes) -> dict:
        if self.kind == "pii":
            return {"kind": "pii", "detector": self.value}
        if self.kind == "doc-id":
            return {"kind": "doc-id"}
        # never the literal or pattern itself: a slow salted hash, enough to match a later request
        digest = hashlib.pbkdf2_hmac("sha256", self.value.encode(), salt, 200_000).hex()
        return {"kind": self.kind, "pbkdf2_sha256": digest}


def build_selectors(doc_ids=(), literals=(), regexes=(), pii=(), from_file: str | Path | None = None,
                    ids_file: str | Path | None = None) -> list[Selector]:
    sel = [Selector("doc-id", d) for d in doc_ids]
    if ids_file:
        sel += [Selector("doc-id", d) for d in read_lines(ids_file)]
    sel += [Selector("literal", t) for t in literals]
    if from_file:
        sel += [Selector("literal", t) for t in read_lines(from_file)]
    for pattern in regexes:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RetrodbError(f"--regex {pattern!r} is not a valid regular expression: {exc}") from None
        sel.append(Selector("regex", pattern))
    for name in pii:
        for n in (x.strip() for x in name.split(",")):
            if n and n not in DETECTORS:
                raise RetrodbError(f"unknown PII detector {n!r}; choose from {', '.join(DETECTORS)}")
            if n:
                sel.append(Selector("pii", n))
    if not sel:
        raise RetrodbError("nothing selected", hint="give --doc-id, --ids-file, --literal, --regex, --pii or --from-file")
    for s in sel:
        if s.kind in ("literal", "doc-id") and not s.value:
            raise RetrodbError(f"empty {s.kind} selector")
    return sel


def read_lines(path: str | Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RetrodbError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RetrodbError(f"{path} is not UTF-8 text") from None
    return [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]


@dataclass
class Match:
    segment: str
    doc_id: str
    first_chunk_id: int
    num_chunks: int
    num_tokens: int
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # start, end, selector kind (text selectors)
    whole: bool = False  # selected by id


@dataclass
class RedactionPlan:
    mode: str
    matches: list[Match]
    samples: list[str]
    texts: dict[tuple[str, str], str] = field(repr=False, default_factory=dict)  # (segment, doc_id) -> text

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
        """The distinct removed strings (text selectors), for checking their absence afterwards."""
        out = set()
        for m in self.matches:
            text = self.texts.get((m.segment, m.doc_id), "")
            out.update(text[a:b] for a, b, _ in m.spans)
        return sorted(s for s in out if s)

    def summary(self) -> dict:
        return {"mode": self.mode, "documents": self.documents, "chunks": self.chunks, "segments": self.segments,
                "samples": self.samples}


def _sql_condition(sel: Selector, ignore_case: bool) -> tuple[str, list]:
    if sel.kind == "literal":
        return ("contains(lower(text), lower(?))", [sel.value]) if ignore_case else ("contains(text, ?)", [sel.value])
    pattern = sel.value if sel.kind == "regex" else DETECTORS[sel.value].pattern
    return ("regexp_matches(text, ?, 'i')", [pattern]) if ignore_case and sel.kind == "regex" \
        else ("regexp_matches(text, ?)", [pattern])


def _spans(sel: Selector, text: str, ignore_case: bool) -> list[tuple[int, int, str]]:
    if sel.kind == "literal":
        flags = re.IGNORECASE if ignore_case else 0
        return [(m.start(), m.end(), sel.kind) for m in re.finditer(re.escape(sel.value), text, flags)]
    if sel.kind == "regex":
        flags = re.IGNORECASE if ignore_case else 0
        return [(m.start(), m.end(), sel.kind) for m in re.finditer(sel.value, text, flags) if m.end() > m.start()]
    if sel.kind == "pii":
        return [(a, b, sel.value) for a, b in find_pii(DETECTORS[sel.value], text)]
    return []


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for a, b, k in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b), out[-1][2])
        else:
            out.append((a, b, k))
    return out


def plan_redaction(snapshot, selectors: list[Selector], mode: str = "drop", ignore_case: bool = False,
                   sample_size: int = 5) -> RedactionPlan:
    """Which documents (and spans) the selectors match in `snapshot`; nothing is changed."""
    from .sql import connect

    if mode not in MODES:
        raise RetrodbError(f"unknown --mode {mode!r}; use drop or mask")
    if mode == "mask" and any(s.kind == "doc-id" for s in selectors):
        raise RetrodbError("--mode mask needs text selectors (--literal, --regex, --pii, --from-file)",
                           hint="to remove whole documents by id use --mode drop")
    ids = sorted({s.value for s in selectors if s.kind == "doc-id"})
    text_selectors = [s for s in selectors if s.kind != "doc-id"]
    conds, params = [], []
    if ids:
        conds.append("doc_id IN (SELECT unnest(?::VARCHAR[]))")
        params.append(ids)
    for sel in text_selectors:
        c, p = _sql_condition(sel, ignore_case)
        conds.append(c)
        params += p
    con = connect(snapshot)
    try:  # one parallel scan for all selectors; Python sees only the candidates
        rows = con.execute(
            "SELECT segment, doc_id, first_chunk_id, num_chunks, num_tokens, text FROM documents WHERE "
            + " OR ".join(f"({c})" for c in conds), params).fetchall()
    finally:
        con.close()
    wanted = set(ids)
    matched: list[Match] = []
    texts: dict[tuple[str, str], str] = {}
    for seg, doc_id, first, n, ntok, text in rows:
        spans = [span for sel in text_selectors for span in _spans(sel, text, ignore_case)]
        if doc_id not in wanted and not spans:
            continue  # a PII candidate that failed validation
        matched.append(Match(seg, doc_id, first, n, ntok, spans, whole=doc_id in wanted))
        texts[(seg, doc_id)] = text
    matches = sorted(matched, key=lambda m: (m.segment, m.first_chunk_id))
    for m in matches:
        m.spans = _merge(m.spans)
    samples = []
    for m in matches:
        if m.spans:
            samples.append(_masked_context(texts[(m.segment, m.doc_id)], m.spans, 0, m.doc_id))
        if len(samples) >= sample_size:
            break
    return RedactionPlan(mode, matches, samples, texts)


def _masked_context(text: str, spans: list[tuple[int, int, str]], which: int, doc_id: str) -> str:
    """A sample line that shows where a match is without showing it, or any other match near it."""
    a, b, _ = spans[which]
    lo, hi = max(0, a - SAMPLE_CONTEXT), min(len(text), b + SAMPLE_CONTEXT)
    parts, last = [], lo
    for x, y, kind in spans:
        if y <= lo or x >= hi:
            continue
        parts.append(" ".join(text[last:max(x, lo)].split()))
        parts.append(f"«{kind}: {y - x} chars»")
        last = min(y, hi)
    parts.append(" ".join(text[last:hi].split()))
    return f"{doc_id}: …" + " ".join(p for p in parts if p) + "…"


def mask_text(text: str, spans: list[tuple[int, int, str]], token: str) -> str:
    out, last = [], 0
    for a, b, _ in spans:
        out.append(text[last:a])
        out.append(token)
        last = b
    out.append(text[last:])
    return "".join(out)


# ---------------------------------------------------------------- audit log


def audit_salt(root: Path) -> bytes:
    """The database's audit salt (created once; kept out of snapshots)."""
    path = root / AUDIT_SALT
    if not path.exists():
        from .atomic import atomic_write_bytes

        atomic_write_bytes(path, secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def doc_id_hash(salt: bytes, doc_id: str) -> str:
    return hmac.new(salt, doc_id.encode(), hashlib.sha256).hexdigest()


def append_audit(root: Path, entry: dict) -> None:
    """Append one JSON line to the audit log and fsync it (O_APPEND: earlier lines are never rewritten)."""
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(root / AUDIT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def audit_entry(root: Path, plan: RedactionPlan, selectors: list[Selector], ignore_case: bool,
                version_before: int, version_after: int) -> dict:
    salt = audit_salt(root)
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": plan.mode,
        "ignore_case": ignore_case,
        "selectors": [s.describe_for_audit(salt) for s in selectors],
        "documents": plan.documents,
        "chunks": plan.chunks,
        "segments": plan.segments,
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
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _physical_scope(root: Path) -> dict[str, dict]:
    """Every segment any retained snapshot references (by name -> entry).

    Redaction looks at physical rows, not the current view: a tombstoned older version of a document,
    or a segment only an old snapshot still references, holds the text just the same.
    """
    from . import snapshot as snap

    segments: dict[str, dict] = {}
    current = snap.current_version(root)
    for v in snap.retained_versions(root):
        if v > current:
            continue
        try:
            s = snap.read_manifest(root, v)
        except RetrodbError:
            continue
        for name, seg in s.segments.items():
            segments.setdefault(name, seg)
    return segments


def plan_physical(root: Path, snapshot, selectors: list[Selector], mode: str, ignore_case: bool) -> RedactionPlan:
    """Like `plan_redaction`, over every physical row that any retained snapshot can reach."""
    from .snapshot import Snapshot

    segments = _physical_scope(root)
    for name, seg in snapshot.segments.items():  # the current snapshot wins for live segments
        segments[name] = seg
    scope = Snapshot(root, {**snapshot.data, "segments": {n: {**s, "files": {k: v for k, v in s["files"].items()
                                                                           if k != "tombstones"}}
                                                          for n, s in segments.items()}})
    return plan_redaction(scope, selectors, mode, ignore_case)


def redact(root: str | Path, selectors: list[Selector], *, mode: str = "drop", mask_token: str = DEFAULT_MASK,
           ignore_case: bool = False, dry_run: bool = False, wait: float = 0.0, device: str = "auto",
           progress=None) -> RedactReport:
    """Remove every document the selectors match (drop) or every matched span (mask) from every file."""
    import time

    from .database import Database

    started = time.perf_counter()
    if mode not in MODES:
        raise RetrodbError(f"unknown --mode {mode!r}; use drop or mask")
    if mode == "mask" and not mask_token:
        raise RetrodbError("--mask-token must not be empty")
    db = Database(root)
    if not selectors and not (db.snapshot.data.get("pending") or {}).get("redaction"):
        raise RetrodbError("nothing selected", hint="give --doc-id, --ids-file, --literal, --regex, --pii or --from-file")
    if dry_run:
        plan = plan_physical(db.root, db.snapshot, selectors, mode, ignore_case)
        report = RedactReport(db.version, plan.summary(), dry_run=True)
        report.seconds = time.perf_counter() - started
        return report
    with db.writer("redact", wait=wait) as w:
        resumed = bool((w.base.data.get("pending") or {}).get("redaction"))
        if resumed:  # a redaction that crashed: finish it before anything else
            _finish(w)
        plan = plan_physical(w.root, w.base, selectors, mode, ignore_case) if selectors \
            else RedactionPlan(mode, [], [])
        report = RedactReport(w.base.version, plan.summary(), resumed=resumed)
        if plan.matches:
            written = _start(w, plan, selectors, mode, mask_token, ignore_case, device, report)
            faults.point("redact.started")
            _finish(w, report, plan.matched_strings(), ignore_case, written)
        report.version = w.base.version
    report.seconds = time.perf_counter() - started
    return report


def _start(w, plan: RedactionPlan, selectors, mode: str, mask_token: str, ignore_case: bool, device: str,
           report: RedactReport) -> set[str]:
    """Commit 1: tombstone the live matches (mask: and add their masked versions), mark the redaction pending."""
    from . import tombstones
    from .add import finish_segments, segment_finishers
    from .ingest import IngestOptions, stage_sources
    from .readers import Piece

    live = w.base.segments
    deleted = {n: tombstones.deleted_doc_ids(w.root, s) for n, s in live.items() if n in plan.segments}
    to_tombstone = [m for m in plan.matches if m.segment in live and m.doc_id not in deleted.get(m.segment, ())]
    data = w.base.derive("redact")
    written: set[str] = set()
    if mode == "mask" and to_tombstone:
        docs = _masked_documents(w, plan, to_tombstone, mask_token)
        job = "redact-mask"
        piece = Piece("documents", "<redact>", size=sum(len(d.text) for d in docs), documents=docs)
        staged = stage_sources(w, job, [piece], [], IngestOptions(workers=1), replace=True)
        embedder, index_builder = segment_finishers(w.base.config, device)
        finish_segments(w, staged.job_dir, staged.entries, embedder, index_builder)
        data["segments"].update(staged.entries)
        data["next_segment"] = staged.next_segment
        report.masked_documents = sum(e["documents"] for e in staged.entries.values())
        written.update(staged.entries)
    tombstones.add(w, data, [{"segment": m.segment, "doc_id": m.doc_id, "first_chunk_id": m.first_chunk_id,
                              "num_chunks": m.num_chunks, "num_tokens": m.num_tokens} for m in to_tombstone])
    entry = audit_entry(w.root, plan, selectors, ignore_case, w.base.version, -1)
    data["pending"] = dict(data.get("pending") or {})
    data["pending"]["redaction"] = {"segments": plan.segments, "audit": entry}
    w.commit(data)
    return written


def _masked_documents(w, plan: RedactionPlan, matches: list[Match], token: str) -> list:
    """The matched documents with every span replaced by `token`, keeping id, source and metadata."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .readers import Document

    out = []
    by_segment: dict[str, list[Match]] = {}
    for m in matches:
        by_segment.setdefault(m.segment, []).append(m)
    for name, ms in by_segment.items():
        path = w.root / w.base.segments[name]["files"]["documents"]["path"]
        ids = [m.doc_id for m in ms]
        table = pq.read_table(path, columns=["doc_id", "source", "metadata"],
                              filters=pc.field("doc_id").isin(ids))
        meta = {r["doc_id"]: r for r in table.to_pylist()}
        for m in ms:
            text = mask_text(plan.texts[(m.segment, m.doc_id)], m.spans, token)
            out.append(Document(m.doc_id, text, meta[m.doc_id]["source"], meta[m.doc_id]["metadata"]))
    return out


def _finish(w, report: RedactReport | None = None, strings: list[str] = (), ignore_case: bool = False,
            written: set[str] = frozenset()) -> None:
    """Compact the affected segments, purge every file and snapshot that still holds removed rows, check,
    clear the pending mark (commit) and write the audit entry. Idempotent: a rerun after a crash redoes
    whatever is left."""
    from . import snapshot as snap
    from .atomic import fsync_dir
    from .stages.compact import CompactStage

    pending = w.base.data["pending"]["redaction"]
    affected = set(pending["segments"])
    live_affected = sorted(n for n in affected if n in w.base.segments)
    if live_affected:  # compact: each affected live segment is rewritten without its tombstoned rows
        job_dir = w.work_dir("redact-compact")
        number = w.base.data["next_segment"]
        units = [{"segment": number + i, "sources": [[n, w.base.segments[n]]]} for i, n in enumerate(live_affected)]
        w.write_json(job_dir / "plan.json", {"base_version": w.base.version, "segments": [u["segment"] for u in units]})
        stage = CompactStage(w.root, job_dir, w.base.config.get("index"))
        data = w.base.derive("redact")
        written = set(written)
        for unit in units:
            result = stage.run(unit)
            del data["segments"][unit["sources"][0][0]]
            if result["entry"]["chunks"]:
                data["segments"][snap.segment_name(result["segment"])] = result["entry"]
                written.add(snap.segment_name(result["segment"]))
            data["next_segment"] = max(data["next_segment"], result["segment"] + 1)
        faults.point("redact.compacted")
        w.commit(data)
        shutil.rmtree(job_dir, ignore_errors=True)
        if report is not None:
            report.compacted_segments = live_affected
    removed_neighbours = _purge_neighbours(w, pending["audit"].get("chunk_ranges", []))
    # purge: every other snapshot that references an affected segment goes, whatever the retention
    current = w.base.version
    purged = []
    for v in snap.retained_versions(w.root):
        if v == current:
            continue
        try:
            s = snap.read_manifest(w.root, v)
        except RetrodbError:
            s = None
        if s is None or affected & set(s.segments) or removed_neighbours & {r["path"] for r in s.files()}:
            (w.root / snap.MANIFESTS / snap.manifest_name(v)).unlink(missing_ok=True)
            purged.append(v)
    fsync_dir(w.root / snap.MANIFESTS)
    faults.point("redact.snapshots_purged")
    # then every file no remaining snapshot references (the affected segments' old files among them)
    referenced = set()
    for v in snap.retained_versions(w.root):
        referenced.update(rec["path"] for rec in snap.read_manifest(w.root, v).files())
    removed = 0
    seg_root = w.root / snap.SEGMENTS
    for d in sorted(seg_root.iterdir()):
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            if f.relative_to(w.root).as_posix() not in referenced:
                f.unlink()
                removed += 1
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    fsync_dir(seg_root)
    w.cleanup()  # temporary files and work dirs
    faults.point("redact.files_purged")
    checked = _check_absent(w, strings, ignore_case, written)
    entry = dict(pending["audit"])
    data = w.base.derive("redact")
    data["pending"] = {k: v for k, v in (data.get("pending") or {}).items() if k != "redaction"}
    entry["version_after"] = data["version"]
    entry["purged_snapshots"] = len(purged)
    entry["files_removed"] = removed
    w.commit(data)
    append_audit(w.root, entry)
    if report is not None:
        report.purged_snapshots = purged
        report.purged_files = removed
        report.checked_files = checked


def _purge_neighbours(w, chunk_ranges) -> set[str]:
    """Rewrite the current snapshot's neighbours files that name removed chunks (a commit, when any does);
    returns every neighbours file still on disk that names them, so the snapshots holding those go too."""
    from . import neighbours

    return neighbours.purge(w, chunk_ranges)


def _check_absent(w, strings: list[str], ignore_case: bool, written: set[str]) -> int:
    """Scan the segments this redaction wrote, and every file outside the segments, for the removed strings.
    (`retrodb verify --absent` scans everything; this check costs what the redaction touched.)"""
    from .absent import AbsenceScanner

    if not strings:
        return 0
    scanner = AbsenceScanner(strings, ignore_case=ignore_case)
    files = [p for p in sorted(w.root.rglob("*")) if p.is_file()
             and (p.relative_to(w.root).parts[0] != "segments" or p.parent.name in written)]
    hits = [h for p in files for h in scanner.scan_file(p, p.relative_to(w.root).as_posix())]
    if hits:
        raise RetrodbError(
            f"redaction check failed: removed text still found in {len(hits)} place(s), first in {hits[0].file} "
            f"({hits[0].location})", hint="the redaction stays pending; report this bug, then rerun retrodb redact")
    return len(files)


def absent_check(texts: list[str], ignore_case: bool = False, keys: bool = False, threshold: float = 0.999):
    """A `verify` check (for `retrodb verify --absent`): every file under the database, scanned for `texts`,
    their LM token ids and (with `keys`) their keys; each hit is an error naming the file and place."""

    def check(v) -> None:
        from .absent import scan_absent

        embedder = None
        if keys:
            from .embedder import embedder_for

            embedder = embedder_for(v.snapshot.config)
        hits = scan_absent(v.root, texts, ignore_case=ignore_case,
                           tokenizer_path=v.snapshot.config["tokenizer"]["path"], check_keys=keys,
                           embedder=embedder, threshold=threshold)
        for h in hits:
            v.error(f"absent text #{h.needle + 1} found ({h.what}) at {h.location}", h.file)

    return check
