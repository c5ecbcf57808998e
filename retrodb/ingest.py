"""`retrodb ingest`: read sources, chunk them into new segments, commit once.

Resumable: the job is keyed by its inputs and options; each finished segment
leaves a marker under `_work/<job>/`, so a rerun of the same command after a
crash skips finished segments and redoes the rest. Nothing is visible before
the single commit at the end. Removing duplicate documents from a staged
segment records its intent in the segment's marker before it rewrites the
files, so a rerun after a crash in between finishes the rewrite.

Ingesting nothing is an error (`NothingIngested`, exit 1), with what was found
(the fields of the records, the kinds of skipped files) and what to pass
instead; an ingest whose every document is already in the database is not
("nothing new").
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import faults
from .database import Database, Writer
from .errors import BadInput, RetrodbError, UsageError, require
from .executor import check_executor, make_executor, node_figures
from .readers import FORMATS, IGNORED_KINDS, Issue, ReadOptions, pack_units, plan_pieces, stdin_units, unit_size
from .segment import write_table_file
from .store import write_from_tables
from .snapshot import Segment, segment_name
from .stages.ingest import IngestStage

DEFAULT_SEGMENT_BYTES = 64 << 20  # input bytes per segment (about 15M tokens of English)
ON_ERROR = ("skip", "fail")


@dataclass
class IngestOptions:
    fmt: str = "auto"
    text_field: str = "text"
    id_field: str = "id"
    on_error: str = "skip"
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    workers: int | None = None
    executor: str = "local"
    ray_address: str | None = None

    def check(self) -> None:
        if self.fmt not in FORMATS:
            raise UsageError(f"unknown --format {self.fmt!r}; use one of {', '.join(FORMATS)}")
        if self.on_error not in ON_ERROR:
            raise UsageError(f"unknown --on-error {self.on_error!r}; use skip or fail")
        if self.segment_bytes < 1:
            raise UsageError("--segment-bytes must be positive")
        check_executor(self.executor)
        if self.executor == "ray":  # before anything is created
            require("ray", "ray")


@dataclass
class IngestReport:
    version: int
    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    segments: list[str] = field(default_factory=list)
    resumed_segments: int = 0
    issue_counts: dict[str, int] = field(default_factory=dict)
    issues: list[dict] = field(default_factory=list)
    ignored_counts: dict[str, int] = field(default_factory=dict)  # left out by the folder policy, not errors
    ignored: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # on Ray: {"ingest": [per-node figures]}
    retried_units: int = 0  # on Ray: unit attempts lost to a dead worker or node, and run again

    @property
    def skipped(self) -> int:
        return sum(self.issue_counts.values())

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["skipped"] = self.skipped
        d["tokens_per_s"] = round(self.tokens / self.seconds) if self.seconds else None
        return d


class NothingIngested(BadInput):
    """No document could be read from the sources; `report` says what was found instead."""

    def __init__(self, message: str, hint: str | None, report: IngestReport):
        super().__init__(message, hint)
        self.report = report


def check_something_ingested(report: IngestReport, sources: list[str]) -> None:
    """Raise NothingIngested unless a document was ingested or every one was already in the database."""
    if report.documents or (report.issue_counts and set(report.issue_counts) == {"duplicate-id"}):
        return
    shown = ", ".join(sources[:3]) + (" ..." if len(sources) > 3 else "")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.issue_counts.items()))
    what = f"skipped {counts}" if counts else "found no input file"
    if report.ignored_counts:
        what += "; ignored " + ", ".join(f"{n} {k}" for k, n in sorted(report.ignored_counts.items()))
    fields = sorted({f for i in report.issues for f in i.get("fields") or []})
    hints = []
    if fields:
        hints.append(f"the records have the fields {', '.join(fields[:20])}{' ...' if len(fields) > 20 else ''}: "
                     "name the one holding the text with --text-field NAME")
    if report.issue_counts.get("unsupported") or not fields:
        hints.append("--format text reads every file as plain text")
    if any(i["message"] == "no such file or folder" for i in report.issues):
        hints.append("check the paths")
    raise NothingIngested(f"nothing ingested from {shown}: {what}", "; ".join(hints) or None, report)


@dataclass
class StagedSegments:
    """Segments written (not yet committed) by one ingest job, after de-duplication."""

    segments: dict[int, Segment]  # by number
    next_segment: int
    report: IngestReport
    job_dir: Path
    replaced: list[dict] = field(default_factory=list)  # existing docs superseded (add --replace)

    def put_into(self, edit) -> None:
        """Add the staged segments to a ManifestEdit."""
        for seg in self.segments.values():
            edit.put(seg)
        edit.next_segment = max(edit.next_segment, self.next_segment)


def job_key(sources: list[str], pieces, opts: IngestOptions, config: dict) -> str:
    if "-" in sources:
        return "ingest-" + uuid.uuid4().hex[:16]  # stdin cannot be re-read: never resumed
    h = hashlib.sha256()
    for p in pieces:
        st = Path(p.path).stat()
        h.update(json.dumps([p.path, p.start, p.end, st.st_size, st.st_mtime_ns]).encode())
    h.update(json.dumps([opts.fmt, opts.text_field, opts.id_field, opts.segment_bytes,
                         config["chunk_size"], config["tokenizer"]["sha256"]]).encode())
    return "ingest-" + h.hexdigest()[:16]


def ingest(root: str | Path, sources: list[str], opts: IngestOptions | None = None, *,
           tokenizer: str | Path | None = None, chunk_size: int = 64, wait: float = 0.0,
           progress=None, stdin=None) -> IngestReport:
    """Ingest `sources` into the database at `root` (created if missing); one commit."""
    opts = opts or IngestOptions()
    opts.check()
    if not sources:
        raise UsageError("nothing to ingest: give at least one file, folder, or - for stdin")
    pieces, plan_issues = plan_pieces(sources, opts.fmt, opts.segment_bytes)
    new = not Path(root).exists()
    db = Database.open_or_create(root, tokenizer, chunk_size, wait=wait)
    started = time.perf_counter()
    job = job_key(sources, pieces, opts, db.config)
    try:
        with db.writer("ingest", wait=wait, keep_job=job) as w:
            staged = stage_sources(w, job, pieces, plan_issues, opts, progress=progress, stdin=stdin)
            version = w.base.version
            if staged.segments:  # nothing new (all skipped): no empty snapshot
                edit = w.edit("ingest")
                staged.put_into(edit)
                version = w.commit(edit).version
            shutil.rmtree(staged.job_dir, ignore_errors=True)
        report = staged.report
        report.version = version
        report.seconds = time.perf_counter() - started
        check_something_ingested(report, sources)
    except BadInput:
        if new:  # do not leave behind the empty database this call created
            _remove_if_empty(Path(root))
        raise
    return report


def _remove_if_empty(root: Path) -> None:
    try:
        if Database(root).version == 0:
            shutil.rmtree(root, ignore_errors=True)
    except RetrodbError:
        pass


def stage_sources(w: Writer, job: str, pieces, plan_issues: list[Issue], opts: IngestOptions, *,
                  replace: bool = False, progress=None, stdin=None) -> StagedSegments:
    """Write the segments of one ingest job under the writer lock, without committing them."""
    report = IngestReport(version=w.base.version)
    for issue in plan_issues:
        _fail_or_count(issue, opts, report)
    job_dir = w.work_dir(job)
    config = w.base.config
    first = w.base.next_segment
    w.write_json(job_dir / "plan.json", {"base_version": w.base.version})

    def claim(number: int) -> int:  # a segment directory this job will write: journaled first
        w.new_segment_dir(number, job)
        return number

    if pieces and pieces[0].path == "<stdin>":  # stdin: units are cut as the stream arrives
        counter = iter(range(first, 1 << 31))
        units = stdin_units(stdin or sys.stdin.buffer, opts.segment_bytes, lambda: claim(next(counter)),
                            pieces[0].fmt)
        total = None
        planned: list[int] = []
    else:
        unit_list = pack_units(pieces, opts.segment_bytes, first)
        units = unit_list
        total = sum(unit_size(u) for u in unit_list)
        planned = [claim(u["segment"]) for u in unit_list]
    if progress is not None and total is not None:
        progress({"total_bytes": total})
    stage = IngestStage(w.root, job_dir, config, ReadOptions(opts.text_field, opts.id_field), opts.on_error)
    workers = opts.workers
    if workers is None and total is not None:
        workers = max(1, min(len(planned), make_executor("local").workers))
    executor = make_executor(opts.executor, workers, opts.ray_address)
    try:
        results = executor.run(stage, units, on_progress=progress)
    except BadInput:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    finally:
        if opts.executor == "ray":
            report.nodes = {"ingest": node_figures(executor)}
            report.retried_units = executor.retried
    results.sort(key=lambda r: r["segment"])
    segments: dict[int, Segment] = {}
    last = first - 1
    for r in results:
        number = r["segment"]
        last = max(last, number)
        report.resumed_segments += int(r.get("resumed", False))
        for kind, n in r["issue_counts"].items():
            report.issue_counts[kind] = report.issue_counts.get(kind, 0) + n
        report.issues.extend(r["issues"][: max(0, 1000 - len(report.issues))])
        if r["entry"]["documents"]:
            segments[number] = Segment.from_json(number, r["entry"])
        if r.get("dropping"):  # a duplicate removal that a crash interrupted: finish it first
            _drop_documents(w, job_dir, number, segments, set(r["dropping"]))
    replaced = _deduplicate(w, job_dir, segments, opts, report, replace)
    for seg in segments.values():
        report.documents += seg.documents
        report.chunks += seg.chunks
        report.tokens += seg.tokens
    report.segments = [seg.name for seg in sorted(segments.values(), key=lambda s: s.number)]
    return StagedSegments(segments, last + 1, report, job_dir, replaced)


def _fail_or_count(issue: Issue, opts: IngestOptions, report: IngestReport) -> None:
    if issue.kind in IGNORED_KINDS:
        report.ignored_counts[issue.kind] = report.ignored_counts.get(issue.kind, 0) + 1
        if len(report.ignored) < 1000:
            report.ignored.append(issue.to_dict())
        return
    if opts.on_error == "fail":
        raise BadInput(str(issue), hint="fix the input, or pass --on-error skip to skip bad records")
    report.issue_counts[issue.kind] = report.issue_counts.get(issue.kind, 0) + 1
    if len(report.issues) < 1000:
        report.issues.append(issue.to_dict())


def _deduplicate(w: Writer, job_dir: Path, segments: dict[int, Segment], opts: IngestOptions,
                 report: IngestReport, replace: bool) -> list[dict]:
    """Drop documents whose id repeats an earlier new document or (unless `replace`) a live one, found through
    the id index (only the segments that may hold the new ids are read).

    Returns the live documents that new ones replace (segment, doc_id, first_chunk_id, num_chunks, num_tokens).
    """
    import pyarrow.parquet as pq

    from .ids import lookup

    if not segments:
        return []
    new: list[tuple[int, str, str]] = []  # (segment, doc_id, source) in segment and row order
    for number, seg in sorted(segments.items()):
        t = pq.read_table(seg.path(w.root, "documents"), columns=["doc_id", "source"])
        new.extend((number, d, src) for d, src in zip(t["doc_id"].to_pylist(), t["source"].to_pylist()))
    seen: set[str] = set()
    dups = []
    for number, doc_id, source in new:
        if doc_id in seen:
            dups.append((number, doc_id, source))
        seen.add(doc_id)
    existing, _ = lookup(w.base, seen)
    live_ids = {d.doc_id for d in existing}
    clashing = [(n, d, src) for n, d, src in new if d in live_ids] if existing and not replace else []
    drop: dict[int, set[str]] = {}
    for number, doc_id, source in dups:
        drop.setdefault(number, set()).add(doc_id)
        _fail_or_count(Issue("duplicate-id", source, f"duplicate document id {doc_id!r}; first one kept"), opts, report)
    for number, doc_id, source in clashing:
        drop.setdefault(number, set()).add(doc_id)
        _fail_or_count(Issue("duplicate-id", source, f"document id {doc_id!r} is already in the database; "
                             "skipped (use retrodb add --replace to replace it)"), opts, report)
    for number, ids in sorted(drop.items()):
        _drop_documents(w, job_dir, number, segments, ids)
    if not replace:
        return []
    return [d.to_dict() for d in sorted(existing, key=lambda d: (d.segment, d.doc_id))]


def _drop_documents(w: Writer, job_dir: Path, number: int, segments: dict[int, Segment], doc_ids: set[str]) -> None:
    """Rewrite one staged (uncommitted) segment without `doc_ids`; its other chunk ids are unchanged.

    The segment's marker records the ids first, and loses them only once both files are rewritten, so a
    rerun after a crash in between finishes the job (dropping is idempotent) instead of committing the
    marker's stale checksums and the chunks of documents that are gone.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    marker = job_dir / f"{segment_name(number)}.done.json"
    done = json.loads(marker.read_text())
    done["dropping"] = sorted(set(done.get("dropping", [])) | doc_ids)
    w.write_json(marker, done)
    faults.point("ingest.drop_planned")
    ids = pa.array(done["dropping"], pa.string())
    seg = segments.get(number)
    directory = w.segment_dir(number)
    if seg is not None and (directory / "documents.parquet").exists():
        for kind in ("documents", "chunks"):
            path = directory / f"{kind}.parquet"
            table = pq.read_table(path)
            table = table.filter(pc.invert(pc.is_in(table["doc_id"], value_set=ids)))
            if kind == "documents":
                seg = seg.changed(documents=table.num_rows, tokens=int(pc.sum(table["num_tokens"]).as_py() or 0))
            else:
                seg = seg.changed(chunks=table.num_rows)
            seg = seg.with_files({kind: write_table_file(w.root, path, table)})
            faults.point(f"ingest.drop_{kind}_written")
        seg = seg.with_files({"store": write_from_tables(w.root, directory)})
    if seg is None or seg.documents == 0:
        shutil.rmtree(directory, ignore_errors=True)
        segments.pop(number, None)
        done["entry"] = {"documents": 0, "chunks": 0, "tokens": 0, "files": {}}
    else:
        segments[number] = seg
        done["entry"] = seg.to_json()
    del done["dropping"]
    w.write_json(marker, done)
