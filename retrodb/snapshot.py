"""Snapshots: a small root per version, over a group list and group manifests that later versions reuse.

A snapshot (version N) is `manifests/v-0000000N.json`, its **root**: config,
the totals of its segments (counts, bytes, what they lack), the pending
operations, the document-id runs (`retrodb/ids.py`), the searchable index
units (`retrodb/shards.py`), and a reference to its **group list**
(`manifests/groups/l-*.json`): one reference per **group manifest**
(`manifests/groups/g-*.json`), each describing the segments whose numbers
fall in its range (at most `manifest.GROUP_MAX`), with a summary of them so
that planning need not read them. Three levels, as Apache Iceberg's table
metadata, manifest lists and manifests: opening a snapshot and answering
stats or log reads the root alone, whatever the number of segments; finding a
segment reads the list and one group. A commit writes the groups it changed,
a new list (when a group changed) and a new root, and references every other
group as it is.

The manifest is a typed object: `Segment` (one segment's counts and files),
read through `Snapshot` and changed only through `manifest.ManifestEdit`
(see there). Databases written before the tree (format 1: one manifest that
lists every segment) are read as they are and upgraded by their next commit.

Committing writes every new group and list, the root under a temporary name,
fsyncs, renames it into place, then replaces CURRENT (same dance), so a reader
that opens CURRENT sees one whole snapshot whatever writers do meanwhile.
"""

from __future__ import annotations

import bisect
import difflib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from . import faults
from .atomic import atomic_write_bytes
from .errors import CorruptDatabase, DatabaseNotFound

FORMAT_VERSION = 2
CURRENT = "CURRENT"
MANIFESTS = "manifests"
GROUPS = "manifests/groups"
SEGMENTS = "segments"
_SEGMENT_NAME = re.compile(r"seg-(\d{6,})")


def manifest_name(version: int) -> str:
    return f"v-{version:08d}.json"


def segment_name(number: int) -> str:
    return f"seg-{number:06d}"


def segment_number(name: str) -> int:
    """The number of a segment name ('seg-000042' -> 42): the one place a name is parsed (names come back from
    SQL views, old manifests and users). ValueError for anything else."""
    m = _SEGMENT_NAME.fullmatch(str(name))
    if m is None:
        raise ValueError(f"not a segment name: {name!r}")
    return int(m.group(1))


def segment_dir(root: Path, number: int) -> Path:
    return Path(root) / SEGMENTS / segment_name(number)


# ---------------------------------------------------------------- one segment


