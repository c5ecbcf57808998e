"""A database directory: open a snapshot to read, or take the writer lock to commit.

Layout (see docs/design.md):
  CURRENT                      name of the current manifest
  manifests/v-NNNNNNNN.json    snapshots
  segments/seg-NNNNNN/         immutable segment files
  LOCK                         writer lock (flock) and who holds it
  _work/                       progress markers of unfinished jobs; never data
  audit.jsonl                  redaction audit log (append-only)
Temporary files are named `.tmp-*` and are removed by the next writer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import manifest
from . import snapshot as snap
from .atomic import TMP_PREFIX, atomic_write_bytes, make_dirs
from .errors import ConfigMismatch, CorruptDatabase, DatabaseNotFound, RetrodbError, UsageError
from .lock import WriterLock
from .manifest import ManifestEdit
from .snapshot import Snapshot

WORK = "_work"
JOURNAL = "journal.txt"  # per job: the files and directories it began to write
STICKY_JOBS = ("vacuum",)  # a killed vacuum's plan, which only the next vacuum finishes (retrodb/vacuum.py)
DEFAULT_CHUNK_SIZE = 64


def default_config(tokenizer_dir: str | Path | None, chunk_size: int) -> dict:
    from .schema import token_type_for
    from .tokenizer import default_lm_tokenizer_dir, tokenizer_info

    if chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1, not {chunk_size}")
    info = tokenizer_info(tokenizer_dir or default_lm_tokenizer_dir())
    return {
        "chunk_size": chunk_size,
        "tokenizer": {
            "path": info.path,
            "sha256": info.sha256,
            "vocab_size": info.vocab_size,
            "token_type": token_type_for(info.vocab_size),
        },
        "embedder": None,
        "index": None,
    }


class Database:
    """A handle on one snapshot of a database (the current one unless `at` is given)."""

    def __init__(self, root: str | Path, at: int | None = None):
        self.root = Path(root)
        self.snapshot: Snapshot = (
            snap.read_current(self.root) if at is None else snap.read_manifest(self.root, at)
        )

    # ------------------------------------------------------------ creation

    @classmethod
    def create(cls, root: str | Path, tokenizer: str | Path | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
               exist_ok: bool = False, wait: float = 0.0) -> "Database":
        """Create an empty database at `root` (v0). The directory is checked under the writer lock, so of two
        concurrent creators one creates and the other finds the database (`exist_ok`) or waits (`wait`)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise snap.not_a_database(root)
        if (root / snap.CURRENT).exists() and not exist_ok:
            raise RetrodbError(f"{root} is already a retrodb database", hint=f"inspect it with: retrodb stats {root}")
        config = default_config(tokenizer, chunk_size)
        make_dirs(root)
        with WriterLock(root, "init", wait=wait):
            if (root / snap.CURRENT).exists():
                if not exist_ok:
                    raise RetrodbError(f"{root} is already a retrodb database",
                                       hint=f"inspect it with: retrodb stats {root}")
            else:  # only what an interrupted create leaves may be there: LOCK, empty segments/, manifest v0
                leftovers = {snap.SEGMENTS: set(), snap.MANIFESTS: {snap.manifest_name(0)}}
                other = sorted(p.name for p in root.iterdir() if p.name != "LOCK" and (
                    p.name not in leftovers or not p.is_dir()
                    or any(not (q.name in leftovers[p.name] or q.name.startswith(TMP_PREFIX)) for q in p.iterdir())))
                if other:
                    raise RetrodbError(f"{root} exists and is not empty ({', '.join(other[:5])}); refusing to create a "
                                       "database there", hint="give a new or empty directory")
                make_dirs(root / snap.SEGMENTS)
                snap.write_root(root, {"version": 0, "parent": None, "command": "init", "config": config,
                                       "next_segment": 1, "pending": {}, "groups": None, "ids": [], "indexes": [],
                                       "totals": snap.combine(())})
        return cls(root)

    @classmethod
    def open_or_create(cls, root: str | Path, tokenizer=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       wait: float = 0.0) -> "Database":
        root = Path(root)
        if not (root / snap.CURRENT).exists():
            cls.create(root, tokenizer, chunk_size, exist_ok=True, wait=wait)
        db = cls(root)
        if tokenizer is not None:
            db.check_tokenizer(tokenizer)
        return db

    def check_tokenizer(self, tokenizer: str | Path) -> None:
        from .tokenizer import tokenizer_info

        info = tokenizer_info(tokenizer)
        have = self.snapshot.config["tokenizer"]
        if info.sha256 != have["sha256"]:
            raise ConfigMismatch(
                f"{self.root} was built with the tokenizer at {have['path']} (sha256 {have['sha256'][:12]}); "
                f"{info.path} is a different tokenizer (sha256 {info.sha256[:12]})",
                hint="leave out --tokenizer, or build a new database for the other tokenizer",
            )

    # ------------------------------------------------------------ reading

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def config(self) -> dict:
        return self.snapshot.config

    def log(self) -> list[dict]:
        """Every retained committed snapshot, oldest first (an interrupted commit's manifest is not one), and the
        snapshots redactions purged (version, time, command, `purged`: True; no content)."""
        from .redact import purged_versions

        out = []
        seen = set(snap.retained_versions(self.root))
        for p in purged_versions(self.root):
            if p.get("version") not in seen:
                seen.add(p.get("version"))
                out.append({"version": p["version"], "created": p.get("created"), "command": p.get("command"),
                            "purged": True, "purged_by": p.get("purged_by"), "purged_at": p.get("purged_at"),
                            "current": False})
        for v in snap.retained_versions(self.root):
            try:
                s = snap.read_manifest(self.root, v)
            except RetrodbError:
                continue
            out.append({"version": v, "created": s.created, "command": s.command,
                        **{k: s.totals()[k] for k in ("documents", "chunks", "tokens")},
                        "segments": len(s.segments), "current": v == self.current_version()})
        return sorted(out, key=lambda r: r["version"])

    def current_version(self) -> int:
        return snap.current_version(self.root)

    def refresh(self) -> "Database":
        """Move this handle to the current snapshot (a long-lived reader sees later commits). What the handle's
        queries loaded stays cached for the files the new snapshot still uses, and only for those."""
        self.snapshot = snap.read_current(self.root)
        return self

    def stats(self, segments: bool = False) -> dict:
        """Counts and bytes of this snapshot, from its root (no group manifest is read); `segments` adds one
        row per segment (`per_segment`), which reads every group."""
        s = self.snapshot
        t = s.totals_summary
        totals = s.totals()
        out = {
            "path": str(self.root),
            "version": s.version,
            "documents": totals["documents"],
            "chunks": totals["chunks"],
            "tokens": totals["tokens"],
            "deleted_documents": totals["deleted_documents"],
            "deleted_chunks": totals["deleted_chunks"],
            "segments": t["segments"],
            "bytes": t["bytes"],
            "index_units": len(s.index_units),
            "chunk_size": s.chunk_size,
            "tokenizer": s.config["tokenizer"]["path"],
            "embedder": (s.config.get("embedder") or {}).get("path"),
            "neighbours": _neighbours_status(s),
        }
        if segments:
            out["per_segment"] = [{
                "segment": seg.name,
                "documents": seg.live_documents,
                "chunks": seg.live_chunks,
                "tokens": seg.live_tokens,
                "deleted_chunks": seg.deleted_chunks,
                "bytes": seg.bytes,
                "files": sorted(seg.files),
            } for seg in s.segments.values()]
        return out

    def sql(self, query: str):
        """Run one read-only DuckDB query over this snapshot's `documents`, `chunks` and `segments` views; returns
        a pyarrow Table. The connection reads only this snapshot's files (see `retrodb.sql`)."""
        import duckdb

        from .sql import run_query

        if not query.strip():
            raise UsageError("empty SQL query", hint=f'retrodb sql {self.root} "SELECT count(*) FROM documents"')
        try:
            return run_query(self.snapshot, query)
        except duckdb.IOException:
            self.check_files_present()
            raise

    def check_files_present(self) -> None:
        """Raise a clear error if a file of this snapshot is gone (vacuumed while it was being read)."""
        for rec in self.snapshot.all_records():
            if not self.snapshot.path(rec).exists():
                raise DatabaseNotFound(
                    f"snapshot v{self.version} of {self.root} was vacuumed while it was being read "
                    f"({rec['path']} is gone)",
                    hint=f"reopen the database (current: v{self.current_version()}); vacuum keeps superseded "
                         "snapshots for --grace (default 10m) so that readers can finish")

    def query(self, texts: "str | list[str] | None" = None, k: int = 4, *, ef: int = 64, exact: bool = False,
              exclude_doc: "str | list[str] | None" = None, chunk_ids: "list[int] | None" = None,
              exclude_same_doc: bool = True, vectors=None, threads: int | None = None, device: str = "auto",
              on_warning=None, overlap: bool = False) -> list:
        """Nearest chunks of each query, best first: a list of `retrodb.query.QueryResult`, one per query.

        Give query `texts` (embedded with the database's embedder), or `chunk_ids` of chunks already in the
        database (their stored keys; their own document is left out unless `exclude_same_doc=False`), or
        raw `vectors` [n, dim]. `k` neighbours per query; `ef` is the HNSW search breadth (at least k is
        used); `exact` searches every key by brute force; `exclude_doc` leaves out those documents.
        Read-only (no lock); loaded indexes stay cached in this handle for the next query.
        `on_warning(message)` receives what was worked around (default: Python warnings).
        `overlap` also gives each neighbour `r` and `overlap`: the longest token run it shares with the query
        (or the chunk), and where (see `retrodb.query.with_overlap`).
        """
        from .query import searcher_for

        searcher = searcher_for(self, threads=threads, device=device)
        return searcher.query(texts, k, ef=ef, exact=exact, exclude_doc=exclude_doc, chunk_ids=chunk_ids,
                              exclude_same_doc=exclude_same_doc, vectors=vectors, on_warning=on_warning,
                              overlap=overlap)

    def nearest(self, texts: "str | list[str]", k: int = 4, *, ef: int = 64, exact: bool = False,
                exclude_doc: "str | list[str] | None" = None, device: str = "auto", on_warning=None) -> list:
        """The k nearest chunks of each query text as (chunk_id, score, segment), best first, reading no text:
        `query` without its payload (the model's live retrieval reads stored tokens by id instead)."""
        from .query import searcher_for

        return searcher_for(self, device=device).nearest(texts, k, ef=ef, exact=exact, exclude_doc=exclude_doc,
                                                          on_warning=on_warning)

    # ------------------------------------------------------------ writing

    @contextmanager
    def writer(self, command: str, wait: float = 0.0, keep_job: str | None = None) -> Iterator["Writer"]:
        """Hold the writer lock, clean leftovers of interrupted commands, and commit through the yielded Writer."""
        try:
            with WriterLock(self.root, command, wait=wait) as lock:
                w = Writer(self, command, lock)
                w.cleanup(keep_job)
                yield w
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # disk full, permission denied, read-only, ...
                raise write_failed(exc, self.root, command) from exc
            damaged = undecodable(exc, self.root, command)
            if damaged is None:
                raise
            raise damaged from exc
        self.snapshot = snap.read_current(self.root)


