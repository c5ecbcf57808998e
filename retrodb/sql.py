"""DuckDB views over one snapshot: `documents`, `chunks` (tombstones applied), `segments` and `neighbours`.

Two kinds of connection. `connect` is for retrodb's own SQL (it may add views over new
files). `connect_readonly` is for SQL that comes from a user (`retrodb sql`, `delete
--where`, redaction selectors): the views are created first, then the connection is
locked down: DuckDB reads no file but the snapshot's own (`allowed_paths`), external
access, extension installing and loading are off, and the configuration is locked, so
no statement can turn any of it back on. `run_query` further accepts one read-only
statement (SELECT, DESCRIBE, SHOW, SUMMARIZE): COPY, ATTACH, INSTALL, LOAD,
CREATE, DROP, SET and the like are refused before they run.
"""

from __future__ import annotations

import os

from .errors import RetrodbError
from .snapshot import Snapshot

VIEWS = "documents, chunks, segments, neighbours"
READ_ONLY_HINT = (f"retrodb sql runs one read-only query (SELECT, DESCRIBE, SHOW, SUMMARIZE) over the views "
                  f"{VIEWS}; it cannot read or write other files, attach databases, install extensions or change "
                  "settings")


class SqlRefused(RetrodbError):
    """User SQL that is not one read-only query, or that DuckDB refused (syntax, unknown name, file access)."""


def _abs(p) -> str:
    return os.path.abspath(str(p))


def _files(paths) -> str:
    return "[" + ", ".join("'" + _abs(p).replace("'", "''") + "'" for p in paths) + "]"


def connect(snapshot: Snapshot, threads: int | None = None):
    """An in-memory DuckDB connection with the snapshot's tables as views (retrodb's own SQL only)."""
    import duckdb

    con = duckdb.connect(":memory:")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    segs = snapshot.segments
    seg_expr = "regexp_extract(filename, '(seg-[0-9]+)/[^/]+$', 1)"
    tomb_files = snapshot.segment_files("tombstones")
    if tomb_files:
        con.execute(
            f"CREATE VIEW _tombstones AS SELECT {seg_expr} AS segment, doc_id, first_chunk_id, num_chunks, version "
            f"FROM read_parquet({_files(tomb_files)}, filename=true)"
        )
    else:
        con.execute(
            "CREATE VIEW _tombstones AS SELECT NULL::VARCHAR AS segment, NULL::VARCHAR AS doc_id, "
            "NULL::BIGINT AS first_chunk_id, NULL::INTEGER AS num_chunks, NULL::BIGINT AS version WHERE false"
        )
    for table in ("documents", "chunks"):
        files = snapshot.segment_files(table)
        if files:
            body = (
                f"SELECT t.* EXCLUDE (filename), {seg_expr.replace('filename', 't.filename')} AS segment "
                f"FROM read_parquet({_files(files)}, filename=true) t"
            )
            if tomb_files:
                body = (
                    f"SELECT * FROM ({body}) x WHERE NOT EXISTS (SELECT 1 FROM _tombstones d "
                    f"WHERE d.segment = x.segment AND d.doc_id = x.doc_id)"
                )
        else:
            body = _empty_select(table, snapshot)
        con.execute(f"CREATE VIEW {table} AS {body}")
    rows = ", ".join(
        f"('{name}', {s['documents'] - s.get('deleted_documents', 0)}, {s['chunks'] - s.get('deleted_chunks', 0)})"
        for name, s in sorted(segs.items())
    )
    if rows:
        con.execute(f"CREATE VIEW segments AS SELECT * FROM (VALUES {rows}) v(segment, documents, chunks)")
    else:
        con.execute("CREATE VIEW segments AS SELECT NULL::VARCHAR AS segment, 0::BIGINT AS documents, "
                    "0::BIGINT AS chunks WHERE false")
    from .neighbours import sql_view

    sql_view(con, snapshot)  # neighbours(chunk_id, rank, neighbour_chunk_id, score), live on both sides
    return con


def lock_down(con, readable) -> None:
    """From now on `con` reads only the files `readable`, writes none, loads no extension, and cannot be
    reconfigured (the views, created before, keep working)."""
    paths = sorted({_abs(p) for p in readable})
    con.execute("SET allowed_paths = " + ("[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
                                           if paths else "[]"))
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def connect_readonly(snapshot: Snapshot, threads: int | None = None):
    """`connect`, then locked down to the snapshot's own files (for SQL and patterns a user wrote)."""
    con = connect(snapshot, threads)
    lock_down(con, [f for kind in ("documents", "chunks", "tombstones", "neighbours")
                   for f in snapshot.segment_files(kind)])
    return con


READ_ONLY_STATEMENTS = ("SELECT",)  # DESCRIBE, SHOW, SUMMARIZE, VALUES, WITH and FROM-first parse as SELECT


def check_read_only(con, query: str) -> None:
    """Refuse anything but one read-only statement (before it runs)."""
    import duckdb

    if not query.strip():
        raise SqlRefused("empty SQL query", hint=READ_ONLY_HINT)
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlRefused(f"SQL error: {str(exc).splitlines()[0]}", hint=f"the views are {VIEWS}") from None
    if len(statements) != 1:
        raise SqlRefused(f"one SQL statement at a time, not {len(statements)}", hint=READ_ONLY_HINT)
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise SqlRefused(f"{kind} statements are not allowed: the database is read-only through retrodb sql",
                         hint=READ_ONLY_HINT)


def run_query(snapshot: Snapshot, query: str):
    """Run one user query, read-only and locked down; returns a pyarrow Table."""
    import duckdb

    con = connect_readonly(snapshot)
    try:
        check_read_only(con, query)
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.PermissionException as exc:
            raise SqlRefused(f"SQL refused: {str(exc).splitlines()[0]}", hint=READ_ONLY_HINT) from None
    finally:
        con.close()


_DUCK = {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "list<token>": "UINTEGER[]"}


def _empty_select(table: str, snapshot: Snapshot) -> str:
    from .schema import spec

    cols = ", ".join(f"NULL::{_DUCK[f['type']]} AS {f['name']}" for f in spec(table)["fields"])
    return f"SELECT {cols}, NULL::VARCHAR AS segment WHERE false"
