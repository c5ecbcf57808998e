"""Snapshots: immutable manifests and the CURRENT pointer.

A snapshot (version N) is `manifests/v-0000000N.json`: the live segments, the
files of each (path, size, sha256), their tombstones and the database config.
Committing writes manifest N+1 under a temporary name, fsyncs it, renames it
into place, then replaces CURRENT (same dance), so a reader that opens
CURRENT sees one whole snapshot whatever writers do meanwhile.
"""

from __future__ import annotations

import copy
import json
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
    path = root / MANIFESTS / manifest_name(version)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatabaseNotFound(
            f"snapshot {version} of {root} is not retained (no {path.name})",
            hint=f"list the retained snapshots with: retrodb log {root}",
        ) from None
    except json.JSONDecodeError as exc:
        raise CorruptDatabase(f"manifest {path} is not valid JSON: {exc}") from None
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptDatabase(
            f"{root} was written by a newer retrodb (format {data['format_version']})",
            hint="upgrade retrodb",
        )
    return Snapshot(root, data)


def current_version(root: Path) -> int:
    try:
        name = (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        hint = f"create it with: retrodb init {root}  (or retrodb ingest {root} SOURCE...)"
        raise DatabaseNotFound(f"no retrodb database at {root}", hint=hint) from None
    return int(name.removeprefix("v-").removesuffix(".json"))


def read_current(root: Path) -> Snapshot:
    return read_manifest(root, current_version(root))


def retained_versions(root: Path) -> list[int]:
    out = []
    for p in (root / MANIFESTS).glob("v-*.json"):
        try:
            out.append(int(p.name[2:-5]))
        except ValueError:
            continue
    return sorted(out)


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
