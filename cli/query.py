"""`retrodb query`."""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer

from ._options import AtOpt, DbArg, Format, FormatOpt
from ._output import Output
from ._text import flat, highlighted, print_wrapped


def query(
    db: DbArg,
    texts: Annotated[Optional[List[str]], typer.Argument(help="Query texts (each one a query); - reads one query per line from stdin.", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.", min=1)] = 4,
    ef: Annotated[int, typer.Option("--ef", help="HNSW search breadth: higher finds more of the true neighbours, slower (at least k is used).", min=1)] = 64,
    exact: Annotated[bool, typer.Option("--exact", help="Brute-force search over every key (slow; the reference for recall).")] = False,
    exclude_doc: Annotated[Optional[List[str]], typer.Option("--exclude-doc", help="Leave out this document's chunks (repeatable).")] = None,
    chunk_id: Annotated[Optional[List[int]], typer.Option("--chunk-id", help="Neighbours of this chunk of the database, from its stored key (repeatable).")] = None,
    exclude_same_doc: Annotated[bool, typer.Option("--exclude-same-doc/--include-same-doc", help="With --chunk-id: leave out the chunk's own document, as RETRO training does.")] = True,
    file: Annotated[Optional[str], typer.Option("--file", help="Read queries from this file, one per line (- for stdin); sent as one batch.")] = None,
    device: Annotated[str, typer.Option(help="Where to embed the queries: auto, cpu, cuda or mps.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Segments searched at once (default: all cores).", min=1)] = None,
    at: AtOpt = None,
    server: Annotated[Optional[str], typer.Option("--server", envvar="RETRODB_SERVER", help="Ask a running `retrodb serve` at this URL (answers in milliseconds; no model is loaded here). Also from $RETRODB_SERVER.", show_default=False)] = None,
    fmt: FormatOpt = Format.human,
) -> None:
    """Nearest chunks of each query: rank, score, document, position, chunk text and continuation.

    Searches every segment's HNSW index in parallel, drops deleted chunks and merges the
    global top k. Each neighbour is one block: rank, score, document, position and chunk id,
    then its chunk and continuation as wrapped text, with the longest token run it shares
    with the query (or the --chunk-id chunk) highlighted; r is that run over the query's
    tokens. --format json prints one object per query: {"query", "neighbours": [{rank,
    score, chunk_id, doc_id, position, text, continuation, tokens, continuation_tokens, r,
    overlap: {tokens, query_start, start, text_span, continuation_span}}]}.

    [bold]Examples[/]

      retrodb query my-db "how do generators work" -k 8
      retrodb query my-db --file questions.txt --format json > neighbours.jsonl
      retrodb query my-db --chunk-id 4294967301            # what RETRO retrieves for this chunk
      retrodb query my-db "exceptions" --exact --at 3      # brute force, on snapshot 3
      retrodb query my-db "generators" --server http://127.0.0.1:8750   # a warm `retrodb serve`
    """
    from retrodb.errors import UsageError

    out = Output(fmt.value)
    queries = list(texts or [])
    if queries == ["-"] or file is not None:
        if file is not None and queries:
            raise UsageError("give query texts or --file, not both")
        queries = read_queries(file or "-")
    if chunk_id and queries:
        raise UsageError("give query texts or --chunk-id, not both")
    if not chunk_id and not queries:
        raise UsageError("empty query: nothing to search for",
                           hint=f'retrodb query {db} "some text" (or --file FILE, or --chunk-id N)')
    if server:
        if at is not None:
            raise UsageError("--at cannot be used with --server: the server answers from the current snapshot",
                               hint="leave out --server to read an older snapshot")
        from retrodb.client import query as remote_query

        results = remote_query(server, db, None if chunk_id else queries, k, ef=ef, exact=exact,
                               exclude_doc=exclude_doc, chunk_ids=chunk_id or None,
                               exclude_same_doc=exclude_same_doc, on_warning=out.warn)
    else:
        import retrodb

        handle = retrodb.open(db, at=at)
        results = handle.query(None if chunk_id else queries, k, ef=ef, exact=exact, exclude_doc=exclude_doc,
                               chunk_ids=chunk_id or None, exclude_same_doc=exclude_same_doc, threads=threads,
                               device=device, on_warning=out.warn, overlap=True)
    for r in results:
        if out.json:
            out.record(r.to_dict())
        else:
            show_result(out, r)


def show_result(out: Output, r) -> None:
    """One query's neighbours for people: a header, then one block per neighbour, wrapped to the terminal
    (80 columns when not a terminal). Every piece of data is a rich Text, never parsed as markup."""
    from rich.text import Text

    console = out.out
    head = Text("chunk " + str(r.chunk_id) + ": " if r.chunk_id is not None else "query: ", style="bold")
    head.append(flat(r.query))
    print_wrapped(console, head, 0)
    if not r.neighbours:
        print_wrapped(console, Text("no neighbours", style="dim"), 2)
    for n in r.neighbours:
        line = Text()
        line.append(f"#{n.rank}", style="bold cyan")
        line.append(f"  {n.score:.4f}  ")
        line.append(n.doc_id, style="bold")
        line.append(f" · pos {n.position} · id {n.chunk_id}", style="dim")
        if n.overlap is not None:
            line.append(f" · run {n.overlap['tokens']} tok, r {n.r:.2f}", style="yellow" if n.r else "dim")
        console.print()
        print_wrapped(console, line, 2)
        print_wrapped(console, highlighted(n.text, (n.overlap or {}).get("text_span")), 4)
        if n.continuation is None:
            print_wrapped(console, Text("(no continuation: last chunk of its document)", style="dim"), 4)
        else:
            cont = highlighted(n.continuation, (n.overlap or {}).get("continuation_span"), style="dim")
            print_wrapped(console, Text("→ ", style="dim") + cont, 4)
    console.print()


def read_queries(path: str) -> list[str]:
    """Non-blank lines of a file (or stdin for -), each one query."""
    from retrodb.errors import RetrodbError

    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise RetrodbError(f"cannot read queries from {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise RetrodbError(f"empty query: no queries in {'stdin' if path == '-' else path}",
                           hint="one query per line")
    return lines


def register(app: typer.Typer) -> None:
    app.command()(query)
