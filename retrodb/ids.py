"""The document-id index: which segment holds a document, without reading every segment.

Each commit that adds segments writes one **id run**, `ids/ids-<version>-<k>.parquet`: a row per
document of those segments (doc_id, segment, first_chunk_id, num_chunks, num_tokens), sorted by
doc_id, in row groups of RUN_ROW_GROUP rows whose doc_id statistics (min, max) say which one can
hold an id. Runs merge in size tiers (`retrodb/tiers.py`: RUN_BASE rows, factor RUN_FACTOR), at
commit time, dropping the rows of segments no longer live, so a lookup reads O(RUN_FACTOR x tiers)
footers and, per run, the one row group an id can be in.

A redaction rewrites every run that holds a row of a segment it removed (`ManifestEdit.purge_ids_of`):
runs hold document ids, which are user data. A run only says where a document was written. `lookup` keeps the rows of live segments and splits
them into live and deleted documents (the segment's tombstones, read for the segments hit only):
`add` duplicate checks and `--replace`, `delete --doc-id/--ids-file` and `redact --doc-id` touch the
segments that may hold the ids, and no other. A format-1 database has no runs until its next commit
upgrades it; until then a lookup reads every segment's doc_id column (the old way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import faults
from .tiers import plan_merges, tier_of

IDS = "ids"
RUN_BASE = 1 << 14  # rows of a tier-0 run at most
RUN_FACTOR = 8  # runs per tier before they merge (each tier 8x the previous)
RUN_ROW_GROUP = 4096  # rows per row group: a lookup decodes one per run
COLUMNS = ("doc_id", "segment", "first_chunk_id", "num_chunks", "num_tokens")


@dataclass(frozen=True)
class DocLocation:
    segment: int  # segment number
    doc_id: str
    first_chunk_id: int
    num_chunks: int
    num_tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_schema():
    import pyarrow as pa

    return pa.schema([pa.field("doc_id", pa.string(), False), pa.field("segment", pa.int64(), False),
                      pa.field("first_chunk_id", pa.int64(), False), pa.field("num_chunks", pa.int32(), False),
                      pa.field("num_tokens", pa.int64(), False)])


# ---------------------------------------------------------------- writing runs


def segment_rows(root: Path, seg):
    """The id-run rows of one segment's documents (all of them, deleted or not)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(seg.path(root, "documents"), columns=["doc_id", "first_chunk_id", "num_chunks", "num_tokens"])
    return pa.table({"doc_id": t["doc_id"], "segment": pa.array(np.full(t.num_rows, seg.number, np.int64)),
                     "first_chunk_id": t["first_chunk_id"], "num_chunks": t["num_chunks"],
                     "num_tokens": t["num_tokens"]}, schema=run_schema())


def _write_run(root: Path, edit, track, table, k: int) -> dict:
    import pyarrow.parquet as pq

    from .atomic import file_record, make_dirs, publish, tmp_path_for

    table = table.sort_by([("doc_id", "ascending"), ("segment", "ascending")])
    path = track(make_dirs(Path(root) / IDS) / f"ids-{edit.version:08d}-{k:04d}.parquet")
    tmp = tmp_path_for(path)
    pq.write_table(table, tmp, compression="zstd", compression_level=3, row_group_size=RUN_ROW_GROUP,
                   write_statistics=["doc_id"])
    publish(tmp, path)
    edit.new_files.append(path)
    faults.point("commit.id_run_written")
    numbers = table["segment"].to_numpy()
    return {**file_record(root, path), "rows": table.num_rows, "tier": tier_of(table.num_rows, RUN_BASE, RUN_FACTOR),
            "segments": [int(numbers.min()), int(numbers.max())] if len(numbers) else [0, -1]}


def record_new_segments(root: Path, edit, track) -> None:
    """At commit: one run for the documents of the segments `edit` adds, then the merges that are due."""
    import pyarrow as pa

    if edit.base.format_version < 2:  # the upgrade: one run over every document
        edit.id_runs = []
        new = list(edit.segments())
    else:
        new = edit.new_segments()
    k = 0
    if new:
        tables = [segment_rows(root, s) for s in new]
        table = pa.concat_tables(tables)
        if table.num_rows:
            edit.id_runs.append(_write_run(root, edit, track, table, k))
            k += 1
    if edit.purge_ids_of:  # a redaction: no run may keep the ids of the documents it removed
        for i, run in enumerate(list(edit.id_runs)):
            lo, hi = run.get("segments", [0, 1 << 62])
            if any(lo <= n <= hi for n in edit.purge_ids_of):
                kept = _merge_runs(root, edit, [run])
                if kept.num_rows != run["rows"]:
                    edit.id_runs[i] = _write_run(root, edit, track, kept, k) if kept.num_rows else None
                    k += 1
        edit.id_runs = [r for r in edit.id_runs if r is not None]
    for members in plan_merges([int(r["rows"]) for r in edit.id_runs], RUN_BASE, RUN_FACTOR):
        runs = [edit.id_runs[i] for i in members]
        merged = _merge_runs(root, edit, runs)
        keep = [r for i, r in enumerate(edit.id_runs) if i not in set(members)]
        edit.id_runs = keep + ([_write_run(root, edit, track, merged, k)] if merged.num_rows else [])
        k += 1


