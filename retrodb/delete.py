"""`retrodb delete`: tombstone documents, in one commit.

Destructive, so it plans first: `plan_delete` resolves the targets (ids, an
ids file or a SQL condition over `documents`) against a snapshot, without
the lock, and says how many documents, chunks and tokens in which segments.
`delete` then takes the writer lock, re-resolves against the latest snapshot
(refusing if the database changed what the plan covers), writes one new
tombstones file per touched segment and commits. Nothing is removed from
disk: `compact` drops the rows, `vacuum` the old files.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import tombstones
from .database import Database
from .errors import BadOption, RetrodbError, UsageError
from .snapshot import Snapshot

PLAN_COLUMNS = "segment, doc_id, first_chunk_id, num_chunks, num_tokens"


@dataclass
class DeletePlan:
    version: int  # snapshot the plan was resolved on
    documents: list[dict]  # segment, doc_id, first_chunk_id, num_chunks, num_tokens
    unknown: list[str] = field(default_factory=list)  # requested ids matching no document at all
    already_deleted: list[str] = field(default_factory=list)  # requested ids deleted by an earlier commit
    requested: int = 0  # ids asked for (0 for --where)

    @property
    def chunks(self) -> int:
        return sum(d["num_chunks"] for d in self.documents)

    @property
    def tokens(self) -> int:
        return sum(d["num_tokens"] for d in self.documents)

    def per_segment(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for d in self.documents:
            s = out.setdefault(d["segment"], {"documents": 0, "chunks": 0, "tokens": 0})
            s["documents"] += 1
            s["chunks"] += d["num_chunks"]
            s["tokens"] += d["num_tokens"]
        return dict(sorted(out.items()))

    def to_dict(self, max_ids: int = 1000) -> dict:
        return {
            "version": self.version, "documents": len(self.documents), "chunks": self.chunks, "tokens": self.tokens,
            "segments": self.per_segment(), "unknown": self.unknown[:max_ids], "unknown_count": len(self.unknown),
            "already_deleted": self.already_deleted[:max_ids], "already_deleted_count": len(self.already_deleted),
            "doc_ids": [d["doc_id"] for d in self.documents[:max_ids]],
        }


@dataclass
class DeleteReport:
    version: int
    documents: int
    chunks: int
    tokens: int
    segments: list[str]
    unknown: list[str]
    seconds: float
    doc_ids: list[str] = field(default_factory=list)  # the documents this commit deleted

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["unknown_count"] = len(self.unknown)
        d["unknown"] = self.unknown[:1000]
        return d


def read_lines(path: str | Path, *, strip: bool) -> list[str]:
    """One value per line of a UTF-8 file (`-`: stdin): a byte-order mark and line ends removed, blank lines
    skipped, and with `strip` surrounding spaces too (ids); without, a line is kept as it is (literals)."""
    try:
        if str(path) == "-":
            text = sys.stdin.read().removeprefix("\ufeff")
        else:
            text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RetrodbError(f"{path} does not exist") from None
    except OSError as exc:
        raise RetrodbError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise RetrodbError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = text.split("\n")
    return [line.strip() if strip else line.removesuffix("\r") for line in lines if line.strip()]


def read_ids_file(path: str | Path) -> list[str]:
    """Document ids, one per line (blank lines ignored); `-` reads stdin."""
    return read_lines(path, strip=True)


def plan_delete(snapshot: Snapshot, doc_ids: list[str] | None = None, where: str | None = None) -> DeletePlan:
    """Resolve the documents to delete: by id (`doc_ids`) or by one boolean SQL expression over `documents`
    (`where`, see `_where_rows`)."""
    import pyarrow as pa

    from .sql import connect_readonly

    if (doc_ids is None) == (where is None):
        raise UsageError("say what to delete: --doc-id/--ids-file, or --where (not both)")
    con = connect_readonly(snapshot)
    try:
        if doc_ids is not None:
            wanted = list(dict.fromkeys(doc_ids))
            if not wanted:
                raise UsageError("no document ids given")
            con.register("wanted", pa.table({"doc_id": pa.array(wanted, pa.string())}))
            rows = con.sql(f"SELECT {PLAN_COLUMNS} FROM documents WHERE doc_id IN (SELECT doc_id FROM wanted) "
                               "ORDER BY segment, first_chunk_id").to_arrow_table().to_pylist()
            found = {r["doc_id"] for r in rows}
            gone = {r[0] for r in con.sql("SELECT DISTINCT doc_id FROM _tombstones WHERE doc_id IN "
                                          "(SELECT doc_id FROM wanted)").fetchall()} - found
            unknown = [d for d in wanted if d not in found and d not in gone]
            if not rows and unknown:
                shown = ", ".join(repr(d) for d in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                raise RetrodbError(f"{len(unknown)} of the {len(wanted)} document id(s) are not in the database "
                                   f"and the rest are already deleted: {shown}" if gone else
                                   f"none of the {len(wanted)} document id(s) is in the database: {shown}",
                                   hint="ids are exact; list some with: retrodb sql DB \"SELECT doc_id FROM documents LIMIT 10\"")
            return DeletePlan(snapshot.version, rows, unknown, [d for d in wanted if d in gone], requested=len(wanted))
        rows = _where_rows(con, where)
        if not rows:
            raise RetrodbError(f"no document matches --where {where!r}; nothing to delete")
        return DeletePlan(snapshot.version, rows)
    finally:
        con.close()


WHERE_HINT = ("one boolean SQL expression over documents(doc_id, source, metadata, text, num_chars, num_tokens, "
              "num_chunks, first_chunk_id, segment), e.g. \"source LIKE '%spam%' AND num_tokens < 20\"")


def _where_rows(con, where: str) -> list[dict]:
    """The documents `where` selects. `where` is parsed by DuckDB as ONE expression and bound as the filter of
    the `documents` relation (never pasted into a statement), on a locked-down connection: a second statement,
    a UNION or a file read cannot get in."""
    import duckdb

    if not where.strip():
        raise BadOption("--where", "empty condition", hint=WHERE_HINT)
    docs = con.table("documents")
    try:
        types = docs.project(where).types
        if len(types) != 1 or str(types[0]) != "BOOLEAN":
            raise BadOption("--where", f"must be one boolean expression, not {len(types)} value(s) of type "
                            f"{', '.join(map(str, types))}", hint=WHERE_HINT)
        rel = docs.filter(where).project(PLAN_COLUMNS).order("segment, first_chunk_id")
        return rel.to_arrow_table().to_pylist()
    except duckdb.Error as exc:
        raise BadOption("--where", str(exc).splitlines()[0], hint=WHERE_HINT) from None


def delete(root: str | Path, doc_ids: list[str] | None = None, where: str | None = None, *,
           plan: DeletePlan | None = None, wait: float = 0.0) -> DeleteReport:
    """Tombstone the documents of `plan` (or resolved from `doc_ids`/`where`) and commit once."""
    started = time.perf_counter()
    db = Database(root)
    if plan is None:
        plan = plan_delete(db.snapshot, doc_ids, where)
    with db.writer("delete", wait=wait) as w:
        if not plan.documents:  # every id already deleted (e.g. a rerun): nothing to commit
            return DeleteReport(w.base.version, 0, 0, 0, [], plan.unknown, time.perf_counter() - started, [])
        if w.base.version != plan.version:  # someone committed since the plan: re-resolve, and refuse surprises
            ids = [d["doc_id"] for d in plan.documents]
            fresh = plan_delete(w.base, doc_ids=ids)
            if fresh.unknown or {(d["segment"], d["doc_id"]) for d in fresh.documents} != \
                    {(d["segment"], d["doc_id"]) for d in plan.documents}:
                raise RetrodbError(f"the database changed (v{plan.version} -> v{w.base.version}) since the delete "
                                   "was planned; nothing deleted", hint="rerun the delete to plan it again")
        data = w.base.derive("delete")
        totals = tombstones.add(w, data, plan.documents)
        version = w.commit(data).version
    return DeleteReport(version, totals["documents"], totals["chunks"], totals["tokens"],
                        sorted({d["segment"] for d in plan.documents}), plan.unknown, time.perf_counter() - started,
                        [d["doc_id"] for d in plan.documents])
