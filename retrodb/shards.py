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
    """A shard's [lo, hi, segment] rows, sorted by lo."""
    return np.load(Path(root) / unit["files"]["ranges"]["path"])


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
    unit = _unit(edit, shard)
    if unit is None:
        return np.zeros((0, 2), np.int64)
    r = read_ranges(root, unit)
    return r[r[:, 2] == number][:, :2]


def union(ranges: np.ndarray) -> np.ndarray:
    """Sorted, disjoint [lo, hi) ranges covering the same ids as `ranges`."""
    if not len(ranges):
        return np.zeros((0, 2), np.int64)
    r = ranges[np.argsort(ranges[:, 0], kind="stable")]
    out = [list(r[0])]
    for lo, hi in r[1:]:
        if lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return np.asarray(out, dtype=np.int64)


def covered(ranges: np.ndarray) -> int:
    return int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0


def _write_dead(root: Path, edit, track, name: str, ranges) -> None:
    from .atomic import file_record, publish, tmp_path_for

    unit = _unit(edit, name)
    if unit is None:
        return
    labels = read_ranges(root, unit)[:, :2]
    new = union(np.concatenate([read_dead(root, unit), np.asarray(ranges, np.int64).reshape(-1, 2)]))
    new = _intersect(new, labels)
    path = track(Path(root) / INDEXES / name / f"dead-v{edit.version:08d}.npy")
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        np.save(f, new)
    publish(tmp, path)
    unit["files"] = {**unit["files"], "dead": file_record(root, path)}
    unit["live"] = int(unit["vectors"]) - covered(new)
    faults.point("commit.shard_dead_written")


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The parts of ranges `a` inside ranges `b` (both sorted, disjoint)."""
    out = []
    j = 0
    b = union(b)
    for lo, hi in a:
        while j < len(b) and b[j, 1] <= lo:
            j += 1
        k = j
        while k < len(b) and b[k, 0] < hi:
            out.append([max(lo, b[k, 0]), min(hi, b[k, 1])])
            k += 1
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


# ---------------------------------------------------------------- merging


def shard_name(version: int, k: int) -> str:
    return f"shard-{version:08d}-{k:04d}"


def merge_units(w, threads: int | None = None, base: int = SHARD_BASE, factor: int = SHARD_FACTOR) -> list[dict]:
    """Merge the index units of every full tier into shards (`retrodb index --merge`, `retrodb compact`), in one
    commit, or none when no tier is full. Returns what was built: name, vectors, segments, units merged."""
    from .tiers import plan_merges

    snapshot = w.base
    params = snapshot.config.get("index")
    units = list(snapshot.index_units)
    plan = plan_merges([int(u["live"]) for u in units], base, factor) if params else []
    if not plan:
        return []
    edit = w.edit("merge-indexes")
    built = []
    for k, members in enumerate(plan):
        merged = [units[i] for i in members]
        segments = []
        for u in merged:
            if u["kind"] == "segment":
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

    from .atomic import file_record, make_dirs, publish, tmp_path_for
    from .errors import require
    from .executor import default_workers
    from .stages.index import ADD_BATCH, SEED, open_keys, read_chunk_ids
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
    for seg in segments:
        keys = open_keys(w.root, seg.files)
        ids = read_chunk_ids(w.root, seg.files)
        live = ~deleted_chunk_mask(w.root, seg.files, ids)
        rows = np.flatnonzero(live)
        for start in range(0, len(rows), ADD_BATCH):
            r = rows[start: start + ADD_BATCH]
            index.add_items(np.asarray(keys[r], dtype=np.float32), ids[r], num_threads=threads)
            faults.point("merge.batch_added")
        added += len(rows)
        ranges.extend((lo, hi, seg.number) for lo, hi in runs(ids[rows]))
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
            "files": {"index": file_record(w.root, final), "ranges": file_record(w.root, ranges_path), "dead": None}}


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
    """Redaction: for every shard of `edit` that holds a vector of a removed chunk (dead or not), publish a copy of
    its index file with those vectors overwritten by zeros and marked deleted, and point the unit at it. hnswlib
    keeps a deleted element's vector in the file, so marking alone would leave it on disk. Returns the index
    files replaced (old snapshots that reference them must go too)."""
    from .atomic import file_record, publish, tmp_path_for

    removed = union(np.asarray([(int(a), int(a) + int(n)) for a, n in chunk_ranges], np.int64).reshape(-1, 2))
    replaced = []
    for unit in edit.units:
        if unit["kind"] != "shard" or not len(removed):
            continue
        hit = _intersect(removed, read_ranges(w.root, unit)[:, :2])
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
        mark_dead(edit, unit["name"], hit)
        faults.point("redact.shard_rewritten")
    return replaced


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
