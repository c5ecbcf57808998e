"""`retrodb add`: ingest, embed and index new documents as new segments, in ONE commit.

Unlike `ingest` + `embed` + `index` (three commands, several commits), an
add becomes visible all at once or not at all: the new segments are written,
embedded with the database's own embedder (when it has keys) and indexed
(when it has an index) under the writer lock, and only then committed. With
`replace`, documents whose id is already live are superseded: the old
versions get tombstones in the same commit, so no snapshot shows both or
neither. Without it such documents are refused (skipped and reported, or
the whole add fails under `--on-error fail`), as ingest does.

Resumable like ingest: a rerun of the same add after a crash reuses the
segments (and keys files) already written.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import faults, tombstones
from .database import Database
from .errors import UsageError
from .ingest import IngestOptions, IngestReport, check_something_ingested, job_key, stage_sources
from .readers import plan_pieces
from .stages.base import merge_result, segment_unit


@dataclass
class AddReport:
    ingest: IngestReport
    version: int
    replaced: int = 0
    replaced_chunks: int = 0
    embedded_chunks: int = 0
    indexed_segments: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = self.ingest.to_dict()
        d.update({k: v for k, v in self.__dict__.items() if k != "ingest"})
        return d


def add(root: str | Path, sources: list[str], opts: IngestOptions | None = None, *, replace: bool = False,
        device: str = "auto", batch_size: int | None = None, wait: float = 0.0, progress=None,
        stdin=None) -> AddReport:
    """Add the documents of `sources` to the existing database at `root` in one commit (see the module doc)."""
    opts = opts or IngestOptions()
    opts.check()
    if not sources:
        raise UsageError("nothing to add: give at least one file, folder, or - for stdin")
    started = time.perf_counter()
    db = Database(root)
    pieces, plan_issues = plan_pieces(sources, opts.fmt, opts.segment_bytes)
    job = "add-" + hashlib.sha256(f"{job_key(sources, pieces, opts, db.config)}:{replace}".encode()).hexdigest()[:16]
    with db.writer("add", wait=wait, keep_job=job) as w:
        embedder, index_builder = segment_finishers(w.base.config, device, batch_size)
        staged = stage_sources(w, job, pieces, plan_issues, opts, replace=replace, progress=progress, stdin=stdin)
        report = AddReport(staged.report, w.base.version)
        if not staged.entries:  # nothing new (everything skipped): no commit
            shutil.rmtree(staged.job_dir, ignore_errors=True)
            report.seconds = time.perf_counter() - started
            check_something_ingested(staged.report, sources)
            return report
        report.embedded_chunks, report.indexed_segments = finish_segments(
            w, staged.job_dir, staged.entries, embedder, index_builder)
        data = w.base.derive("add")
        data["segments"].update(staged.entries)
        data["next_segment"] = staged.next_segment
        if staged.replaced:
            totals = tombstones.add(w, data, staged.replaced)
            report.replaced, report.replaced_chunks = totals["documents"], totals["chunks"]
        report.version = w.commit(data).version
        shutil.rmtree(staged.job_dir, ignore_errors=True)
    if embedder is None:
        report.notes.append("the database has no keys yet: the new documents are not embedded (run retrodb embed)")
    report.ingest.version = report.version
    report.seconds = report.ingest.seconds = time.perf_counter() - started
    return report


def segment_finishers(config: dict, device: str = "auto", batch_size: int | None = None):
    """(embedder, index builder) for new segments of a database with this config; None where it has no
    keys / no index. Loaded before any work, so a missing model fails fast."""
    embedder = index_builder = None
    if config.get("embedder"):
        from .embedder import embedder_for

        embedder = embedder_for(config, device=device, batch_size=batch_size)
    if config.get("index"):
        from .index import build_segment_index as index_builder
    return embedder, index_builder


def finish_segments(w, job_dir: Path, entries: dict[str, dict], embedder, index_builder) -> tuple[int, int]:
    """Embed and index new, uncommitted segments (entries are updated with their files); returns
    (chunks embedded, segments indexed)."""
    embedded = indexed = 0
    if embedder is not None:
        from .stages.embed import EmbedStage

        stage = EmbedStage(w.root, embedder, job_dir)  # partial keys resume from the job dir
        for name, entry in sorted(entries.items()):
            merge_result(entries, stage.run(segment_unit(name, entry)))
            embedded += entry["chunks"]
        faults.point("add.embedded")
    if embedder is not None and index_builder is not None:
        for name, entry in sorted(entries.items()):
            entry["files"]["index"] = index_builder(w.root, name, entry, w.base.config["index"])
            indexed += 1
        faults.point("add.indexed")
    return embedded, indexed
