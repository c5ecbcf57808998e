"""`retrodb vacuum`: delete the snapshots no longer retained, then every file no retained snapshot references.

Retention. The current snapshot is always kept. By default (`retain=1`)
nothing older is, except within the reader grace period: a snapshot that
stopped being current less than `grace` ago (default 10 minutes) is kept, so
that a reader which opened it a moment ago (a query, `sql`, `stats --at`)
can finish. `retain=N` keeps the N newest snapshots; `older_than` keeps
every snapshot that was still current within that duration (e.g. `7d`). Given
both, a snapshot is kept if either keeps it. Redaction passes `grace=0`.

Crash safety. The removed manifests go first (fsynced), then their files:
a kill in between leaves only unreferenced files, which `verify` lists as
warnings and the next vacuum deletes; a retained snapshot never loses a file.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import faults
from . import snapshot as snap
from .atomic import fsync_dir
from .database import Database
from .errors import RetrodbError, UsageError

DEFAULT_GRACE = 600.0  # seconds a superseded snapshot stays readable for readers that opened it
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '7d', '2w' (or a sum like '1d12h') -> seconds; a bare number is seconds ('0')."""
    if re.fullmatch(r"\s*\d+(\.\d+)?\s*", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip().lower())
    if not parts or re.sub(r"\s", "", text.lower()) != "".join(n + u for n, u in parts):
        raise UsageError(f"bad duration {text!r}", hint="use a number and a unit s, m, h, d or w: 90s, 12h, 7d (a bare number is seconds)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class VacuumPlan:
    current: int
    retained: list[int]
    removed_versions: list[int]
    manifests: list[tuple[str, int]]  # (relative path, bytes) of the manifests to delete
    files: list[tuple[str, int]]  # (relative path, bytes) of the segment files to delete
    directories: list[str] = field(default_factory=list)  # segment directories left empty
    kept_by_grace: list[int] = field(default_factory=list)  # superseded snapshots kept only because of --grace
    grace: float = DEFAULT_GRACE

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.manifests + self.files)

    def to_dict(self, max_files: int = 1000) -> dict:
        return {"current": self.current, "retained": self.retained, "removed_versions": self.removed_versions,
                "kept_by_grace": self.kept_by_grace,
                "files": len(self.manifests) + len(self.files), "bytes": self.bytes,
                "directories": len(self.directories), "paths": [p for p, _ in self.files[:max_files]]}


@dataclass
class VacuumReport:
    plan: VacuumPlan
    dry_run: bool
    bytes_freed: int = 0
    files_removed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "dry_run": self.dry_run, "bytes_freed": self.bytes_freed,
                "files_removed": self.files_removed, "seconds": round(self.seconds, 3)}


def retained_versions(root: Path, retain: int | None = None, older_than: float | None = None,
                      grace: float = DEFAULT_GRACE, now: float | None = None) -> tuple[int, list[int], list[int]]:
    """(current version, the committed versions to keep, those kept only by the grace period), per the rules
    in the module doc."""
    if retain is not None and retain < 1:
        raise UsageError("--retain must be at least 1 (the current snapshot is always kept)")
    if retain is None and older_than is None:
        retain = 1
    now = time.time() if now is None else now
    current = snap.current_version(root)
    versions = snap.retained_versions(root, current)
    created = {}
    for v in versions:
        try:
            created[v] = datetime.fromisoformat(snap.read_manifest(root, v).data["created"]).timestamp()
        except RetrodbError:
            created[v] = None  # unreadable: not kept (nothing can open it)
    keep = {current}
    if retain:
        keep.update(versions[-retain:])
    by_grace = set()
    for i, v in enumerate(versions[:-1]):
        # when v stopped being current: the next snapshot's commit (or a later one's, if that one is gone)
        superseded = next((created[w] for w in versions[i + 1:] if created[w] is not None), now)
        age = now - superseded
        if older_than is not None and age < older_than:
            keep.add(v)
        elif age < grace and v not in keep:
            keep.add(v)
            by_grace.add(v)
    kept = sorted(k for k in keep if created.get(k) is not None or k == current)
    return current, kept, sorted(by_grace & set(kept))


def plan_vacuum(root: str | Path, retain: int | None = None, older_than: float | None = None,
                grace: float = DEFAULT_GRACE, now: float | None = None) -> VacuumPlan:
    root = Path(root)
    current, keep, by_grace = retained_versions(root, retain, older_than, grace, now)
    referenced: set[str] = set()
    for v in keep:
        referenced.update(rec["path"] for rec in snap.read_manifest(root, v).files())
    removed = [v for v in snap.retained_versions(root, current) if v not in keep and v < current]
    manifests = [(f"{snap.MANIFESTS}/{snap.manifest_name(v)}",
                  (root / snap.MANIFESTS / snap.manifest_name(v)).stat().st_size) for v in removed]
    files: list[tuple[str, int]] = []
    directories = []
    seg_root = root / snap.SEGMENTS
    for d in sorted(seg_root.iterdir()) if seg_root.exists() else []:
        if not d.is_dir():
            continue
        stray = [p for p in sorted(d.iterdir()) if p.is_file() and p.relative_to(root).as_posix() not in referenced]
        files.extend((p.relative_to(root).as_posix(), p.stat().st_size) for p in stray)
        if len(stray) == sum(1 for _ in d.iterdir()):
            directories.append(d.relative_to(root).as_posix())
    return VacuumPlan(current, keep, removed, manifests, files, directories, by_grace, grace)


def vacuum(root: str | Path, retain: int | None = None, older_than: float | str | None = None,
           grace: float | str = DEFAULT_GRACE, *, dry_run: bool = False, wait: float = 0.0) -> VacuumReport:
    """Delete what no retained snapshot needs (see the module doc); `dry_run` only plans."""
    started = time.perf_counter()
    if isinstance(older_than, str):
        older_than = parse_duration(older_than)
    if isinstance(grace, str):
        grace = parse_duration(grace)
    db = Database(root)
    if dry_run:
        report = VacuumReport(plan_vacuum(db.root, retain, older_than, grace), True)
        report.seconds = time.perf_counter() - started
        return report
    with db.writer("vacuum", wait=wait):  # cleans leftovers of interrupted commands first
        plan = plan_vacuum(db.root, retain, older_than, grace)
        report = VacuumReport(plan, False)
        for rel, size in plan.manifests:
            (db.root / rel).unlink(missing_ok=True)
            report.bytes_freed += size
            report.files_removed += 1
        if plan.manifests:
            fsync_dir(db.root / snap.MANIFESTS)
        faults.point("vacuum.manifests_removed")
        for rel, size in plan.files:
            (db.root / rel).unlink(missing_ok=True)
            report.bytes_freed += size
            report.files_removed += 1
            faults.point("vacuum.file_removed")
        for rel in plan.directories:
            shutil.rmtree(db.root / rel, ignore_errors=True)
        if plan.directories:
            fsync_dir(db.root / snap.SEGMENTS)
    report.seconds = time.perf_counter() - started
    return report
