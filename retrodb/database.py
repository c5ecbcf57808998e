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
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import snapshot as snap
from .atomic import TMP_PREFIX, atomic_write_bytes, make_dirs
from .errors import ConfigMismatch, CorruptDatabase, DatabaseNotFound, RetrodbError, UsageError
from .lock import WriterLock
from .snapshot import Snapshot

WORK = "_work"
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
                snap.write_snapshot(root, {
                    "version": 0, "parent": None, "command": "init", "config": config,
                    "next_segment": 1, "segments": {}, "pending": {},
                })
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
            out.append({"version": v, "created": s.data["created"], "command": s.data["command"],
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

    def stats(self) -> dict:
        s = self.snapshot
        totals = s.totals()
        per_segment = []
        for name, seg in sorted(s.segments.items()):
            per_segment.append({
                "segment": name,
                "documents": seg["documents"] - seg.get("deleted_documents", 0),
                "chunks": seg["chunks"] - seg.get("deleted_chunks", 0),
                "tokens": seg["tokens"] - seg.get("deleted_tokens", 0),
                "deleted_chunks": seg.get("deleted_chunks", 0),
                "bytes": sum(f["bytes"] for f in seg["files"].values()),
                "files": sorted(seg["files"]),
            })
        return {
            "path": str(self.root),
            "version": s.version,
            "documents": totals["documents"],
            "chunks": totals["chunks"],
            "tokens": totals["tokens"],
            "deleted_documents": totals["deleted_documents"],
            "deleted_chunks": totals["deleted_chunks"],
            "segments": len(s.segments),
            "bytes": sum(f["bytes"] for f in s.files()),
            "chunk_size": s.chunk_size,
            "tokenizer": s.config["tokenizer"]["path"],
            "embedder": (s.config.get("embedder") or {}).get("path"),
            "neighbours": _neighbours_status(s),
            "per_segment": per_segment,
        }

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
        for rec in self.snapshot.files():
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
        return self.root / snap.SEGMENTS / snap.segment_name(number)

    def cleanup(self, keep_job: str | None = None) -> list[str]:
        """Remove what interrupted commands left: temporary files, uncommitted manifests and segments, stale jobs.

        Files of the job `keep_job` (and the segments it claims) stay, so it can resume.
        """
        removed: list[str] = []
        kept_segments: set[int] = set()
        work = self.root / WORK
        if work.exists():
            for job in work.iterdir():
                plan = _read_json(job / "plan.json")
                if job.name == keep_job and plan and plan.get("base_version") == self.base.version:
                    kept_segments.update(plan.get("segments", []))
                    continue
                removed.extend(self._remove_tracked(job))
                shutil.rmtree(job, ignore_errors=True)
                removed.append(str(job))
        for v in snap.manifest_versions(self.root):
            if v > self.base.version:
                (self.root / snap.MANIFESTS / snap.manifest_name(v)).unlink(missing_ok=True)
                removed.append(f"manifest v{v}")
        seg_root = self.root / snap.SEGMENTS
        for d in seg_root.iterdir() if seg_root.exists() else []:
            try:
                number = int(d.name.removeprefix("seg-"))
            except ValueError:
                continue
            if number >= self.base.data["next_segment"] and number not in kept_segments:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
        for tmp in self.root.rglob(f"{TMP_PREFIX}*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(str(tmp))
        return removed

    def commit(self, data: dict) -> Snapshot:
        """Write `data` (from `self.base.derive(...)`) as the next snapshot and make it current."""
        if data["version"] != self.base.version + 1:
            raise RetrodbError(f"internal: commit of version {data['version']} on top of {self.base.version}")
        self.base = snap.write_snapshot(self.root, data)
        self.db.snapshot = self.base
        shutil.rmtree(self.root / WORK / _tracking_job(self.base.version), ignore_errors=True)
        return self.base

    def track(self, path: Path) -> Path:
        """Note that `path`, a new file in an already committed segment's directory, is about to be written
        for the next commit, so that `cleanup` removes it if this process dies before committing it."""
        job = self.work_dir(_tracking_job(self.base.version + 1))
        fd = os.open(job / "files.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (path.relative_to(self.root).as_posix() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def _remove_tracked(self, job: Path) -> list[str]:
        """Delete the files an interrupted job tracked, unless the latest snapshot references them."""
        try:
            listed = (job / "files.txt").read_text().splitlines()
        except FileNotFoundError:
            return []
        referenced = {rec["path"] for rec in self.base.files()}
        removed = []
        for rel in listed:
            if rel and rel not in referenced and (self.root / rel).exists():
                (self.root / rel).unlink()
                removed.append(rel)
        return removed

    def write_json(self, path: Path, obj) -> None:
        atomic_write_bytes(path, json.dumps(obj).encode())


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
