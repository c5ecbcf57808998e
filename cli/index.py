"""`retrodb index`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._options import DbArg, ExecutorOpt, RayAddressOpt, Format, FormatOpt, WaitOpt
from ._output import Output


def index(
    db: DbArg,
    space: Annotated[Optional[str], typer.Option("--space", help="Similarity: cosine or ip (inner product; the same on unit keys). Default: the recorded one, else cosine.")] = None,
    m: Annotated[Optional[int], typer.Option("--M", "-M", help="HNSW links per node (more: better recall, bigger and slower to build). Default: recorded, else 32.", min=2)] = None,
    ef_construction: Annotated[Optional[int], typer.Option("--ef-construction", help="HNSW build breadth (more: better graph, slower build). Default: recorded, else 200.", min=1)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="Build threads (default: all cores).", min=1)] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild the indexes made with other parameters than those given (needed to change them).")] = False,
    commit_every: Annotated[int, typer.Option(help="Commit after this many built segments (and at the end).", min=1)] = 16,
    merge: Annotated[bool, typer.Option("--merge", help="Then merge the indexes of every full size tier into a shard (LSM style: a query then searches a few shards, not one index per segment).")] = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Build an HNSW index (hnswlib, labels = chunk ids) for every segment that has keys and no index.

    Only missing indexes are built; finished segments are committed as the run goes,
    so an interrupted run resumes where it stopped. The parameters are recorded in the
    database; changing them later needs --rebuild. With --merge, index units then merge
    in size tiers (each tier 8x the previous; 8 units of a tier become one shard of the
    next), as `retrodb compact` also does: a query searches O(8 x tiers) indexes.

    [bold]Examples[/]

      retrodb index my-db
      retrodb index my-db --merge
      retrodb index my-db --M 48 --ef-construction 400 --threads 16
      retrodb index my-db --M 16 --rebuild
    """
    from retrodb.index import index as run_index

    out = Output(fmt.value)
    with out.progress("index", unit="chunks") as progress:
        report = run_index(db, space=space, M=m, ef_construction=ef_construction, threads=threads, rebuild=rebuild,
                           commit_every=commit_every, executor=executor, ray_address=ray_address, wait=wait,
                           merge=merge, progress=progress)
    summary = report.to_dict()
    if out.json:
        out.record(summary)
        return
    p = report.params
    if report.segments:
        out.say(f"committed v{report.version}: indexed {report.chunks:,} chunks in {len(report.segments)} segment(s) "
                f"(space {p['space']}, M {p['M']}, ef_construction {p['ef_construction']}), {report.seconds:.1f}s"
                + (f", {summary['keys_per_s']:,} keys/s" if summary["keys_per_s"] else "")
                + (f"; picked up {report.resumed_segments} finished by an earlier run" if report.resumed_segments else ""))
    elif not report.merged:
        out.say(f"nothing to do: every segment with keys has an index (v{report.version})")
    if report.merged:
        out.say(f"committed v{report.version}: merged " + "; ".join(
            f"{m['units']} index(es) of {m['segments']:,} segment(s) into {m['name']} ({m['vectors']:,} vectors)"
            for m in report.merged))
    if report.without_keys:
        out.warn(f"{len(report.without_keys)} segment(s) have no keys yet and were not indexed; run: retrodb embed {db}")


def register(app: typer.Typer) -> None:
    app.command()(index)