def runs_holding(snapshot, numbers: set[int]) -> list[dict]:
    """The id runs of `snapshot` that hold a row of one of the segments `numbers` (those whose segment range
    could are read: their segment column only)."""
    import pyarrow.parquet as pq

    out = []
    for run in snapshot.id_runs:
        lo, hi = run.get("segments", [0, 1 << 62])
        if any(lo <= n <= hi for n in numbers):
            col = pq.read_table(Path(snapshot.root) / run["path"], columns=["segment"])["segment"].to_numpy()
            if np.isin(col, np.fromiter(numbers, np.int64)).any():
                out.append(run)
    return out


def _merge_runs(root: Path, edit, runs: list[dict]):
    """The rows of `runs` whose segment is still live after `edit`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(Path(root) / r["path"], schema=run_schema()) for r in runs])
    numbers = np.unique(table["segment"].to_numpy())
    live = np.array([edit.segment(int(n)) is not None for n in numbers], dtype=bool)
    return table.filter(pc.is_in(table["segment"], value_set=pa.array(numbers[live], pa.int64())))


# ---------------------------------------------------------------- lookup

def _footer(root: Path, run: dict):
    """(metadata, row-group doc_id minimums, maximums) of an id run (cached per process with the group
    manifests: a run never changes once written)."""
    from .snapshot import cached

    return cached(("footer", str(Path(root).resolve() / run["path"]), run["sha256"]),
                  lambda: _read_footer(Path(root) / run["path"]))


def _read_footer(path: Path):
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    lo, hi = [], []
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(0).statistics
        if st is not None and st.has_min_max:
            lo.append(st.min if isinstance(st.min, str) else bytes(st.min).decode("utf-8", "surrogatepass"))
            hi.append(st.max if isinstance(st.max, str) else bytes(st.max).decode("utf-8", "surrogatepass"))
        else:  # no statistics: the row group may hold anything
            lo.append(None)
            hi.append(None)
    return md, lo, hi


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _run_hits(root: Path, run: dict, wanted: list[str], wanted_set):
    """Rows of one run whose doc_id is wanted (sorted `wanted`), reading only the row groups that can hold one."""
    import bisect

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    md, lo, hi = _footer(root, run)
    keys = [_utf8(w) for w in wanted]  # Parquet orders strings by their UTF-8 bytes
    groups = []
    for g in range(md.num_row_groups):
        if lo[g] is None:
            groups.append(g)
            continue
        a = bisect.bisect_left(keys, _utf8(lo[g]))
        if a < len(keys) and keys[a] <= _utf8(hi[g]):
            groups.append(g)
    if not groups:
        return None
    t = pq.ParquetFile(Path(root) / run["path"], metadata=md).read_row_groups(groups)
    return t.filter(pc.is_in(t["doc_id"], value_set=wanted_set)).cast(run_schema()) if t.num_rows else None


def locate(snapshot, doc_ids) -> list[DocLocation]:
    """Where the documents `doc_ids` were written, in live segments of `snapshot` (deleted ones included;
    see `lookup`). Reads the id runs' footers and the row groups that can hold the ids; a format-1 snapshot
    has no runs and is read segment by segment."""
    import pyarrow as pa

    wanted = sorted(set(doc_ids), key=_utf8)
    if not wanted:
        return []
    wanted_set = pa.array(wanted, pa.string())
    tables = []
    if snapshot.ids_indexed:
        for run in snapshot.id_runs:
            t = _run_hits(snapshot.root, run, wanted, wanted_set)
            if t is not None and t.num_rows:
                tables.append(t)
    else:
        tables = _scan_segments(snapshot, wanted_set)
    out = []
    for t in tables:
        for row in t.to_pylist():
            if snapshot.segment(row["segment"]) is not None:
                out.append(DocLocation(**row))
    out = sorted(set(out), key=lambda d: (d.segment, d.first_chunk_id))
    return out


def _scan_segments(snapshot, wanted_set) -> list:
    import pyarrow.compute as pc

    tables = []
    for seg in snapshot.segments.values():
        t = segment_rows(snapshot.root, seg)
        t = t.filter(pc.is_in(t["doc_id"], value_set=wanted_set))
        if t.num_rows:
            tables.append(t)
    return tables


def lookup(snapshot, doc_ids) -> tuple[list[DocLocation], list[DocLocation]]:
    """(live documents, deleted documents) with these ids in `snapshot`; the tombstones of the segments hit
    are read, no others."""
    from . import tombstones

    live, dead = [], []
    gone: dict[int, set[str]] = {}
    for d in locate(snapshot, doc_ids):
        if d.segment not in gone:
            gone[d.segment] = tombstones.deleted_doc_ids(snapshot.root, snapshot.segment(d.segment).files)
        (dead if d.doc_id in gone[d.segment] else live).append(d)
    return live, dead

