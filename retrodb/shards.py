"""Index units: what a query searches. A fresh segment's own HNSW index, or a shard merged from many.

The root of a snapshot lists its **index units** (`Snapshot.index_units`), so a query reads the root
and the units, never the group manifests:

    {"kind": "segment", "name": "seg-000007", "segment": 7, "vectors": n, "live": m,
     "files": {"index": rec, "keys": rec, "tombstones": rec or None}}
    {"kind": "shard", "name": "shard-00000042-0000", "vectors": n, "live": m, "segments": s,
     "files": {"index": rec, "ranges": rec, "dead": rec or None}}

A segment unit is the segment's own index (labels: chunk ids), with its tombstones. A **shard**
(`indexes/<name>/`) is one HNSW index over the keys of many segments (labels: chunk ids), built by
`merge` from their live rows; `ranges.npy` maps its chunk ids to segments ([lo, hi, segment] rows,
sorted by lo) and `dead-v<version>.npy` lists the chunk ids that died since it was built
([lo, hi) rows: tombstones of its segments, and whole segments compaction rewrote elsewhere), which a
query marks deleted. Its segments name it (`Segment.shard`) and keep no index of their own.

Units sit in size tiers (`retrodb/tiers.py`, SHARD_BASE vectors, factor SHARD_FACTOR):
`retrodb index --merge` and `retrodb compact` merge a tier that holds SHARD_FACTOR units into one
shard, so a query searches O(SHARD_FACTOR x tiers) indexes however many segments there are. A
shard's vectors are rebuilt from the segments' keys, never copied from an index: hnswlib keeps a
deleted element's vector in the file, so merging drops dead rows for good; and a redaction
overwrites the removed chunks' vectors in a new copy of each shard holding one (`redact_vectors`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import faults
from .snapshot import Segment

INDEXES = "indexes"
SHARD_BASE = 1 << 12  # vectors of a tier-0 unit at most
SHARD_FACTOR = 8  # units per tier before they merge into one shard (each tier 8x the previous)
SHARD_MAX = 1 << 24  # vectors of a shard at most (16.8M: ~56 GB of HNSW at dim 768, M=32): one machine's share


def segment_unit(seg: Segment) -> dict:
    """The unit of a segment searched through its own index."""
    files = seg.files
    return {"kind": "segment", "name": seg.name, "segment": seg.number, "vectors": seg.chunks,
            "live": seg.live_chunks, "files": {"index": dict(files["index"]), "keys": dict(files["keys"]),
                                                "tombstones": dict(files["tombstones"]) if "tombstones" in files
                                                else None}}


def mark_dead(edit, shard: str, ranges) -> None:
    """Record in `edit` that chunk ids [lo, hi) of `ranges` died in `shard` (written at commit)."""
    edit.dead.setdefault(shard, []).extend((int(a), int(b)) for a, b in ranges if b > a)


def refresh_units(root: Path, edit, track) -> None:
    """At commit: the units of the segments `edit` changed (a segment's own index, its tombstones), and the dead
    ranges shards learnt (tombstones of their segments, segments removed from them)."""
    by_segment = {u["segment"]: i for i, u in enumerate(edit.units) if u["kind"] == "segment"}
    drop = set()
    added = []
    for number, seg in edit.changed.items():
        old = edit.base.segment(number)
        if old is not None and old.shard is not None and (seg is None or seg.shard != old.shard):
            # the segment left its shard (compacted away, re-indexed, re-embedded): its vectors there are dead
            mark_dead(edit, old.shard, segment_ranges(root, edit, old.shard, number))
        if number in by_segment:
            drop.add(by_segment[number])
        if seg is not None and "index" in seg.files and seg.shard is None and "keys" in seg.files:
            added.append(segment_unit(seg))
    edit.units = [u for i, u in enumerate(edit.units) if i not in drop] + added
    for name, ranges in sorted(edit.dead.items()):
        _write_dead(root, edit, track, name, ranges)
    edit.units = [u for u in edit.units if u["kind"] != "shard" or int(u["live"]) > 0]  # emptied shards go


def _unit(edit, name: str) -> dict | None:
    return next((u for u in edit.units if u["name"] == name), None)


def read_ranges(root: Path, unit: dict) -> np.ndarray:
    """A shard's [lo, hi, segment] rows, sorted by lo, disjoint (memory-mapped: a lookup reads a few pages)."""
    return np.load(Path(root) / unit["files"]["ranges"]["path"], mmap_mode="r")


def read_dead(root: Path, unit: dict) -> np.ndarray:
    """The [lo, hi) ranges of chunk ids dead in a unit since it was built, sorted, disjoint."""
    if unit["kind"] == "segment":
        from . import tombstones

        lo, hi = tombstones.deleted_ranges(root, {"tombstones": unit["files"]["tombstones"]}
                                           if unit["files"].get("tombstones") else {})
        return np.stack([lo, hi], axis=1) if len(lo) else np.zeros((0, 2), np.int64)
    rec = unit["files"].get("dead")
    return np.load(Path(root) / rec["path"]) if rec else np.zeros((0, 2), np.int64)


def segment_ranges(root: Path, edit, shard: str, number: int) -> np.ndarray:
    """The chunk id ranges of segment `number` (as the base snapshot has it) that `shard` holds: its chunk ids,
    read from the segment itself, clipped to the shard's ranges (a cost of the segment, not of the shard)."""
    from .stages.index import read_chunk_ids

    unit = _unit(edit, shard)
    seg = edit.base.segment(number)
    if unit is None or seg is None:
        return np.zeros((0, 2), np.int64)
    own = np.asarray(runs(read_chunk_ids(root, seg.files)), dtype=np.int64).reshape(-1, 2)
    return _intersect(own, read_ranges(root, unit))


def union(ranges) -> np.ndarray:
    """Sorted, disjoint [lo, hi) ranges covering the same ids as `ranges`."""
    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    r = r[r[:, 1] > r[:, 0]]
    if not len(r):
        return np.zeros((0, 2), np.int64)
    r = r[np.argsort(r[:, 0], kind="stable")]
    reach = np.maximum.accumulate(r[:, 1])
    start = np.ones(len(r), dtype=bool)
    start[1:] = r[1:, 0] > reach[:-1]
    first = np.flatnonzero(start)
    last = np.append(first[1:], len(r)) - 1
    return np.stack([r[first, 0], reach[last]], axis=1)


def covered(ranges: np.ndarray) -> int:
    return int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0


def _write_dead(root: Path, edit, track, name: str, ranges) -> None:
    from .atomic import file_record, publish, tmp_path_for

    unit = _unit(edit, name)
    if unit is None:
        return
    new = _intersect(union(ranges), read_ranges(root, unit))
    new = union(np.concatenate([read_dead(root, unit), new]))
    path = track(Path(root) / INDEXES / name / f"dead-v{edit.version:08d}.npy")
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        np.save(f, new)
    publish(tmp, path)
    unit["files"] = {**unit["files"], "dead": file_record(root, path)}
    unit["live"] = int(unit["vectors"]) - covered(new)
    faults.point("commit.shard_dead_written")


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The parts of ranges `a` (sorted, disjoint, few) inside ranges `b` (rows [lo, hi, ...], sorted, disjoint,
    maybe memory-mapped and large: only the rows that meet `a` are read)."""
    out = []
    if not len(a) or not len(b):
        return np.zeros((0, 2), np.int64)
    b_lo, b_hi = b[:, 0], b[:, 1]
    for lo, hi in np.asarray(a, dtype=np.int64).reshape(-1, 2).tolist():
        j = int(np.searchsorted(b_hi, lo, side="right"))  # first b ending after lo
        k = int(np.searchsorted(b_lo, hi, side="left"))  # b starting before hi: j .. k-1
        if k > j:
            part = np.asarray(b[j:k, :2], dtype=np.int64)
            out.append(np.stack([np.maximum(part[:, 0], lo), np.minimum(part[:, 1], hi)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


# ---------------------------------------------------------------- merging


def shard_name(version: int, k: int) -> str:
    return f"shard-{version:08d}-{k:04d}"


def merge_units(w, params: dict | None = None, threads: int | None = None, unindexed: bool = False,
                base: int | None = None, factor: int | None = None) -> list[dict]:
    """Merge the index units of every full tier into shards (`retrodb index --merge`, `retrodb compact`), in one
    commit, or none when no tier is full. With `unindexed`, segments that have keys and no index count as
    units of their own too and go straight into the shards (`index --merge` on a new database: every key is
    inserted once, no per-segment index is built first). Returns what was built: name, vectors, segments, units
    merged."""
    from .tiers import plan_merges

    snapshot = w.base
    params = params or snapshot.config.get("index")
    base = SHARD_BASE if base is None else base
    factor = SHARD_FACTOR if factor is None else factor
    units = list(snapshot.index_units)
    if unindexed and params and snapshot.totals_summary["unindexed"]:
        units += [{"kind": "pending", "name": seg.name, "segment": seg.number, "live": seg.live_chunks}
                  for seg in snapshot.segments_where(lambda s: s["unindexed"] > 0)
                  if "keys" in seg.files and not seg.indexed and seg.live_chunks > 0]
    plan = plan_merges([int(u["live"]) for u in units], base, factor, SHARD_MAX) if params else []
    if not plan:
        return []
    edit = w.edit("merge-indexes")
    edit.config["index"] = params
    built = []
    for k, members in enumerate(plan):
        merged = [units[i] for i in members]
        segments = []
        for u in merged:
            if u["kind"] in ("segment", "pending"):
                segments.append(edit.require(u["segment"]))
            else:
                for n in np.unique(read_ranges(w.root, u)[:, 2]).tolist():
                    seg = edit.segment(int(n))
                    if seg is not None and seg.shard == u["name"]:
                        segments.append(seg)
        name = shard_name(edit.version, k)
        unit = build_shard(w, edit, name, segments, params, threads)
        for seg in segments:
            edit.put(seg.changed(shard=name).with_files(drop=["index"]))
        gone = {u["name"] for u in merged}
        edit.units = [u for u in edit.units if u["name"] not in gone] + [unit]
        built.append({"name": name, "vectors": unit["vectors"], "segments": len(segments), "units": len(merged)})
    faults.point("merge.before_commit")
    w.commit(edit)
    return built


def build_shard(w, edit, name: str, segments: list[Segment], params: dict, threads: int | None = None) -> dict:
    """One HNSW index over the live keys of `segments` (labels: chunk ids), with its ranges file, published in
    `indexes/<name>/` (journaled first); returns its unit."""
    import hashlib

    import pyarrow as pa

    from .atomic import file_record, make_dirs, publish, tmp_path_for
    from .errors import require
    from .executor import default_workers
    from .stages.index import ADD_BATCH, SEED, open_keys, read_chunk_ids
    from .store import STORE_COLUMNS, STORE_NAME, StoreWriter, segment_rows
    from .tombstones import deleted_chunk_mask

    hnswlib = require("hnswlib", "index")
    threads = threads or default_workers()
    directory = make_dirs(w.track(Path(w.root) / INDEXES / name))
    segments = sorted(segments, key=lambda s: s.number)
    total = sum(s.live_chunks for s in segments)
    dim = int(edit.config["embedder"]["dim"])
    index = hnswlib.Index(space=params["space"], dim=dim)
    index.init_index(max_elements=max(1, total), ef_construction=params["ef_construction"], M=params["M"],
                     random_seed=SEED)
    ranges = []
    added = 0
    store = StoreWriter(directory / STORE_NAME, edit.config["tokenizer"]["token_type"])
    try:
        for seg in segments:
            keys = open_keys(w.root, seg.files)
            ids = read_chunk_ids(w.root, seg.files)
            live = ~deleted_chunk_mask(w.root, seg.files, ids)
            rows = np.flatnonzero(live)
            for start in range(0, len(rows), ADD_BATCH):
                r = rows[start: start + ADD_BATCH]
                index.add_items(np.asarray(keys[r], dtype=np.float32), ids[r], num_threads=threads)
                faults.point("merge.batch_added")
            at = 0
            for t in segment_rows(w.root, seg.files):  # the live rows' chunk, text and tokens: winners read here
                keep = live[at: at + t.num_rows]
                at += t.num_rows
                t = t.filter(pa.array(keep))
                if t.num_rows:
                    store.write(*(t.column(n) for n in STORE_COLUMNS))
            added += len(rows)
            ranges.extend((lo, hi, seg.number) for lo, hi in runs(ids[rows]))
        store_record = store.close(w.root)
    except BaseException:
        store.abort()
        raise
    tag = hashlib.sha256(name.encode()).hexdigest()[:12]
    final = directory / f"index-{params['space']}-M{params['M']}-efc{params['ef_construction']}-{tag}.hnsw"
    tmp = tmp_path_for(final)
    try:
        index.save_index(str(tmp))
        publish(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    faults.point("merge.index_saved")
    ranges_path = directory / "ranges.npy"
    tmp = tmp_path_for(ranges_path)
    table = np.asarray(sorted(ranges), dtype=np.int64).reshape(-1, 3)
    with open(tmp, "wb") as f:
        np.save(f, table)
    publish(tmp, ranges_path)
    return {"kind": "shard", "name": name, "vectors": added, "live": added, "segments": len(segments),
            "files": {"index": file_record(w.root, final), "ranges": file_record(w.root, ranges_path),
                      "store": store_record, "dead": None}}


def runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) runs of consecutive ids covering `ids` exactly."""
    if not len(ids):
        return []
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(ids) - 1]])
    return [(int(ids[a]), int(ids[b]) + 1) for a, b in zip(starts, ends)]


