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

With `opts.executor == "ray"` every step runs on the cluster: ingest tasks,
embed actors (`gpus`), index tasks; this process holds the lock and commits.
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
from .manifest import applied
from .snapshot import Segment
from .stages.base import segment_unit


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
    nodes: dict = field(default_factory=dict)  # on Ray: per-node figures by step (ingest, embed, index)
    retried_units: int = 0  # on Ray: unit attempts (of every step) lost to a dead worker or node, run again

    def to_dict(self) -> dict:
        d = self.ingest.to_dict()
        d.update({k: v for k, v in self.__dict__.items() if k != "ingest"})
        d["nodes"] = {**self.ingest.nodes, **self.nodes}
        d["retried_units"] = self.ingest.retried_units + self.retried_units
        return d


def add(root: str | Path, sources: list[str], opts: IngestOptions | None = None, *, replace: bool = False,
        device: str = "auto", batch_size: int | None = None, wait: float = 0.0, progress=None,
        stdin=None, gpus: int | None = None, dtype: str = "auto") -> AddReport:
    """Add the documents of `sources` to the existing database at `root` in one commit (see the module doc)."""
    from .embed import embed_executor

    opts = opts or IngestOptions()
    opts.check()
    embed_executor(opts.executor, opts.ray_address, gpus, device)  # bad options fail before any work
    if not sources:
        raise UsageError("nothing to add: give at least one file, folder, or - for stdin")
    started = time.perf_counter()
    db = Database(root)
    pieces, plan_issues = plan_pieces(sources, opts.fmt, opts.segment_bytes)
    job = "add-" + hashlib.sha256(f"{job_key(sources, pieces, opts, db.config)}:{replace}".encode()).hexdigest()[:16]
    with db.writer("add", wait=wait, keep_job=job) as w:
        embedder, index_params = segment_finishers(w.base.config, device, batch_size, dtype)
        embed_runner = embed_executor(opts.executor, opts.ray_address, gpus, device, embedder)
        staged = stage_sources(w, job, pieces, plan_issues, opts, replace=replace, progress=progress, stdin=stdin)
        report = AddReport(staged.report, w.base.version)
        if not staged.segments:  # nothing new (everything skipped): no commit
            shutil.rmtree(staged.job_dir, ignore_errors=True)
            report.seconds = time.perf_counter() - started
            check_something_ingested(staged.report, sources)
            return report
        report.embedded_chunks, report.indexed_segments, report.retried_units = finish_segments(
            w, staged.job_dir, staged.segments, embedder, index_params, embed_runner, opts, report.nodes)
        edit = w.edit("add")
        staged.put_into(edit)
        if staged.replaced:
            totals = tombstones.add(w, edit, staged.replaced)
            report.replaced, report.replaced_chunks = totals["documents"], totals["chunks"]
        report.version = w.commit(edit).version
        shutil.rmtree(staged.job_dir, ignore_errors=True)
    if embedder is None:
        report.notes.append("the database has no keys yet: the new documents are not embedded (run retrodb embed)")
    report.ingest.version = report.version
    report.seconds = report.ingest.seconds = time.perf_counter() - started
    return report


def segment_finishers(config: dict, device: str = "auto", batch_size: int | None = None, dtype: str = "auto"):
    """(embedder, index parameters) for new segments of a database with this config; None where it has no
    keys / no index. The embedder's identity is checked before any work, so a missing model fails fast."""
    embedder = None
    if config.get("embedder"):
        from .embedder import embedder_for

        embedder = embedder_for(config, device=device, dtype=dtype, batch_size=batch_size)
    return embedder, config.get("index")


def finish_segments(w, job_dir: Path, segments: dict[int, Segment], embedder, index_params: dict | None,
                    embed_runner=None, opts: IngestOptions | None = None,
                    nodes: dict | None = None) -> tuple[int, int, int]:
    """Embed and index new, uncommitted segments (`segments` is updated with their files); returns
    (chunks embedded, segments indexed, unit attempts retried). Locally by default; on Ray
    (`opts.executor`) `nodes` gets the per-node figures of each step."""
    from .embed import embed_executor
    from .executor import make_executor, node_figures
    from .stages.embed import EmbedStage
    from .stages.index import IndexStage

    opts = opts or IngestOptions()
    nodes = {} if nodes is None else nodes
    embedded = indexed = retried = 0
    if embedder is None:
        return 0, 0, 0
    embed_runner = embed_runner or embed_executor(opts.executor, opts.ray_address, embedder=embedder)
    steps = [("embed", EmbedStage(w.root, embedder, job_dir), embed_runner)]  # partial keys resume from the job dir
    if index_params is not None:
        threads = 1 if opts.executor == "ray" else None
        steps.append(("index", IndexStage(w.root, index_params, threads),
                      make_executor(opts.executor, 1, opts.ray_address)))
    for name, stage, runner in steps:
        try:
            for res in runner.run(stage, [segment_unit(seg) for _, seg in sorted(segments.items())]):
                number = int(res["segment"])
                segments[number] = applied(segments[number], res)
                if name == "embed":
                    embedded += segments[number].chunks
                else:
                    indexed += 1
        finally:
            if opts.executor == "ray":
                nodes[name] = node_figures(runner)
                retried += runner.retried
        faults.point("add.embedded" if name == "embed" else "add.indexed")
    return embedded, indexed, retried