class Writer:
    """The one process allowed to commit; `base` is the latest snapshot when the lock was taken."""

    def __init__(self, db: Database, command: str, lock: WriterLock):
        self.db = db
        self.root = db.root
        self.command = command
        self.lock = lock
        self.base = snap.read_current(self.root)

    def work_dir(self, job: str) -> Path:
        return make_dirs(self.root / WORK / job)

    def segment_dir(self, number: int) -> Path:
        return snap.segment_dir(self.root, number)

    def new_segment_dir(self, number: int, job: str | None = None) -> Path:
        """The directory of a segment this command is about to write, journaled first (see `track`)."""
        return self.track(self.segment_dir(number), job)

    def edit(self, command: str | None = None) -> ManifestEdit:
        """The next snapshot, to change and then `commit` (see retrodb/manifest.py)."""
        return ManifestEdit(self.base, command or self.command)

    def cleanup(self, keep_job: str | None = None) -> list[str]:
        """Remove what interrupted commands left, from their journals (no directory is walked): the files and
        directories they began to write that the latest snapshot does not reference, the temporary files beside
        them, their work directories, and uncommitted root manifests.

        The job `keep_job` (when it was planned on the latest snapshot) is left alone, so it can resume.
        """
        removed: list[str] = []
        work = self.root / WORK
        if work.exists():
            for job in sorted(work.iterdir()):
                if job.name in STICKY_JOBS:
                    continue  # finished by the next run of its own command only
                plan = _read_json(job / "plan.json")
                if job.name == keep_job and plan and plan.get("base_version") == self.base.version:
                    removed.extend(self._undo_journal(job, keep=True))  # half-written files never resume
                    continue
                removed.extend(self._undo_journal(job))
                shutil.rmtree(job, ignore_errors=True)
                removed.append(str(job))
        for v in snap.manifest_versions(self.root):
            if v > self.base.version:
                (self.root / snap.MANIFESTS / snap.manifest_name(v)).unlink(missing_ok=True)
                removed.append(f"manifest v{v}")
        for directory in (self.root, self.root / snap.MANIFESTS):  # atomic writes of CURRENT, roots, audit files
            removed.extend(_remove_temporaries(directory, "*"))
        return removed

    def commit(self, edit: ManifestEdit) -> Snapshot:
        """Write `edit` (from `self.edit(...)`) as the next snapshot and make it current."""
        if edit.version != self.base.version + 1 or edit.base is not self.base:
            raise RetrodbError(f"internal: commit of version {edit.version} on top of {self.base.version}")
        self.base = manifest.commit(self.root, edit, self.track)
        self.db.snapshot = self.base
        shutil.rmtree(self.root / WORK / _tracking_job(self.base.version), ignore_errors=True)
        return self.base

    def track(self, path: Path, job: str | None = None) -> Path:
        """Journal `path`, a file or directory this command is about to create, in `_work/<job>/journal.txt`
        (job None: the next commit's journal), fsynced before it exists, so that if the command dies first the
        next writer removes it (and the temporary files beside it) unless a snapshot references it. A path that
        exists already is not journaled: it is not this command's to remove."""
        path = Path(path)
        if path.exists():
            return path
        directory = self.work_dir(job or _tracking_job(self.base.version + 1))
        fd = os.open(directory / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (path.relative_to(self.root).as_posix() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def _undo_journal(self, job: Path, keep: bool = False) -> list[str]:
        """Delete what an interrupted job journaled, unless the latest snapshot references it (or `keep`: the job
        resumes), and the temporary files beside it."""
        try:
            listed = (job / JOURNAL).read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return []
        removed = []
        for rel in dict.fromkeys(listed):
            path = self.root / rel
            if not rel or ".." in rel.split("/") or rel.startswith("/"):
                continue
            if keep or referenced(self.base, rel):
                if path.is_dir():
                    removed.extend(_remove_temporaries(path, "*"))
                else:
                    removed.extend(_remove_temporaries(path.parent, path.name))
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(rel)
            elif path.exists():
                path.unlink()
                removed.append(rel)
            parts = rel.split("/")
            if not (len(parts) == 2 and parts[0] in (snap.SEGMENTS, "indexes")):
                # (a segment or shard directory is made in place, never renamed from a temporary one: its
                # parent, which lists every segment, is not searched)
                removed.extend(_remove_temporaries(path.parent, path.name))
        return removed

    def write_json(self, path: Path, obj) -> None:
        atomic_write_bytes(path, json.dumps(obj).encode())


def referenced(snapshot: Snapshot, rel: str) -> bool:
    """Whether the path `rel` (relative to the database) is part of `snapshot`: a segment directory or file, a
    group manifest, an id run, an index shard or one of its files, or a committed root manifest."""
    parts = rel.split("/")
    try:
        if parts[0] == snap.SEGMENTS and len(parts) >= 2:
            number = snap.segment_number(parts[1])
            if number >= snapshot.next_segment:  # numbered after the snapshot: not in it (no group read)
                return False
            seg = snapshot.segment(number)
            if seg is None or len(parts) == 2:
                return seg is not None
            return any(r["path"] == rel for r in seg.files.values())
    except ValueError:
        return False
    if rel.startswith(snap.GROUPS + "/"):
        if (snapshot.list_record or {}).get("path") == rel:
            return True
        return any(r.path == rel for r in snapshot.group_refs)
    if parts[0] == snap.MANIFESTS and len(parts) == 2:
        m = re.fullmatch(r"v-(\d{8})\.json", parts[1])
        return bool(m) and int(m.group(1)) <= snapshot.version
    if parts[0] == "ids":
        return any(r["path"] == rel for r in snapshot.id_runs)
    if parts[0] == "indexes" and len(parts) >= 2:
        unit = next((u for u in snapshot.index_units if u["name"] == parts[1]), None)
        if unit is None or len(parts) == 2:
            return unit is not None
        return any(r and r["path"] == rel for r in unit["files"].values())
    return True  # not a kind of file a journal names: never removed


def _remove_temporaries(directory: Path, name: str) -> list[str]:
    """Temporary files of atomic writes (`.tmp-<id>-<name>`) in one directory."""
    out = []
    try:
        found = list(Path(directory).glob(f"{TMP_PREFIX}*-{name}" if name != "*" else f"{TMP_PREFIX}*"))
    except OSError:
        return out
    for tmp in found:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        out.append(str(tmp))
    return out


def _neighbours_status(snapshot: Snapshot) -> dict:
    from .neighbours import status

    return status(snapshot)


class WriteFailed(RetrodbError):
    """The operating system refused a write (disk full, permission denied): nothing half-done is visible."""


def write_failed(exc: OSError, root: Path, command: str) -> WriteFailed:
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    try:
        state = f"the database stays at its last commit, v{snap.current_version(root)}"
    except RetrodbError:
        state = "no database was created"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some disk space, then rerun the same command: it resumes where it stopped"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"check that you may write to {root} and everything in it"
    else:
        hint = "fix the cause, then rerun the same command: it resumes where it stopped"
    return WriteFailed(f"{command} stopped: {exc.strerror or exc}{where}; {state}", hint=hint)


def undecodable(exc: Exception, root: Path | None, command: str) -> CorruptDatabase | None:
    """A CorruptDatabase for a pyarrow or DuckDB failure to decode a database file (None for other errors),
    naming the file where the library's message does (and the database, from it, when `root` is None)."""
    import re

    library = type(exc).__module__.split(".")[0] in ("pyarrow", "duckdb", "_duckdb")
    if not library and not (isinstance(exc, OSError) and exc.errno is None):  # pyarrow raises bare OSErrors
        return None
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    m = re.search(r"(\S*?)/?(segments/seg-\d+/[\w.-]+\.(?:parquet|npy|hnsw))", text)  # not DuckDB's LINE context
    if root is None and m and m.group(1):
        root = Path(m.group(1))
    what = f"cannot read {m.group(2)}" if m else "a database file cannot be decoded"
    try:
        state = f"; the database stays at its last commit, v{snap.current_version(root)}" if root else ""
    except RetrodbError:
        state = ""
    return CorruptDatabase(f"{command} stopped: {what}: {text}{state}",
                           hint=f"run: retrodb verify {root or 'DB'}" + ("" if m else "  (it names the damaged file)"))


def _tracking_job(version: int) -> str:
    return f"commit-v{version:08d}"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def open(root: str | Path, at: int | None = None) -> Database:  # noqa: A001 - mirrors retrodb.open
    """Open the database at `root` (current snapshot, or version `at`)."""
    return Database(root, at)