# ---------------------------------------------------------------- redaction


def redact_vectors(w, edit, chunk_ranges) -> list[str]:
    """Redaction: for every shard of `edit` that holds a removed chunk (dead or not), publish a copy of its index
    file with those vectors overwritten by zeros and marked deleted, and a copy of its store without their rows,
    and point the unit at them. hnswlib keeps a deleted element's vector in the file, so marking alone would
    leave it on disk. Returns the files replaced (old snapshots that reference them must go too)."""
    import pyarrow as pa

    from .atomic import file_record, publish, tmp_path_for

    removed = union(np.asarray([(int(a), int(a) + int(n)) for a, n in chunk_ranges], np.int64).reshape(-1, 2))
    replaced = []
    for unit in edit.units:
        if unit["kind"] != "shard" or not len(removed):
            continue
        hit = _intersect(removed, read_ranges(w.root, unit))
        if not len(hit):
            continue
        old = Path(w.root) / unit["files"]["index"]["path"]
        stem = old.name.removesuffix(".hnsw").split("-v")[0]
        final = w.track(old.with_name(f"{stem}-v{edit.version:08d}.hnsw"))
        tmp = tmp_path_for(final)
        try:
            raw = bytearray(old.read_bytes())
            erase_vectors(raw, hit)
            with open(tmp, "wb") as f:
                f.write(raw)
            publish(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        replaced.append(unit["files"]["index"]["path"])
        unit["files"] = {**unit["files"], "index": file_record(w.root, final)}
        if unit["files"].get("store"):  # the store holds the removed chunks' text and tokens: a copy without them
            from .store import ChunkStore, copy_rows

            old_store = Path(w.root) / unit["files"]["store"]["path"]
            kept = (t.filter(pa.array(~_in_ranges(t["chunk_id"].to_numpy(), hit)))
                    for t in (pa.Table.from_batches([b]) for b in ChunkStore(old_store).batches))
            new_store = w.track(old_store.with_name(f"store-v{edit.version:08d}.arrow"))
            replaced.append(unit["files"]["store"]["path"])
            unit["files"] = {**unit["files"], "store": copy_rows(w.root, new_store, edit.config["tokenizer"]["token_type"],
                                                                kept)}
        mark_dead(edit, unit["name"], hit)
        faults.point("redact.shard_rewritten")
    return replaced


def _in_ranges(ids: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    if not len(ranges):
        return np.zeros(len(ids), dtype=bool)
    at = np.searchsorted(ranges[:, 0], ids, side="right") - 1
    return (at >= 0) & (ids < ranges[np.maximum(at, 0), 1])


def erase_vectors(raw: bytearray, ranges: np.ndarray) -> int:
    """Overwrite, in an hnswlib index file's bytes, the vectors of the labels in `ranges` with zeros and set their
    deleted mark (hnswlib's file layout: a header, then per element its level-0 links [count, flags, ...], its
    float32 vector and its label). Returns how many elements were erased."""
    from .absent import HNSW_HEADER

    (offset_level0, _max, count, size_per, label_offset, offset_data, *_rest) = HNSW_HEADER.unpack_from(raw, 0)
    base = HNSW_HEADER.size
    data_size = label_offset - offset_data
    labels = np.frombuffer(bytes(raw[base: base + count * size_per]), dtype=np.uint8).reshape(count, size_per)
    labels = labels[:, label_offset: label_offset + 8].copy().view("<u8").ravel().astype(np.int64)
    lo, hi = ranges[:, 0], ranges[:, 1]
    at = np.searchsorted(lo, labels, side="right") - 1
    hit = np.flatnonzero((at >= 0) & (labels < hi[np.maximum(at, 0)]))
    for i in hit.tolist():
        start = base + i * size_per
        raw[start + offset_data: start + offset_data + data_size] = bytes(data_size)
        raw[start + 2] |= 0x01  # hnswlib's DELETE_MARK, in the level-0 link list header
    return len(hit)
