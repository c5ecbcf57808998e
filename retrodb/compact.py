"""`retrodb compact`: rewrite segments without their deleted rows, and merge small ones, in one commit.

The plan picks (1) segments whose deleted share of chunks reaches
`min_deleted_ratio`, and (2) small segments (under half of
`target_segment_chunks` live chunks, typically left by `add`), packed in
segment order into groups of at most `target_segment_chunks` live chunks.
Only segments of the same shape merge (same keys file name, index or not, stored
neighbours or not), so a merge never drops a segment's precomputed neighbours. A
segment whose every document is deleted is dropped without a rewrite. Each
group becomes one NEW segment (numbers are never reused) through the compact
stage; untouched segments are not read at all, so the cost is the size of
the segments rewritten. The old segments' files stay on disk, still read by
older snapshots, until `vacuum`.

Resumable like ingest: the job is keyed by the base snapshot and the plan,
finished groups leave markers under `_work/<job>/`, and a rerun after a crash
on the same snapshot redoes only the unfinished groups.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import faults
from .database import Database
from .errors import UsageError
from .executor import check_executor, make_executor, node_figures
from .shards import merge_units
from .snapshot import Segment, Snapshot, segment_name
from .stages.compact import CompactStage

DEFAULT_MIN_DELETED_RATIO = 0.2
DEFAULT_TARGET_SEGMENT_CHUNKS = 1 << 18  # about one 64 MB ingest segment of English text


@dataclass
class CompactGroup:
    sources: list[int]  # numbers of the segments rewritten together
    reason: str  # "deleted" (tombstoned share), "merge" (small segments), "empty" (all deleted: dropped)
    live_chunks: int
    dropped_chunks: int
    segment: int | None = None  # the new segment's number (None: nothing left to write)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["sources"] = [segment_name(n) for n in self.sources]
        d["new_segment"] = segment_name(self.segment) if self.segment is not None else None
        del d["segment"]
        return d


@dataclass
class CompactReport:
    version: int
    groups: list[CompactGroup]
    segments_before: int
    segments_after: int
    chunks_rewritten: int = 0
    chunks_dropped: int = 0
    bytes_written: int = 0
    resumed_groups: int = 0
    merged: list[dict] = field(default_factory=list)  # index shards built (merged) after the compaction
    dry_run: bool = False
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # on Ray: {"compact": [per-node figures]}
    retried_units: int = 0  # on Ray: unit attempts lost to a dead worker or node, and run again

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["groups"] = [g.to_dict() for g in self.groups]
        return d


def check_options(min_deleted_ratio: float, target_segment_chunks: int) -> None:
    if not 0.0 <= min_deleted_ratio <= 1.0:
        raise UsageError(f"--min-deleted-ratio must be between 0 and 1, not {min_deleted_ratio}")
    if target_segment_chunks < 0:
        raise UsageError("--target-segment-chunks must be 0 (no merging) or positive")


def _shape(seg: Segment) -> tuple:
    """What segments must share to merge: keys, index, and stored neighbours (so a merge never loses them)."""
    keys = seg.files.get("keys")
    nb = seg.neighbours if "neighbours" in seg.files else None
    nb_params = tuple(nb.get(k) for k in ("k", "margin", "ef")) if nb else None
    return (Path(keys["path"]).name if keys else None, seg.indexed, nb_params)


def plan_compaction(snapshot: Snapshot, min_deleted_ratio: float = DEFAULT_MIN_DELETED_RATIO,
                    target_segment_chunks: int = DEFAULT_TARGET_SEGMENT_CHUNKS) -> list[CompactGroup]:
    """The groups of segments to rewrite, numbered from the snapshot's next free segment number. Only the group
    manifests whose summary holds a candidate (a segment deleted enough, or small enough to merge) are read."""
    check_options(min_deleted_ratio, target_segment_chunks)
    groups: list[CompactGroup] = []
    dirty: set[int] = set()
    filling: dict[tuple, CompactGroup] = {}  # the merge group being filled, per shape
    small = target_segment_chunks / 2 if target_segment_chunks > 0 else 0

    def candidate(s: dict) -> bool:
        return (s["min_live"] is not None and (s["min_live"] == 0 or s["min_live"] < small)) or \
            (s["deleted_chunks"] > 0 and s["max_deleted_ratio"] >= min_deleted_ratio)

    for seg in snapshot.segments_where(candidate):
        name = seg.number
        deleted = seg.deleted_chunks
        live = seg.live_chunks
        if live == 0:
            groups.append(CompactGroup([name], "empty", 0, deleted))
            continue
        if deleted > 0 and deleted / seg.chunks >= min_deleted_ratio:
            dirty.add(name)
        if not (target_segment_chunks > 0 and live < target_segment_chunks / 2):  # not small: never merged
            if name in dirty:
                groups.append(CompactGroup([name], "deleted", live, deleted))
            continue
        g = filling.get(_shape(seg))
        if g is None or g.live_chunks + live > target_segment_chunks:
            g = filling[_shape(seg)] = CompactGroup([], "merge", 0, 0)
            groups.append(g)
        g.sources.append(name)
        g.live_chunks += live
        g.dropped_chunks += deleted
    out = []
    for g in groups:
        if g.reason == "merge" and len(g.sources) == 1:
            if g.sources[0] not in dirty:
                continue  # a lone small segment with nothing to drop: rewriting it gains nothing
            g.reason = "deleted"
        out.append(g)
    number = snapshot.next_segment
    for g in sorted(out, key=lambda g: g.sources[0]):
        if g.live_chunks:
            g.segment = number
            number += 1
    return sorted(out, key=lambda g: g.sources[0])


def _job_key(snapshot: Snapshot, groups: list[CompactGroup]) -> str:
    h = hashlib.sha256(json.dumps([snapshot.version, [g.to_dict() for g in groups]]).encode())
    return "compact-" + h.hexdigest()[:16]


def compact(root: str | Path, min_deleted_ratio: float = DEFAULT_MIN_DELETED_RATIO,
            target_segment_chunks: int = DEFAULT_TARGET_SEGMENT_CHUNKS, *, dry_run: bool = False,
            workers: int | None = None, executor: str = "local", ray_address: str | None = None,
            wait: float = 0.0, merge_indexes: bool = True, progress=None) -> CompactReport:
    """Compact the database at `root` (see the module doc); one commit, or none when there is nothing to do.
    Then, unless `merge_indexes` is false, merge the index units whose tier is full (one more commit, when any
    is: retrodb/shards.py)."""
    check_executor(executor)
    started = time.perf_counter()
    db = Database(root)
    groups = plan_compaction(db.snapshot, min_deleted_ratio, target_segment_chunks)
    if dry_run:
        return _report(db.snapshot, groups, dry_run, started)
    job = _job_key(db.snapshot, groups)
    with db.writer("compact", wait=wait, keep_job=job) as w:  # taken even for nothing to do: it cleans leftovers
        if w.base.version != db.snapshot.version:  # a commit came in between: plan on the latest
            groups = plan_compaction(w.base, min_deleted_ratio, target_segment_chunks)
            job = _job_key(w.base, groups)
        if not groups:
            report = _report(w.base, groups, False, started)
            if merge_indexes:
                report.merged = merge_units(w)
                report.version = w.base.version
            return report
        job_dir = w.work_dir(job)
        units = [{"segment": g.segment, "sources": [[n, w.base.segments[n].to_json()] for n in g.sources]}
                 for g in groups if g.segment is not None]
        w.write_json(job_dir / "plan.json", {"base_version": w.base.version})
        for u in units:
            w.new_segment_dir(u["segment"], job)
        if progress is not None:
            progress({"total": sum(g.live_chunks for g in groups)})
        stage = CompactStage(w.root, job_dir, w.base.config.get("index"))
        n_workers = workers or max(1, min(len(units), make_executor("local").workers))
        on_progress = (lambda c: progress({**c, "advance": c.get("chunks", 0)})) if progress else None
        runner = make_executor(executor, n_workers, ray_address)
        results = runner.run(stage, units, on_progress=on_progress) if units else []
        report = _report(w.base, groups, False, started)
        if executor == "ray" and units:
            report.nodes = {"compact": node_figures(runner)}
            report.retried_units = runner.retried
        edit = w.edit("compact")
        for g in groups:
            for number in g.sources:
                edit.remove(number)
        for r in sorted(results, key=lambda r: r["segment"]):
            edit.apply(r)
            report.bytes_written += sum(f["bytes"] for f in r["entry"]["files"].values())
            report.resumed_groups += int(r.get("resumed", False))
        faults.point("compact.before_commit")
        report.version = w.commit(edit).version
        report.segments_after = len(w.base.segments)
        shutil.rmtree(job_dir, ignore_errors=True)
        if merge_indexes:
            report.merged = merge_units(w)
            report.version = w.base.version
    report.seconds = time.perf_counter() - started
    return report


def _report(snapshot: Snapshot, groups: list[CompactGroup], dry_run: bool, started: float) -> CompactReport:
    sources = sum(len(g.sources) for g in groups)
    new = sum(1 for g in groups if g.segment is not None)
    before = len(snapshot.segments)
    return CompactReport(
        version=snapshot.version, groups=groups, segments_before=before, segments_after=before - sources + new,
        chunks_rewritten=sum(g.live_chunks for g in groups), chunks_dropped=sum(g.dropped_chunks for g in groups),
        dry_run=dry_run, seconds=time.perf_counter() - started)
