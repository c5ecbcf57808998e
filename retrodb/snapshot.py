"""Snapshots: immutable manifests and the CURRENT pointer.

A snapshot (version N) is `manifests/v-0000000N.json`: the live segments, the
files of each (path, size, sha256), their tombstones and the database config.
Committing writes manifest N+1 under a temporary name, fsyncs it, renames it
into place, then replaces CURRENT (same dance), so a reader that opens
CURRENT sees one whole snapshot whatever writers do meanwhile.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import faults
from .atomic import atomic_write_bytes
from .errors import CorruptDatabase, DatabaseNotFound

FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFESTS = "manifests"
SEGMENTS = "segments"


def manifest_name(version: int) -> str:
    return f"v-{version:08d}.json"


def segment_name(number: int) -> str:
    return f"seg-{number:06d}"


def segment_number(name: str) -> int:
    return int(name.removeprefix("seg-"))


@dataclass
class Snapshot:
    """One committed version of a database, as read from its manifest."""

    root: Path
    data: dict = field(repr=False)

    @property
    def version(self) -> int:
        return self.data["version"]

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def segments(self) -> dict[str, dict]:
        return self.data["segments"]

    @property
    def chunk_size(self) -> int:
        return self.config["chunk_size"]

    def path(self, record: dict) -> Path:
        return self.root / record["path"]

    def files(self) -> list[dict]:
        """Every file record this snapshot references."""
        return [rec for seg in self.segments.values() for rec in seg["files"].values()]

    def segment_files(self, kind: str) -> list[Path]:
        return [self.path(s["files"][kind]) for s in self.segments.values() if kind in s["files"]]

    def totals(self) -> dict:
        keys = ("documents", "chunks", "tokens", "deleted_documents", "deleted_chunks", "deleted_tokens")
        out = {k: sum(s.get(k, 0) for s in self.segments.values()) for k in keys}
        return {
            "documents": out["documents"] - out["deleted_documents"],
            "chunks": out["chunks"] - out["deleted_chunks"],
            "tokens": out["tokens"] - out["deleted_tokens"],
            "deleted_documents": out["deleted_documents"],
            "deleted_chunks": out["deleted_chunks"],
        }

    def derive(self, command: str) -> dict:
        """A deep copy of this manifest, ready to be edited into the next version."""
        data = copy.deepcopy(self.data)
        data["parent"] = self.version
        data["version"] = self.version + 1
        data["command"] = command
        return data


def read_manifest(root: Path, version: int) -> Snapshot:
    """The committed snapshot `version` (a manifest above CURRENT's was never committed: refused)."""
    path = root / MANIFESTS / manifest_name(version)
    if version > current_version(root):
        raise DatabaseNotFound(
            f"snapshot {version} of {root} was never committed (the current one is v{current_version(root)})",
            hint=f"list the committed snapshots with: retrodb log {root}")
    return Snapshot(root, load_manifest(path))


def load_manifest(path: Path) -> dict:
    """A manifest file's content, checked against schemas/manifest.json (CorruptDatabase if it does not fit)."""
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
    """Every manifest on disk, committed or not (writers clean the uncommitted ones)."""
    out = []
    for p in (root / MANIFESTS).glob("v-*.json"):
        m = _CURRENT_NAME.fullmatch(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def retained_versions(root: Path, current: int | None = None) -> list[int]:
    """The committed snapshots still on disk (a manifest above CURRENT's is an interrupted commit's)."""
    current = current_version(root) if current is None else current
    return [v for v in manifest_versions(root) if v <= current]


def write_snapshot(root: Path, data: dict) -> Snapshot:
    """Commit: manifest first, then the CURRENT pointer. Caller holds the writer lock."""
    data = dict(data)
    data["format_version"] = FORMAT_VERSION
    data["created"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    name = manifest_name(data["version"])
    faults.point("commit.before_manifest")
    atomic_write_bytes(root / MANIFESTS / name, json.dumps(data, indent=1, sort_keys=True).encode())
    faults.point("commit.before_current")
    atomic_write_bytes(root / CURRENT, (name + "\n").encode())
    faults.point("commit.after_current")
    return Snapshot(root, data)
