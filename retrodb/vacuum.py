"""`retrodb vacuum`: delete the snapshots no longer retained, then every file no retained snapshot references.

Retention. The current snapshot is always kept. By default (`retain=1`)
nothing older is, except within the reader grace period: a snapshot that
stopped being current less than `grace` ago (default 10 minutes) is kept, so
that a reader which opened it a moment ago (a query, `sql`, `stats --at`)
can finish. `retain=N` keeps the N newest snapshots; `older_than` keeps
every snapshot that was still current within that duration (e.g. `7d`). Given
both, a snapshot is kept if either keeps it. Redaction passes `grace=0`.

What is garbage is found by difference, reading what is removed, not
everything retained: the group manifests, id runs and index shards the
removed roots reference and no kept root does, and, in those groups, the
segment files that the kept roots' groups covering the same segment numbers
do not reference. A vacuum that removes one superseded snapshot of a commit
that changed one group reads that group and its successor, whatever the size
of the database. `full` also walks every directory for files no retained
snapshot references (strays that no journal names; `verify` lists them).

Crash safety. The plan is written first (`_work/vacuum/plan.json`), then the
removed manifests go (fsynced), then their files. A kill at any point leaves
the plan, which no other command removes and the next vacuum finishes before
anything else; a retained snapshot never loses a file.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import faults
from . import snapshot as snap
from .atomic import TMP_PREFIX, atomic_write_bytes, fsync_dir
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
            created[v] = datetime.fromisoformat(snap.read_manifest(root, v).created).timestamp()
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
                grace: float = DEFAULT_GRACE, now: float | None = None, full: bool = False) -> VacuumPlan:
    root = Path(root)
    current, keep, by_grace = retained_versions(root, retain, older_than, grace, now)
    removed = [v for v in snap.retained_versions(root, current) if v not in keep and v < current]
    manifests = [(f"{snap.MANIFESTS}/{snap.manifest_name(v)}",
                  (root / snap.MANIFESTS / snap.manifest_name(v)).stat().st_size) for v in removed]
    kept = [snap.read_manifest(root, v) for v in keep]
    gone = [s for v in removed if (s := _readable(root, v)) is not None]  # an unreadable one names nothing
    files, directories = garbage(root, kept, gone, full)
    return VacuumPlan(current, keep, removed, manifests, sorted(files.items()), sorted(directories), by_grace, grace)


def _readable(root: Path, version: int):
    try:
        return snap.read_manifest(root, version)
    except RetrodbError:
        return None


def garbage(root: Path, kept: list, gone: list, full: bool = False) -> tuple[dict[str, int], set[str]]:
    """The files ({relative path: bytes}) and directories that the snapshots `gone` reference and the snapshots
    `kept` do not (see the module doc); with `full`, also every file under the data directories that no kept
    snapshot references."""
    files: dict[str, int] = {}
    directories: set[str] = set()
    kept_meta = {r["path"] for k in kept for r in k.metadata_records()}
    kept_groups = {(r.path, r.removed) for k in kept for r in k.group_refs}  # a group as a kept snapshot sees it
    kept_units = {u["name"] for k in kept for u in k.index_units}
    for s in gone:
        for rec in s.metadata_records():
            if rec["path"] not in kept_meta:
                files[rec["path"]] = int(rec["bytes"])
        for i, ref in enumerate(s.group_refs):
            if ref.path is not None and (ref.path, ref.removed) in kept_groups:
                continue  # shared with a kept snapshot: its segments are kept as they are
            for number, seg in s.group(i).items():
                keeping = [k.segment(number) for k in kept]
                referenced = {r["path"] for other in keeping if other is not None for r in other.files.values()}
                for rec in seg.files.values():
                    if rec["path"] not in referenced:
                        files[rec["path"]] = int(rec["bytes"])
                if all(other is None for other in keeping):
                    directories.add(f"{snap.SEGMENTS}/{seg.name}")
        for u in s.index_units:
            if u["kind"] == "shard" and u["name"] not in kept_units:
                directories.add(f"indexes/{u['name']}")
    if full:
        referenced = {r["path"] for k in kept for r in k.all_records()}
        for top in (snap.SEGMENTS, "indexes", "ids", snap.GROUPS):
            for p in sorted((root / top).rglob("*")) if (root / top).exists() else []:
                rel = p.relative_to(root).as_posix()
                if p.is_file() and rel not in referenced and not p.name.startswith(TMP_PREFIX):
                    files.setdefault(rel, p.stat().st_size)
        for top in (snap.SEGMENTS, "indexes"):
            for d in sorted((root / top).iterdir()) if (root / top).exists() else []:
                rel = d.relative_to(root).as_posix()
                if d.is_dir() and not any(r.startswith(rel + "/") for r in referenced):
                    directories.add(rel)
    return files, directories


PLAN_JOB = "vacuum"


def finish_pending(root: Path) -> VacuumReport | None:
    """Finish the plan of a vacuum that was killed (the caller holds the writer lock)."""
    work = Path(root) / "_work" / PLAN_JOB
    plan = _read_plan(work)
    if plan is None:
        return None
    report = VacuumReport(plan, False)
    _execute(Path(root), plan, report)
    shutil.rmtree(work, ignore_errors=True)
    return report


def vacuum(root: str | Path, retain: int | None = None, older_than: float | str | None = None,
           grace: float | str = DEFAULT_GRACE, *, dry_run: bool = False, full: bool = False,
           wait: float = 0.0) -> VacuumReport:
    """Delete what no retained snapshot needs (see the module doc); `dry_run` only plans; `full` also removes
    stray files no snapshot references (a walk of every directory)."""
    started = time.perf_counter()
    if isinstance(older_than, str):
        older_than = parse_duration(older_than)
    if isinstance(grace, str):
        grace = parse_duration(grace)
    db = Database(root)
    if dry_run:
        report = VacuumReport(plan_vacuum(db.root, retain, older_than, grace, full=full), True)
        report.seconds = time.perf_counter() - started
        return report
    with db.writer("vacuum", wait=wait, keep_job=PLAN_JOB) as w:  # cleans leftovers of interrupted commands first
        finish_pending(db.root)  # a vacuum that was killed: finish it first (it was decided on safely)
        work = w.work_dir(PLAN_JOB)
        plan = plan_vacuum(db.root, retain, older_than, grace, full=full)
        report = VacuumReport(plan, False)
        atomic_write_bytes(work / "plan.json", json.dumps({
            "base_version": w.base.version, "plan": {**plan.__dict__, "manifests": plan.manifests,
                                                     "files": plan.files}}).encode())
        _execute(db.root, plan, report)
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    return report


def _read_plan(work: Path) -> VacuumPlan | None:
    try:
        data = json.loads((work / "plan.json").read_text())["plan"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
    data["manifests"] = [tuple(m) for m in data["manifests"]]
    data["files"] = [tuple(f) for f in data["files"]]
    return VacuumPlan(**data)


def _execute(root: Path, plan: VacuumPlan, report: VacuumReport) -> None:
    for rel, size in plan.manifests:
        path = root / rel
        if path.exists():
            path.unlink()
            report.bytes_freed += size
            report.files_removed += 1
    if plan.manifests:
        fsync_dir(root / snap.MANIFESTS)
    faults.point("vacuum.manifests_removed")
    for rel, size in plan.files:
        path = root / rel
        if path.exists():
            path.unlink()
            report.bytes_freed += size
            report.files_removed += 1
        faults.point("vacuum.file_removed")
    for rel in plan.directories:
        shutil.rmtree(root / rel, ignore_errors=True)
    for parent in {Path(rel).parent for rel in plan.directories}:
        fsync_dir(root / parent)
