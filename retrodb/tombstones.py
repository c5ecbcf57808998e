"""Tombstones: the deleted documents of a segment.

A segment's tombstones file lists every deleted document of that segment
(doc_id, its chunk range, the version that deleted it). More deletions write
a NEW file, `tombstones-vNNNNNNNN.parquet` named for the version that commits
it, holding the old rows plus the new ones, and the manifest then names it.
Files are never edited, so an older snapshot keeps seeing exactly its own
deletions. Compaction drops tombstoned rows physically; the new segment
starts with no tombstones.

The writer tracks each new file before writing it, so that a file of a
version that was never committed (an interrupted command) is removed by the
next writer (see `Writer.track` and `Writer.cleanup`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import faults
from .schema import arrow_schema
from .snapshot import segment_dir

PREFIX = "tombstones-v"


def file_name(version: int) -> str:
    return f"{PREFIX}{version:08d}.parquet"


def read(root: Path, files: dict):
    """The tombstones table of a segment, given its file records (empty when it has none)."""
    import pyarrow.parquet as pq

    rec = files.get("tombstones")
    if rec is None:
        return arrow_schema("tombstones").empty_table()
    return pq.read_table(Path(root) / rec["path"], schema=arrow_schema("tombstones"))


def deleted_doc_ids(root: Path, files: dict) -> set[str]:
    return set(read(root, files)["doc_id"].to_pylist())


def deleted_ranges(root: Path, files: dict) -> tuple[np.ndarray, np.ndarray]:
    """The deleted chunk ids of a segment as sorted, disjoint [lo, hi) ranges (one per deleted document)."""
    table = read(root, files)
    lo = table["first_chunk_id"].to_numpy().astype(np.int64)
    hi = lo + table["num_chunks"].to_numpy().astype(np.int64)
    order = np.argsort(lo, kind="stable")
    return lo[order], hi[order]


def deleted_chunk_mask(root: Path, files: dict, chunk_ids: np.ndarray) -> np.ndarray:
    """True where a chunk id of this segment belongs to a deleted document."""
    table = read(root, files)
    mask = np.zeros(len(chunk_ids), dtype=bool)
    if table.num_rows == 0:
        return mask
    first = table["first_chunk_id"].to_numpy()
    last = first + table["num_chunks"].to_numpy().astype(np.int64)
    order = np.argsort(first)
    first, last = first[order], last[order]
    i = np.searchsorted(first, chunk_ids, side="right") - 1
    ok = i >= 0
    mask[ok] = chunk_ids[ok] < last[i[ok]]
    return mask


def add(w, edit, documents: list[dict]) -> dict:
    """Tombstone `documents` in `edit` (the next version, to be committed by the Writer `w`), writing one new
    file per segment; the index shards holding them learn it too (`shards.mark_dead`).

    Each document is a dict with segment (number), doc_id, first_chunk_id, num_chunks, num_tokens. Already
    tombstoned ids are ignored. Updates the segments' deleted_* counts; returns the totals added.
    """
    import pyarrow as pa

    from .segment import write_table_file
    from .shards import mark_dead

    root = w.root
    version = edit.version
    by_segment: dict[int, list[dict]] = {}
    for d in documents:
        by_segment.setdefault(int(d["segment"]), []).append(d)
    totals = {"documents": 0, "chunks": 0, "tokens": 0, "segments": 0}
    schema = arrow_schema("tombstones")
    for number in sorted(by_segment):
        seg = edit.require(number)
        old = read(root, seg.files)
        seen = set(old["doc_id"].to_pylist())
        new = []
        for d in by_segment[number]:
            if d["doc_id"] not in seen:
                seen.add(d["doc_id"])
                new.append(d)
        if not new:
            continue
        rows = pa.table({
            "doc_id": [d["doc_id"] for d in new],
            "first_chunk_id": [d["first_chunk_id"] for d in new],
            "num_chunks": [d["num_chunks"] for d in new],
            "version": [version] * len(new),
        }, schema=schema)
        table = pa.concat_tables([old, rows]) if old.num_rows else rows
        path = w.track(segment_dir(root, number) / file_name(version))
        record = write_table_file(root, path, table)
        faults.point("delete.tombstones_written")
        n_docs, n_chunks = len(new), sum(d["num_chunks"] for d in new)
        n_tokens = sum(d["num_tokens"] for d in new)
        seg = edit.update(number, files={**seg.files, "tombstones": record},
                          deleted_documents=seg.deleted_documents + n_docs,
                          deleted_chunks=seg.deleted_chunks + n_chunks,
                          deleted_tokens=seg.deleted_tokens + n_tokens)
        if seg.shard is not None:
            mark_dead(edit, seg.shard, [(d["first_chunk_id"], d["first_chunk_id"] + d["num_chunks"]) for d in new])
        totals["documents"] += n_docs
        totals["chunks"] += n_chunks
        totals["tokens"] += n_tokens
        totals["segments"] += 1
    return totals
