"""Database-level commands: init, stats, log, sql."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import AtOpt, DbArg, Format, FormatOpt
from ._output import Output


def init(
    db: DbArg,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Local Hugging Face tokenizer directory (default: the bundled RETRO model's byte-level BPE).")] = None,
    chunk_size: Annotated[int, typer.Option(help="Tokens per chunk, fixed for the life of the database.", min=1)] = 64,
    fmt: FormatOpt = Format.human,
) -> None:
    """Create an empty database.

    [bold]Examples[/]

      retrodb init my-db
      retrodb init my-db --tokenizer ~/models/bert-base-cased --chunk-size 64
    """
    from retrodb.database import Database

    d = Database.create(db, tokenizer, chunk_size)
    out = Output(fmt.value)
    info = {"path": str(db), "version": d.version, "chunk_size": d.config["chunk_size"],
            "tokenizer": d.config["tokenizer"]["path"]}
    if out.json:
        out.record(info)
    else:
        out.say(f"created {db} (chunk size {info['chunk_size']}, tokenizer {info['tokenizer']})")


def stats(db: DbArg, at: AtOpt = None,
          segments: Annotated[bool, typer.Option("--segments", help="Also list every segment (reads every group manifest: slow on a big database).")] = False,
          fmt: FormatOpt = Format.human) -> None:
    """Documents, chunks, tokens, segments, bytes and index units of a snapshot, from its root manifest.

    [bold]Examples[/]

      retrodb stats my-db
      retrodb stats my-db --segments
      retrodb stats my-db --format json | jq .chunks
    """
    import retrodb

    s = retrodb.open(db, at=at).stats(segments=segments)
    out = Output(fmt.value)
    if out.json:
        out.record(s)
        return
    from retrodb.neighbours import describe

    out.kv([(k, f"{v:,}" if isinstance(v, int) else v) for k, v in s.items() if k not in ("per_segment", "neighbours")]
           + [("neighbours", describe(s["neighbours"]))], title=f"{db} @ v{s['version']}")
    if s.get("per_segment"):
        out.table(["segment", "documents", "chunks", "tokens", "deleted chunks", "bytes", "files"],
                  [[p["segment"], f"{p['documents']:,}", f"{p['chunks']:,}", f"{p['tokens']:,}",
                    f"{p['deleted_chunks']:,}", f"{p['bytes']:,}", ", ".join(p["files"])] for p in s["per_segment"]],
                  title="segments")


def log(db: DbArg, fmt: FormatOpt = Format.human) -> None:
    """List retained snapshots: version, time, command, documents, chunks; and the snapshots a
    redaction purged (version, time, command only: their content is gone).

    [bold]Examples[/]

      retrodb log my-db
      retrodb stats my-db --at 3     # read an older snapshot while it is retained
    """
    import retrodb

    rows = retrodb.open(db).log()
    out = Output(fmt.value)
    if out.json:
        for r in rows:
            out.record(r)
        return
    out.table(["version", "created", "command", "documents", "chunks", "tokens", "segments"],
              [[str(r["version"]), r["created"], r["command"], f"purged by redaction {r.get('purged_by') or ''}".strip(),
                "", "", ""] if r.get("purged") else
               [str(r["version"]) + (" (current)" if r["current"] else ""), r["created"], r["command"], f"{r['documents']:,}",
                f"{r['chunks']:,}", f"{r['tokens']:,}", r["segments"]] for r in rows])


def sql(
    db: DbArg,
    query: Annotated[str, typer.Argument(help="One read-only DuckDB query (SELECT, DESCRIBE, SHOW, SUMMARIZE) over the views documents, chunks and segments.")],
    at: AtOpt = None,
    fmt: FormatOpt = Format.human,
    limit: Annotated[int, typer.Option(help="Most rows to print in human mode.")] = 100,
) -> None:
    """Run one read-only DuckDB query over the snapshot's tables (deleted documents excluded).

    Views: [bold]documents[/](doc_id, source, metadata, text, num_chars, num_tokens, num_chunks,
    first_chunk_id, segment), [bold]chunks[/](chunk_id, doc_id, position, char_start, char_end,
    num_tokens, tokens, continuation_id, segment), [bold]segments[/](segment, documents, chunks),
    [bold]neighbours[/](chunk_id, rank, neighbour_chunk_id, score): the stored training neighbours
    (`retrodb neighbours`), deleted chunks dropped on both sides, ranks renumbered 1..n.

    What it may do: one SELECT (also DESCRIBE, SHOW, SUMMARIZE, WITH, VALUES) that reads the
    views. What it may not: read any file but the snapshot's own (read_csv, read_blob, glob
    fail), write any file (COPY, EXPORT), ATTACH a database, INSTALL or LOAD an extension,
    CREATE, DROP, SET or PRAGMA anything: DuckDB runs with external access disabled and its
    configuration locked, and every other statement is refused before it runs.

    [bold]Examples[/]

      retrodb sql my-db "SELECT count(*) AS n FROM chunks"
      retrodb sql my-db "SELECT doc_id, num_chunks FROM documents ORDER BY 2 DESC LIMIT 5" --format json
      retrodb sql my-db "DESCRIBE documents"
      retrodb sql my-db "SELECT * FROM neighbours WHERE rank <= 2 LIMIT 10"
    """
    import duckdb

    import retrodb
    from retrodb.errors import RetrodbError

    try:
        table = retrodb.open(db, at=at).sql(query)
    except duckdb.Error as exc:
        from retrodb.database import undecodable

        if type(exc) in (duckdb.Error, duckdb.IOException, duckdb.SerializationException, duckdb.InternalException):
            raise undecodable(exc, Path(db), "sql") from None  # a database file DuckDB could not decode
        raise RetrodbError(f"SQL error: {exc}".splitlines()[0], hint="the views are documents, chunks, segments, neighbours") from None
    out = Output(fmt.value)
    if out.json:
        for row in table.to_pylist():
            out.record(row)
        return
    if not table.column_names:
        out.say("(the statement returned no rows)")
        return
    rows = table.slice(0, limit).to_pylist()
    out.table(table.column_names, [[_short(v) for v in r.values()] for r in rows])
    if table.num_rows > limit:
        out.warn(f"showing {limit} of {table.num_rows:,} rows (--limit, or --format json for all)")


def _short(v, width: int = 200):
    s = str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def register(app: typer.Typer) -> None:
    for fn in (init, stats, log, sql):
        app.command()(fn)