@dataclass(frozen=True)
class Segment:
    """One live segment of a snapshot: its counts and files. Immutable: `ManifestEdit` makes changed copies.

    `files` maps a kind (documents, chunks, store, keys, index, tombstones, neighbours) to its record
    {"path": relative to the database, "bytes", "sha256"}. The JSON form (`to_json`) is the segment's entry in
    its group manifest, the same shape format 1 used.
    """

    number: int
    documents: int
    chunks: int
    tokens: int
    files: Mapping[str, dict] = field(default_factory=dict)
    deleted_documents: int = 0
    deleted_chunks: int = 0
    deleted_tokens: int = 0
    neighbours: dict | None = None  # stored neighbours' parameters and provenance (retrodb/neighbours.py)
    compacted_from: tuple[int, ...] = ()  # segments a compaction rewrote into this one
    origin_max: int | None = None  # the newest segment that wrote one of its chunks (compacted segments)
    shard: str | None = None  # the index shard holding its vectors, once merged (retrodb/shards.py)

    @property
    def name(self) -> str:
        return segment_name(self.number)

    @property
    def live_documents(self) -> int:
        return self.documents - self.deleted_documents

    @property
    def live_chunks(self) -> int:
        return self.chunks - self.deleted_chunks

    @property
    def live_tokens(self) -> int:
        return self.tokens - self.deleted_tokens

    @property
    def origin(self) -> int:
        """The newest segment number that wrote a chunk of this segment (itself, unless compacted)."""
        return self.number if self.origin_max is None else int(self.origin_max)

    @property
    def indexed(self) -> bool:
        """Searchable through an HNSW index: its own, or the shard it was merged into."""
        return "index" in self.files or self.shard is not None

    @property
    def bytes(self) -> int:
        return sum(int(rec["bytes"]) for rec in self.files.values())

    def has(self, kind: str) -> bool:
        return kind in self.files

    def path(self, root: Path, kind: str) -> Path:
        return Path(root) / self.files[kind]["path"]

    def changed(self, **changes) -> "Segment":
        return replace(self, **changes)

    def with_files(self, records: Mapping[str, dict] | None = None, drop: Iterable[str] = ()) -> "Segment":
        files = {k: v for k, v in self.files.items() if k not in set(drop)}
        files.update(records or {})
        return replace(self, files=files)

    def to_json(self) -> dict:
        out: dict = {"documents": self.documents, "chunks": self.chunks, "tokens": self.tokens,
                     "files": {k: dict(v) for k, v in sorted(self.files.items())}}
        for key in ("deleted_documents", "deleted_chunks", "deleted_tokens"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.neighbours is not None:
            out["neighbours"] = dict(self.neighbours)
        if self.compacted_from:
            out["compacted_from"] = [segment_name(n) for n in self.compacted_from]
        if self.origin_max is not None:
            out["origin_max"] = int(self.origin_max)
        if self.shard is not None:
            out["shard"] = self.shard
        return out

    @classmethod
    def from_json(cls, number: int, entry: dict) -> "Segment":
        return cls(number=int(number), documents=int(entry["documents"]), chunks=int(entry["chunks"]),
                   tokens=int(entry["tokens"]), files={k: dict(v) for k, v in entry.get("files", {}).items()},
                   deleted_documents=int(entry.get("deleted_documents", 0)),
                   deleted_chunks=int(entry.get("deleted_chunks", 0)),
                   deleted_tokens=int(entry.get("deleted_tokens", 0)),
                   neighbours=dict(entry["neighbours"]) if entry.get("neighbours") else None,
                   compacted_from=tuple(segment_number(n) for n in entry.get("compacted_from") or ()),
                   origin_max=int(entry["origin_max"]) if entry.get("origin_max") is not None else None,
                   shard=entry.get("shard"))


# ---------------------------------------------------------------- group summaries


def summarize(segments: Iterable[Segment]) -> dict:
    """What a root records of a group of segments, so that stats, log, planning and status need not load it."""
    s = {"segments": 0, "documents": 0, "chunks": 0, "tokens": 0, "deleted_documents": 0, "deleted_chunks": 0,
         "deleted_tokens": 0, "bytes": 0, "files": 0, "without_keys": 0, "without_keys_chunks": 0,
         "unindexed": 0, "unindexed_chunks": 0, "with_neighbours": 0, "neighbours_missing": 0,
         "neighbours_missing_chunks": 0, "compacted": 0, "origin_max": -1, "min_live": None,
         "max_deleted_ratio": 0.0, "watermarks": {}, "computed_at": []}
    computed = set()
    for seg in segments:
        s["segments"] += 1
        for key in ("documents", "chunks", "tokens", "deleted_documents", "deleted_chunks", "deleted_tokens"):
            s[key] += getattr(seg, key)
        s["bytes"] += seg.bytes
        s["files"] += len(seg.files)
        live = seg.live_chunks
        if "keys" not in seg.files:
            s["without_keys"] += 1
            s["without_keys_chunks"] += live
        elif not seg.indexed:
            s["unindexed"] += 1
            s["unindexed_chunks"] += live
        if "neighbours" in seg.files and seg.neighbours:
            s["with_neighbours"] += 1
            wm = str(int(seg.neighbours["watermark"]))
            s["watermarks"][wm] = s["watermarks"].get(wm, 0) + 1
            computed.add(int(seg.neighbours["computed_at"]))
        elif live > 0:
            s["neighbours_missing"] += 1
            s["neighbours_missing_chunks"] += live
        s["compacted"] += int(bool(seg.compacted_from))
        s["origin_max"] = max(s["origin_max"], seg.origin)
        s["min_live"] = live if s["min_live"] is None else min(s["min_live"], live)
        if seg.chunks:
            s["max_deleted_ratio"] = max(s["max_deleted_ratio"], seg.deleted_chunks / seg.chunks)
    s["computed_at"] = sorted(computed)
    return s


def combine(summaries: Iterable[dict]) -> dict:
    """The summary of several groups (the root's totals)."""
    out = summarize(())
    computed = set()
    for s in summaries:
        for key, value in s.items():
            if key in ("origin_max", "max_deleted_ratio"):
                out[key] = max(out[key], value)
            elif key == "min_live":
                if value is not None:
                    out[key] = value if out[key] is None else min(out[key], value)
            elif key == "watermarks":
                for wm, n in value.items():
                    out[key][wm] = out[key].get(wm, 0) + n
            elif key == "computed_at":
                computed.update(value)
            elif key in out:
                out[key] += value
    out["computed_at"] = sorted(computed)
    return out


# ---------------------------------------------------------------- group manifests


@dataclass(frozen=True)
class GroupRef:
    """A root's reference to one group manifest: the segments numbered from `lo` up to the next group's lo, less
    those in `removed` (segments a commit removed without rewriting the group: `manifest.REMOVED_MAX`)."""

    lo: int
    path: str | None  # relative; None for the one in-memory group of a format-1 manifest
    bytes: int
    sha256: str | None
    summary: dict  # of the group's live segments (the manifest's less `removed`)
    removed: tuple[int, ...] = ()

    def to_json(self) -> dict:
        out = {"lo": self.lo, "path": self.path, "bytes": self.bytes, "sha256": self.sha256, "summary": self.summary}
        if self.removed:
            out["removed"] = list(self.removed)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "GroupRef":
        return cls(int(d["lo"]), d["path"], int(d["bytes"]), d["sha256"], d["summary"],
                   tuple(int(n) for n in d.get("removed", ())))


_GROUP_CACHE: "OrderedDict[tuple, object]" = OrderedDict()  # parsed immutable metadata files, per process
_GROUP_CACHE_SIZE = 512
_CACHE_LOCK = threading.Lock()


def cached(key: tuple, load: Callable[[], object]):
    """`load()`, kept per process under `key` (what is cached here comes from files that never change once
    written: group manifests, group lists, id-run footers)."""
    with _CACHE_LOCK:
        hit = _GROUP_CACHE.get(key)
        if hit is not None:
            _GROUP_CACHE.move_to_end(key)
            return hit
    value = load()
    with _CACHE_LOCK:
        _GROUP_CACHE[key] = value
        while len(_GROUP_CACHE) > _GROUP_CACHE_SIZE:
            _GROUP_CACHE.popitem(last=False)
    return value


def load_group(root: Path, ref: GroupRef) -> dict[int, Segment]:
    """The live segments of a group manifest, by number: the file's (parsed once per process: group files never
    change) less the reference's `removed`."""
    parsed = cached((str(Path(root).resolve()), ref.path, ref.sha256), lambda: parse_group(
        _read_checked(root, {"path": ref.path, "bytes": ref.bytes}, "group manifest"), ref.path, root))
    if not ref.removed:
        return parsed
    gone = set(ref.removed)
    return {n: seg for n, seg in parsed.items() if n not in gone}


def clear_caches() -> None:
    """Forget the parsed group manifests, group lists and id-run footers of this process (benchmarks: a
    command timed as a fresh process would run it)."""
    with _CACHE_LOCK:
        _GROUP_CACHE.clear()


def _read_checked(root: Path, rec: dict, what: str) -> bytes:
    path = Path(root) / rec["path"]
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CorruptDatabase(f"{what} {rec['path']} is missing", hint=f"run: retrodb verify {root}") from None
    if len(raw) != rec["bytes"]:
        raise CorruptDatabase(f"{what} {rec['path']} has {len(raw):,} bytes, its root says {rec['bytes']:,}",
                              hint=f"run: retrodb verify {root}")
    return raw


def load_group_list(root: Path, rec: dict) -> list[GroupRef]:
    """The group references of a root's group list file (cached per process: list files never change)."""
    from .schema import group_list_problems

    def load() -> list[GroupRef]:
        data = _checked_json(_read_checked(root, rec, "group list"), f"group list {rec['path']}", root,
                             group_list_problems)
        return [GroupRef.from_json(g) for g in data["groups"]]

    return cached(("list", str(Path(root).resolve()), rec["path"], rec["sha256"]), load)


def _checked_json(raw: bytes, what: str, root: Path, problems_of: Callable[[object], list[str]]):
    """`raw` parsed as JSON and checked by `problems_of` (CorruptDatabase naming `what` if either fails)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptDatabase(f"{what} is not valid JSON: {exc}", hint=f"run: retrodb verify {root}") from None
    problems = problems_of(data)
    if problems:
        raise CorruptDatabase(f"{what} is damaged: {problems[0]}", hint=f"run: retrodb verify {root}")
    return data


def group_list_json(refs: list[GroupRef]) -> bytes:
    return json.dumps({"format_version": FORMAT_VERSION, "groups": [r.to_json() for r in refs]},
                      sort_keys=True, separators=(",", ":")).encode()


def parse_group(raw: bytes, where: str, root: Path) -> dict[int, Segment]:
    from .schema import group_problems

    data = _checked_json(raw, f"group manifest {where}", root, group_problems)
    return {segment_number(n): Segment.from_json(segment_number(n), e) for n, e in data["segments"].items()}


def group_json(lo: int, segments: Iterable[Segment]) -> bytes:
    body = {"format_version": FORMAT_VERSION, "lo": lo,
            "segments": {s.name: s.to_json() for s in sorted(segments, key=lambda s: s.number)}}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- a snapshot


class SegmentMap(Mapping):
    """The live segments of a snapshot by number (a name, 'seg-000042', is taken too), loaded group by group as
    they are asked for: `m[n]` and `n in m` read one group; iterating (numbers) reads them all."""

    def __init__(self, snapshot: "Snapshot"):
        self._s = snapshot

    @staticmethod
    def _number(key) -> int | None:
        if isinstance(key, int) and not isinstance(key, bool):
            return key
        try:
            return segment_number(key)
        except ValueError:
            return None

    def __getitem__(self, key) -> Segment:
        number = self._number(key)
        seg = None if number is None else self._s.segment(number)
        if seg is None:
            raise KeyError(key)
        return seg

    def __contains__(self, key) -> bool:
        number = self._number(key)
        return number is not None and self._s.segment(number) is not None

    def __iter__(self) -> Iterator[int]:
        for i in range(len(self._s.group_refs)):
            yield from sorted(self._s.group(i))

    def __len__(self) -> int:
        return int(self._s.totals_summary["segments"])

    def values(self):  # noqa: D102 - a Mapping's, group by group
        for i in range(len(self._s.group_refs)):
            group = self._s.group(i)
            for n in sorted(group):
                yield group[n]

    def items(self):  # noqa: D102
        for seg in self.values():
            yield seg.number, seg


class Snapshot:
    """One committed version of a database: its root, read at once; its group list and groups, when needed."""

    def __init__(self, root: Path, data: dict):
        self.root = Path(root)
        self.data = data  # the root manifest as stored (read it through the properties)
        self.format_version = int(data.get("format_version", 1))
        self._groups: dict[int, dict[int, Segment]] = {}
        self._refs: list[GroupRef] | None = None
        self._los: list[int] | None = None
        self.list_record: dict | None = None  # the group list file {path, bytes, sha256, count} (format 2)
        if self.format_version < 2:  # one in-memory group holds every segment; upgraded by the next commit
            segs = {segment_number(n): Segment.from_json(segment_number(n), e) for n, e in data["segments"].items()}
            self._groups[0] = segs
            self._refs = [GroupRef(0, None, 0, None, summarize(segs.values()))] if segs else []
            self.totals_summary = combine(r.summary for r in self._refs)
            self.id_runs: list[dict] = []
            self.index_units: list[dict] = _units_of_v1(segs.values())
        else:
            self.list_record = data.get("groups")
            if not self.list_record:
                self._refs = []
            self.totals_summary = data["totals"]
            self.id_runs = list(data.get("ids", []))
            self.index_units = list(data.get("indexes", []))
        self.segments = SegmentMap(self)

    @property
    def group_refs(self) -> list[GroupRef]:
        """The root's group list (read the first time it is needed: stats and log never need it)."""
        if self._refs is None:
            self._refs = load_group_list(self.root, self.list_record)
        return self._refs

    # -- the root
    @property
    def version(self) -> int:
        return int(self.data["version"])

    @property
    def parent(self) -> int | None:
        return self.data.get("parent")

    @property
    def created(self) -> str:
        return self.data["created"]

    @property
    def command(self) -> str:
        return self.data["command"]

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def next_segment(self) -> int:
        return int(self.data["next_segment"])

    @property
    def pending(self) -> dict:
        return self.data.get("pending") or {}

    @property
    def chunk_size(self) -> int:
        return self.config["chunk_size"]

    @property
    def ids_indexed(self) -> bool:
        """True when document ids are found through the id runs (format 2), not by reading every segment."""
        return self.format_version >= 2

    def totals(self) -> dict:
        s = self.totals_summary
        return {"documents": s["documents"] - s["deleted_documents"], "chunks": s["chunks"] - s["deleted_chunks"],
                "tokens": s["tokens"] - s["deleted_tokens"], "deleted_documents": s["deleted_documents"],
                "deleted_chunks": s["deleted_chunks"]}

    # -- groups and segments
    def group_index(self, number: int) -> int | None:
        """Which group holds (or would hold) segment `number`; None before the first group."""
        if self._los is None:
            self._los = [r.lo for r in self.group_refs]
        i = bisect.bisect_right(self._los, number) - 1
        return i if i >= 0 else None

    def group(self, i: int) -> dict[int, Segment]:
        if i not in self._groups:
            self._groups[i] = load_group(self.root, self.group_refs[i])
        return self._groups[i]

    def segment(self, number: int) -> Segment | None:
        i = self.group_index(int(number))
        return None if i is None else self.group(i).get(int(number))

    def segments_where(self, wanted: Callable[[dict], bool]) -> Iterator[Segment]:
        """The segments of the groups whose summary `wanted` accepts (the others are not read)."""
        for i, ref in enumerate(self.group_refs):
            if wanted(ref.summary):
                group = self.group(i)
                for n in sorted(group):
                    yield group[n]

    def path(self, record: dict) -> Path:
        return self.root / record["path"]

    def files(self) -> list[dict]:
        """Every segment file record this snapshot references (reads every group)."""
        return [rec for seg in self.segments.values() for rec in seg.files.values()]

    def segment_files(self, kind: str) -> list[Path]:
        return [seg.path(self.root, kind) for seg in self.segments.values() if kind in seg.files]

    def metadata_records(self) -> list[dict]:
        """Records of the files that describe the snapshot besides its root: its group list and group manifests,
        id runs, index shards' files (each {path, bytes, sha256})."""
        out = [{k: self.list_record[k] for k in ("path", "bytes", "sha256")}] if self.list_record else []
        out += [{"path": r.path, "bytes": r.bytes, "sha256": r.sha256} for r in self.group_refs if r.path]
        out += [{k: run[k] for k in ("path", "bytes", "sha256")} for run in self.id_runs]
        out += [rec for u in self.index_units if u.get("kind") == "shard" for rec in u["files"].values() if rec]
        return out

    def all_records(self) -> list[dict]:
        """Every file record of this snapshot: segment files and metadata (reads every group)."""
        return self.files() + self.metadata_records()


def _units_of_v1(segments: Iterable[Segment]) -> list[dict]:
    from .shards import segment_unit

    return [segment_unit(s) for s in sorted(segments, key=lambda s: s.number) if "index" in s.files]


# ---------------------------------------------------------------- reading roots


def read_manifest(root: Path, version: int) -> Snapshot:
    """The committed snapshot `version` (a manifest above CURRENT's was never committed: refused)."""
    path = Path(root) / MANIFESTS / manifest_name(version)
    if version > current_version(root):
        raise DatabaseNotFound(
            f"snapshot {version} of {root} was never committed (the current one is v{current_version(root)})",
            hint=f"list the committed snapshots with: retrodb log {root}")
    return Snapshot(Path(root), load_manifest(path))


def load_manifest(path: Path) -> dict:
    """A root manifest's content, checked against schemas/manifest.json (CorruptDatabase if it does not fit)."""
    from .schema import manifest_problems

    root = path.parent.parent
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DatabaseNotFound(
            f"snapshot {int(path.name[2:-5])} of {root} is not retained (no {path.name})",
            hint=f"list the retained snapshots with: retrodb log {root}",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptDatabase(f"manifest {path} is not valid JSON: {exc}", hint=f"run: retrodb verify {root}") from None
    if isinstance(data, dict) and isinstance(data.get("format_version"), int) and data["format_version"] > FORMAT_VERSION:
        raise CorruptDatabase(
            f"{root} was written by a newer retrodb (format {data['format_version']})",
            hint="upgrade retrodb",
        )
    problems = manifest_problems(data)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptDatabase(f"manifest {path} is damaged: {problems[0]}{more}", hint=f"run: retrodb verify {root}")
    return data


_CURRENT_NAME = re.compile(r"v-(\d{8})\.json")


def current_version(root: Path) -> int:
    """The version CURRENT names; a clear error if `root` is not a database or CURRENT is damaged."""
    root = Path(root)
    try:
        raw = (root / CURRENT).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise not_a_database(root) from None
    m = _CURRENT_NAME.fullmatch(raw.strip().decode("utf-8", "replace"))
    if m is None:
        what = "empty" if not raw.strip() else f"damaged (it holds {raw[:40]!r}, not a snapshot name)"
        raise CorruptDatabase(f"{root / CURRENT} is {what}", hint=f"run: retrodb verify {root}  "
                              "(it lists the snapshots that can still be read)")
    return int(m.group(1))


def not_a_database(root: Path) -> Exception:
    """The error for a path that holds no database: it does not exist (a typo?), is a file, or is a folder
    without CURRENT. Never suggests creating a database at a mistyped path."""
    if root.is_file():
        return DatabaseNotFound(f"{root} is a file, not a retrodb database (a database is a directory)",
                                hint="give the database directory")
    if root.is_dir():
        if (root / MANIFESTS).is_dir():
            return CorruptDatabase(f"{root} has snapshots but no CURRENT file",
                                   hint=f"run: retrodb verify {root}  (it lists the snapshots that can still be read)")
        return DatabaseNotFound(f"{root} is not a retrodb database (no CURRENT file)",
                                hint="give a database directory; retrodb init or retrodb ingest creates one")
    parent = root.parent if str(root.parent) else Path(".")
    try:
        siblings = [p.name for p in parent.iterdir() if (p / CURRENT).is_file()] if parent.is_dir() else []
    except OSError:
        siblings = []
    near = difflib.get_close_matches(root.name, siblings, n=1, cutoff=0.6)
    if near:
        hint = f"did you mean {parent / near[0]}?"
    else:
        hint = "check the path" + ("" if parent.is_dir() else f" ({parent} does not exist either)")
    return DatabaseNotFound(f"no retrodb database at {root}: no such directory", hint=hint)


def read_current(root: Path) -> Snapshot:
    version = current_version(root)
    try:
        return read_manifest(root, version)
    except DatabaseNotFound:
        raise CorruptDatabase(f"{Path(root) / CURRENT} names {manifest_name(version)}, which is missing",
                              hint=f"run: retrodb verify {root}  (it lists the snapshots that can still be read)"
                              ) from None


def manifest_versions(root: Path) -> list[int]:
    """Every root manifest on disk, committed or not (writers clean the uncommitted ones)."""
    out = []
    for p in (Path(root) / MANIFESTS).glob("v-*.json"):
        m = _CURRENT_NAME.fullmatch(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def retained_versions(root: Path, current: int | None = None) -> list[int]:
    """The committed snapshots still on disk (a manifest above CURRENT's is an interrupted commit's)."""
    current = current_version(root) if current is None else current
    return [v for v in manifest_versions(root) if v <= current]


def write_root(root: Path, data: dict) -> Snapshot:
    """Commit: the root manifest first, then the CURRENT pointer. The caller holds the writer lock and has
    written (and journaled) every file the root references."""
    data = dict(data)
    data["format_version"] = FORMAT_VERSION
    data["created"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    name = manifest_name(data["version"])
    faults.point("commit.before_manifest")
    atomic_write_bytes(Path(root) / MANIFESTS / name, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    faults.point("commit.before_current")
    atomic_write_bytes(Path(root) / CURRENT, (name + "\n").encode())
    faults.point("commit.after_current")
    return Snapshot(Path(root), data)
