"""`retrodb serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import DbArg, DeviceOpt
from ._output import Output


def serve(
    db: DbArg,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default 127.0.0.1). Any other address must be given here explicitly: the server has no authentication.", show_default=False)] = None,
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).", min=0, max=65535)] = 8750,
    device: DeviceOpt = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Segments searched at once (default: all cores).", min=1)] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="RETRO model for generate and eval (a model directory or a `retrodb train` output); default: the bundled model, when it fits the database.", show_default=False)] = None,
) -> None:
    """A warm, read-only server: the neighbour debugger in the browser and a JSON API.

    Keeps the embedder and the indexes loaded, so a query costs milliseconds instead of
    a process start; follows new commits (an `add` in another shell is seen by the next
    request). It never writes to the database. No authentication: it listens on
    127.0.0.1 unless --host says otherwise.

    API (JSON; errors are {"error", "hint"} with status 400/404):
      GET  /api/health, /api/stats
      POST /api/query                     {"texts": [...] | "chunk_ids": [...], "k", "ef", "exact", "exclude_doc", "exclude_same_doc"}
      GET  /api/chunks/ID/neighbours?k=4  neighbours of a stored chunk (its own document left out)
      GET  /api/document?doc_id=ID        a document's text and chunks
      POST /api/generate                  {"prompt", "max_new_tokens", "temperature", "top_p", "seed", "retrieval", "k"}
      POST /api/eval                      {"texts": [...], "k", "exclude_doc"}: bits per byte with and without retrieval

    [bold]Examples[/]

      retrodb serve my-db                       # then open http://127.0.0.1:8750/
      curl -s localhost:8750/api/query -d '{"texts": ["how do generators work"], "k": 2}'
      retrodb query my-db "how do generators work" --server http://127.0.0.1:8750
    """
    from retrodb.serve import DEFAULT_HOST, check_host
    from retrodb.serve import serve as run_serve

    out = Output("human")
    warning = check_host(host or DEFAULT_HOST, explicit=host is not None)
    if warning:
        out.warn(warning)
    out.err.print(f"loading {db} (embedder and indexes)…", highlight=False, markup=False)
    run_serve(db, host or DEFAULT_HOST, port, device=device, threads=threads, model=model, on_note=out.warn,
              on_ready=lambda url: out.err.print(f"serving {db} at {url}  (read-only; Ctrl-C stops)",
                                                 highlight=False, markup=False))


def register(app: typer.Typer) -> None:
    app.command()(serve)
