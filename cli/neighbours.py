"""`retrodb neighbours`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._options import DbArg, ExecutorOpt, RayAddressOpt, Format, FormatOpt, WaitOpt
from ._output import Output


def neighbours(
    db: DbArg,
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours per chunk that training reads (RETRO: 2).", min=1)] = 2,
    margin: Annotated[Optional[int], typer.Option("--margin", help="Neighbours stored per chunk, so deletions can be filtered at read time (default: 2k).", min=1)] = None,
    ef: Annotated[Optional[int], typer.Option("--ef", help="HNSW search breadth (at least the margin is used; default 64).", min=1)] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Recompute every segment's neighbours against the current snapshot (also needed to change k, margin or ef).")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", help="Worker processes, each searching its own segments (default 1: one process, all cores as search threads).", min=1)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="hnswlib search threads per worker (default: cores / workers).", min=1)] = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Precompute the training neighbours of every live chunk (RETRO's frozen retrieval).

    For each chunk: its nearest chunks of OTHER documents (its own document is excluded
    exactly), with a margin beyond k, stored per segment as Parquet and committed with
    the snapshot. Only segments without neighbours are computed (after `add`, the new
    ones); `stats` and `verify` say how stale older ones are, --refresh recomputes all.
    Deleted chunks are dropped at read time: the `neighbours` SQL view and
    `retrodb.data` skip them and renumber ranks. An interrupted run resumes.

    [bold]Examples[/]

      retrodb neighbours my-db                      # k=2, margin 4
      retrodb neighbours my-db --k 2 --ef 128 --format json
      retrodb neighbours my-db --refresh            # after many adds: recompute everything
      retrodb sql my-db "SELECT * FROM neighbours WHERE rank <= 2 LIMIT 6"
    """
    import retrodb
    from retrodb.neighbours import compute_neighbours, describe, status

    out = Output(fmt.value)
    with out.progress("neighbours", unit="chunks") as progress:
        report = compute_neighbours(db, k, ef=ef, margin=margin, refresh=refresh, workers=workers, threads=threads,
                                    executor=executor, ray_address=ray_address, wait=wait, progress=progress)
    st = status(retrodb.open(db).snapshot)
    if out.json:
        out.record({**report.to_dict(), "status": st})
        return
    p = report.params
    if report.segments:
        rate = report.to_dict()["chunks_per_s"]
        out.say(f"committed v{report.version}: neighbours of {report.chunks:,} chunks in {len(report.segments)} "
                f"segment(s) (k={p['k']}, margin {p['margin']}, ef {p['ef']}, searched v{report.computed_at}), "
                f"{report.seconds:.1f}s" + (f", {rate:,} chunks/s" if rate else "")
                + (f"; picked up {report.resumed_segments} finished by an earlier run" if report.resumed_segments else ""))
    else:
        out.say(f"nothing to do: every segment has neighbours (v{report.version}); --refresh recomputes them")
    if report.exact_segments:
        out.warn(f"{len(report.exact_segments)} segment(s) have no index and were searched exactly (slow); "
                 f"run: retrodb index {db}")
    out.say(f"neighbours: {describe(st)}")


def register(app: typer.Typer) -> None:
    app.command()(neighbours)
