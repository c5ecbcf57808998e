"""DuckDB views over one snapshot: `documents`, `chunks` (tombstones applied), `segments` and `neighbours`."""

from __future__ import annotations

from .snapshot import Snapshot


def _files(paths) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def connect(snapshot: Snapshot, threads: int | None = None):
    """An in-memory DuckDB connection with the snapshot's tables as views."""
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


_DUCK = {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "list<token>": "UINTEGER[]"}


def _empty_select(table: str, snapshot: Snapshot) -> str:
    from .schema import spec

    cols = ", ".join(f"NULL::{_DUCK[f['type']]} AS {f['name']}" for f in spec(table)["fields"])
    return f"SELECT {cols}, NULL::VARCHAR AS segment WHERE false"
