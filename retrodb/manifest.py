"""The one way to change a snapshot: `ManifestEdit`, committed by `Writer.commit`.

    edit = w.edit("delete")                  # the next version, on top of the writer's base snapshot
    seg = edit.segment(7)                    # a Segment (typed, immutable), as edited so far
    edit.update(7, deleted_chunks=3)         # counts and fields
    edit.set_files(7, {"tombstones": rec})   # file records (drop=... removes kinds)
    edit.put(Segment(...)); edit.remove(3)   # new, replaced and removed segments
    edit.apply(stage_result)                 # a stage's result (stages/base.py contract)
    edit.config["index"] = params            # config, next_segment, pending: plain attributes
    w.commit(edit)

Commit writes only what changed: the group manifests holding a changed
segment (re-partitioned so a group keeps between GROUP_MIN and GROUP_MAX
segments: the last group splits as segments are added, a shrunken group
joins its neighbour), an id run for the documents of new segments
(`retrodb/ids.py`), the index units of changed segments (`retrodb/shards.py`),
and a new root that references every other group, run and shard as it was.
Its cost follows the edit: one changed segment rewrites one group
(at most GROUP_MAX segment entries) and the root (one reference per group).

The first commit on a format-1 database writes every group (and one id run
over every document): that is its upgrade.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from . import faults
from .atomic import atomic_write_bytes
from .errors import RetrodbError
from .snapshot import (GROUPS, GroupRef, Segment, Snapshot, combine, group_json, group_list_json, load_group,
                       summarize, write_root)

GROUP_MAX = 1024  # segments per group manifest at most (a group that grows past it splits in halves)
GROUP_MIN = 128  # a group left with fewer joins its left neighbour, when the two fit in GROUP_MAX
# A commit that only removes segments from a group (compaction's sources, outside the newest group) records
# their numbers in the group's reference instead of rewriting it, up to this many; the group's next rewrite
# drops them. So compacting one segment writes one group, the newest (where the compacted one goes).
REMOVED_MAX = 64


class ManifestEdit:
    """Changes to `base` that will become version base.version + 1 (see the module doc)."""

    def __init__(self, base: Snapshot, command: str):
        self.base = base
        self.command = command
        self.version = base.version + 1
        self.config = copy.deepcopy(base.config)
        self.next_segment = base.next_segment
        self.pending = copy.deepcopy(base.pending)
        self.changed: dict[int, Segment | None] = {}  # number -> new Segment, or None (removed)
        self.units = [dict(u) for u in base.index_units]  # searchable index units (shards.py)
        self.id_runs = [dict(r) for r in base.id_runs]  # document-id runs (ids.py)
        self.dead: dict[str, list] = {}  # shard name -> chunk id ranges that died in it (shards.mark_dead)
        self.purge_ids_of: set[int] = set()  # segments whose rows no id run may keep (a redaction: ids.py)
        self.new_files: list[Path] = []  # metadata files this commit wrote (groups, runs)

    # -- reading, as edited so far
    def segment(self, number: int) -> Segment | None:
        number = int(number)
        if number in self.changed:
            return self.changed[number]
        return self.base.segment(number)

    def require(self, number: int) -> Segment:
        seg = self.segment(number)
        if seg is None:
            raise RetrodbError(f"internal: segment {number} is not in snapshot v{self.base.version}")
        return seg

    def segments(self) -> Iterator[Segment]:
        """Every segment as edited (reads every group of the base: whole-database commands only)."""
        seen = set()
        for seg in self.base.segments.values():
            seen.add(seg.number)
            new = self.changed.get(seg.number, seg) if seg.number in self.changed else seg
            if new is not None:
                yield new
        for n in sorted(set(self.changed) - seen):
            if self.changed[n] is not None:
                yield self.changed[n]

    # -- changing
    def put(self, seg: Segment) -> Segment:
        self.changed[seg.number] = seg
        self.next_segment = max(self.next_segment, seg.number + 1)
        return seg

    def remove(self, number: int) -> None:
        self.require(number)
        self.changed[int(number)] = None

    def update(self, number: int, **fields) -> Segment:
        return self.put(self.require(number).changed(**fields))

    def set_files(self, number: int, records: dict | None = None, drop=()) -> Segment:
        return self.put(self.require(number).with_files(records, drop))

    def apply(self, result: dict) -> Segment:
        """Apply a stage result {"segment": n, "entry": {...}}: a whole new entry (ingest, compact) or files and
        fields added to an existing segment (embed, index)."""
        number = int(result["segment"])
        return self.put(applied(self.segment(number), result))

    def new_segments(self) -> list[Segment]:
        """Segments this edit adds (their documents are not in the id runs yet)."""
        return [s for n, s in sorted(self.changed.items()) if s is not None and self.base.segment(n) is None]


# ---------------------------------------------------------------- commit


def commit(root: Path, edit: ManifestEdit, track: Callable[[Path], Path]) -> Snapshot:
    """Write the changed groups, the id run and index units of the edit, then the root and CURRENT.
    Every new file is passed to `track` (the writer's journal) before it is written."""
    from . import ids, shards

    base = edit.base
    refs = _groups_after(root, edit, track)
    if base.format_version >= 2 and refs == base.group_refs:
        listing, totals = base.list_record, base.totals_summary  # no group changed: the same list
    else:
        listing, totals = _write_list(root, edit, track, refs), combine(r.summary for r in refs)
    shards.refresh_units(root, edit, track)
    ids.record_new_segments(root, edit, track)
    faults.point("commit.metadata_written")
    data = {"version": edit.version, "parent": base.version, "command": edit.command, "config": edit.config,
            "next_segment": edit.next_segment, "pending": edit.pending, "groups": listing, "totals": totals,
            "ids": edit.id_runs, "indexes": edit.units}
    return write_root(root, data)


def _write_list(root: Path, edit: ManifestEdit, track, refs: list[GroupRef]) -> dict | None:
    """The group list of the new root (None for a database without segments)."""
    if not refs:
        return None
    path = track(Path(root) / GROUPS / f"l-{edit.version:08d}.json")
    raw = group_list_json(refs)
    atomic_write_bytes(path, raw)
    edit.new_files.append(path)
    return {"path": path.relative_to(root).as_posix(), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
            "count": len(refs)}


def _groups_after(root: Path, edit: ManifestEdit, track) -> list[GroupRef]:
    """The group references of the new root: untouched ones as they are, changed ones rewritten."""
    base = edit.base
    if not edit.changed and base.format_version >= 2:
        return list(base.group_refs)
    if base.format_version < 2:  # upgrade: every segment goes into new groups
        segments = {s.number: s for s in edit.segments()}
        return _write_groups(root, edit, track, _partition(sorted(segments.values(), key=lambda s: s.number), 0))
    refs = list(base.group_refs)
    touched: dict[int, dict[int, Segment]] = {}
    gone: dict[int, list[int]] = {}  # group -> segments removed from it
    added_or_changed: set[int] = set()  # groups with a new or changed segment
    for number in sorted(edit.changed):
        i = base.group_index(number)
        if i is None:  # before the first group (an empty database)
            i = -1
        if i not in touched:
            touched[i] = dict(base.group(i)) if i >= 0 else {}
        seg = edit.changed[number]
        if seg is None:
            gone.setdefault(i, []).append(number)
            touched[i].pop(number, None)
        else:
            added_or_changed.add(i)
            touched[i][number] = seg
    out: list[tuple[int, list[Segment] | GroupRef]] = []  # (lo, new segments or an untouched ref)
    if -1 in touched:
        out.append((min(touched[-1]), sorted(touched[-1].values(), key=lambda s: s.number)))
    for i, ref in enumerate(refs):
        if i not in touched:
            out.append((ref.lo, ref))
            continue
        live = sorted(touched[i].values(), key=lambda s: s.number)
        removed = tuple(sorted(set(ref.removed) | set(gone.get(i, ()))))
        if i not in added_or_changed and ref.path is not None and len(removed) <= REMOVED_MAX \
                and len(live) >= GROUP_MIN:  # only removals: the same file, a longer `removed`
            out.append((ref.lo, replace(ref, summary=summarize(live), removed=removed)))
        else:
            out.append((ref.lo, live))
    # rebalance the rewritten groups: split the big, join the small to their left neighbour
    groups: list[tuple[int, list[Segment] | GroupRef]] = []
    for lo, item in out:
        if isinstance(item, GroupRef):
            groups.append((lo, item))
            continue
        for part_lo, part in _partition(item, lo):
            if not part and groups:
                continue  # an emptied group: its range goes to its left neighbour
            if groups and len(part) < GROUP_MIN:
                prev_lo, prev = groups[-1]
                prev_segs = list(load_group(root, prev).values()) if isinstance(prev, GroupRef) else prev
                if len(prev_segs) + len(part) <= GROUP_MAX:
                    groups[-1] = (prev_lo, sorted(prev_segs + part, key=lambda s: s.number))
                    continue
            groups.append((part_lo, part))
    return _write_groups(root, edit, track, groups)


def _partition(segments: list[Segment], lo: int) -> list[tuple[int, list[Segment]]]:
    """Split a sorted list of segments into groups of at most GROUP_MAX: as few as fit, of equal sizes (a group
    one over GROUP_MAX splits in halves; a bulk commit fills groups)."""
    if len(segments) <= GROUP_MAX:
        return [(lo, segments)]
    n_parts = -(-len(segments) // GROUP_MAX)
    size = -(-len(segments) // n_parts)
    parts = [segments[i: i + size] for i in range(0, len(segments), size)]
    return [(lo if j == 0 else part[0].number, part) for j, part in enumerate(parts)]


def _write_groups(root: Path, edit: ManifestEdit, track, groups) -> list[GroupRef]:
    refs = []
    k = 0
    for lo, item in groups:
        if isinstance(item, GroupRef):
            refs.append(item if item.lo == lo else replace(item, lo=lo))
            continue
        if not item:
            continue
        path = track(Path(root) / GROUPS / f"g-{edit.version:08d}-{k:04d}.json")
        k += 1
        raw = group_json(lo, item)
        atomic_write_bytes(path, raw)
        edit.new_files.append(path)
        refs.append(GroupRef(lo, path.relative_to(root).as_posix(), len(raw), hashlib.sha256(raw).hexdigest(),
                             summarize(item)))
        faults.point("commit.group_written")
    return refs


def applied(seg: Segment | None, result: dict) -> Segment:
    """The segment a stage result {"segment": n, "entry": {...}} makes of `seg`: the result's whole entry when
    `seg` is None (a new segment), else `seg` with the result's files and fields added."""
    number, entry = int(result["segment"]), result["entry"]
    if seg is None:
        return Segment.from_json(number, entry)
    merged = seg.to_json()
    for key, value in entry.items():
        if key == "files":
            merged["files"].update(value)
        else:
            merged[key] = value
    return Segment.from_json(number, merged)
