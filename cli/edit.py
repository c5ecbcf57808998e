"""Editing commands: add, delete, compact, vacuum."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.text import Text

from ._options import (BatchSizeOpt, DbArg, DeviceOpt, DryRunOpt, ExecutorOpt, Format, FormatOpt, FormatsOpt, GpusOpt,
                       IdFieldOpt, OnErrorOpt, RayAddressOpt, SegmentMbOpt, SourcesArg, TextFieldOpt, WaitOpt,
                       WorkersOpt, YesOpt, usage_errors)
from ._output import Output, confirm


def add(
    db: DbArg,
    sources: SourcesArg,
    replace: Annotated[bool, typer.Option("--replace", help="Supersede live documents with the same id (their old version is deleted in the same commit). Without it they are refused.")] = False,
    formats: FormatsOpt = [],
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = "id",
    on_error: OnErrorOpt = "skip",
    workers: WorkersOpt = None,
    segment_mb: SegmentMbOpt = 64,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    wait: WaitOpt = 0,
) -> None:
    """Add documents: ingest, embed and index them as new segments, committed as ONE snapshot.

    Same inputs and bad-input policy as ingest. The new documents are embedded with the
    database's own embedder and indexed when the database has keys and indexes, so
    `query` finds them from that commit on; all of it appears at once or not at all.
    A document id that is already in the database is refused unless --replace.
    An interrupted add leaves nothing visible; rerun the same command to finish it.

    [bold]Examples[/]

      retrodb add my-db new-docs/
      retrodb add my-db fixed.jsonl --replace --format json
      cat more.jsonl | retrodb add my-db -
      retrodb add my-db shards/ --executor ray --ray-address 10.0.0.1:6379
    """
    from retrodb.add import add as run_add
    from retrodb.ingest import IngestOptions, NothingIngested

    from .ingest import show_nothing_ingested, split_formats, warn_skipped

    input_format, output_format = split_formats(formats)
    out = Output(output_format)
    opts = IngestOptions(fmt=input_format, text_field=text_field, id_field=id_field, on_error=on_error,
                         segment_bytes=int(segment_mb * (1 << 20)), workers=workers, executor=executor,
                         ray_address=ray_address)
    try:
        with out.progress("add") as progress:
            report = run_add(db, sources, opts, replace=replace, device=device, batch_size=batch_size, wait=wait,
                             progress=progress, gpus=gpus)
    except NothingIngested as exc:
        show_nothing_ingested(out, exc)
        raise
    if out.json:
        out.record(report.to_dict())
        return
    ing = report.ingest
    if not ing.segments:
        out.say(f"nothing added (still v{report.version})")
    else:
        out.say(f"committed v{report.version}: added {ing.documents:,} documents, {ing.chunks:,} chunks in "
                f"{len(ing.segments)} new segment(s)"
                + (f", replacing {report.replaced:,} older version(s)" if report.replaced else "")
                + (f"; embedded {report.embedded_chunks:,} chunks" if report.embedded_chunks else "")
                + (f", indexed {report.indexed_segments} segment(s)" if report.indexed_segments else "")
                + f" ({report.seconds:.1f}s)")
    for note in report.notes:
        out.warn(note)
    warn_skipped(out, ing)


def delete(
    db: DbArg,
    doc_id: Annotated[Optional[List[str]], typer.Option("--doc-id", help="Document id to delete (repeatable).")] = None,
    ids_file: Annotated[Optional[Path], typer.Option("--ids-file", help="File of document ids, one per line (- for stdin).")] = None,
    where: Annotated[Optional[str], typer.Option("--where", help="ONE boolean SQL expression over documents(doc_id, source, metadata, text, num_chars, num_tokens, num_chunks, first_chunk_id, segment); parsed as an expression, never pasted into a statement, and evaluated without file access.")] = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Delete documents: plan, confirm, then tombstone them in one commit.

    From that commit on, query, stats and sql no longer see the documents or their
    chunks. Older snapshots still do (`--at`) until `retrodb vacuum`; `retrodb compact`
    removes the rows from the segment files. Ids that match no live document are
    reported. Asks for confirmation on a terminal; elsewhere --yes is required.

    [bold]Examples[/]

      retrodb delete my-db --doc-id doc01.txt --doc-id doc02.txt
      retrodb delete my-db --ids-file to-remove.txt --yes
      retrodb delete my-db --where "source LIKE '%spam%'" --dry-run
    """
    from retrodb.database import Database
    from retrodb.delete import delete as run_delete, plan_delete, read_ids_file
    from retrodb.errors import UsageError

    by_id = bool(doc_id) or ids_file is not None
    if by_id == (where is not None):
        raise UsageError("say what to delete: --doc-id ID (repeatable) and/or --ids-file FILE, or --where SQL")
    ids = list(doc_id or []) + (read_ids_file(ids_file) if ids_file else []) if by_id else None
    out = Output(fmt.value)
    with usage_errors():
        plan = plan_delete(Database(db).snapshot, doc_ids=ids, where=where)
    if not out.json or dry_run:
        _show_delete_plan(out, db, plan, dry_run)
    if dry_run:
        return
    if plan.documents:
        confirm(yes, f"delete {len(plan.documents):,} document(s), {plan.chunks:,} chunks?")
    report = run_delete(db, plan=plan, wait=wait)  # with nothing to delete, it still cleans leftovers
    if out.json:
        out.record(report.to_dict())
    elif not report.documents:
        out.say(f"nothing to delete (still v{report.version})")
    else:
        out.say(f"committed v{report.version}: deleted {report.documents:,} documents, {report.chunks:,} chunks "
                f"in {len(report.segments)} segment(s)")


def _show_delete_plan(out: Output, db: Path, plan, dry_run: bool) -> None:
    if out.json:
        out.record({**plan.to_dict(), "dry_run": dry_run})
        return
    if plan.documents:
        _delete_table(out, db, plan)
    if plan.unknown:
        out.err.print(Text.assemble(("warning: ", "yellow"), f"{len(plan.unknown):,} id(s) match no document: "
                                    + ", ".join(repr(d) for d in plan.unknown[:10])
                                    + (" ..." if len(plan.unknown) > 10 else "")))
    if plan.already_deleted:
        out.say(f"{len(plan.already_deleted):,} id(s) already deleted by an earlier commit")
    if dry_run:
        out.say("dry run: nothing deleted")


def _delete_table(out: Output, db: Path, plan) -> None:
    out.table(["segment", "documents", "chunks", "tokens"],
              [[s, f"{c['documents']:,}", f"{c['chunks']:,}", f"{c['tokens']:,}"] for s, c in plan.per_segment().items()],
              title=f"delete from {db} @ v{plan.version}: {len(plan.documents):,} documents, "
                    f"{plan.chunks:,} chunks, {plan.tokens:,} tokens")
    shown = [repr(d["doc_id"]) for d in plan.documents[:10]]  # data: a Text, never markup or emoji codes
    out.say(Text("documents: " + ", ".join(shown)
                 + (f" ... (+{len(plan.documents) - 10:,})" if len(plan.documents) > 10 else "")))


def compact(
    db: DbArg,
    min_deleted_ratio: Annotated[float, typer.Option(help="Rewrite a segment once this share of its chunks is deleted (0..1).", min=0.0, max=1.0)] = 0.2,
    target_segment_chunks: Annotated[int, typer.Option(help="Merge segments under half this many live chunks into segments of at most this many (0: never merge).", min=0)] = 262144,
    dry_run: DryRunOpt = False,
    merge_indexes: Annotated[bool, typer.Option("--merge-indexes/--no-merge-indexes", help="Then merge the indexes of every full size tier into a shard (a second commit).")] = True,
    workers: WorkersOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Rewrite segments without their deleted rows and merge small segments, in one commit.

    Chunk ids stay the same; keys are carried over (no re-embedding); only the new
    segments' indexes are built. Untouched segments are not read. The old files stay
    for older snapshots until `retrodb vacuum`. An interrupted compaction resumes
    when rerun. Then the index units of every full size tier merge into one shard
    (LSM style, as `retrodb index --merge` does; --no-merge-indexes skips it).

    [bold]Examples[/]

      retrodb compact my-db
      retrodb compact my-db --min-deleted-ratio 0.05 --dry-run
      retrodb compact my-db --target-segment-chunks 500000 --format json
      retrodb compact my-db --executor ray --ray-address 10.0.0.1:6379
    """
    from retrodb.compact import compact as run_compact

    out = Output(fmt.value)
    with (out.progress("compact", unit="chunks") if not dry_run else nullcontext()) as progress:
        report = run_compact(db, min_deleted_ratio, target_segment_chunks, dry_run=dry_run, workers=workers,
                             executor=executor, ray_address=ray_address, wait=wait, merge_indexes=merge_indexes,
                             progress=progress)
    if out.json:
        out.record(report.to_dict())
        return
    if report.groups:
        out.table(["segments", "reason", "live chunks", "dropped chunks", "new segment"],
                  [[_segment_list(g.sources), g.reason, f"{g.live_chunks:,}", f"{g.dropped_chunks:,}",
                    g.to_dict()["new_segment"] or "(dropped)"] for g in report.groups],
                  title=f"compact {db} @ v{report.version}" + (" (dry run)" if dry_run else ""))
    if report.merged:
        out.say(f"committed v{report.version}: merged " + "; ".join(
            f"{m['units']} index(es) of {m['segments']:,} segment(s) into {m['name']}" for m in report.merged))
    if not report.groups:
        out.say(f"nothing to compact (v{report.version}, {report.segments_before} segments)")
    elif dry_run:
        out.say(f"dry run: would rewrite {report.chunks_rewritten:,} chunks and drop {report.chunks_dropped:,}; "
                f"{report.segments_before} -> {report.segments_after} segments")
    else:
        out.say(f"committed v{report.version}: rewrote {report.chunks_rewritten:,} chunks, dropped "
                f"{report.chunks_dropped:,}; {report.segments_before} -> {report.segments_after} segments, "
                f"{report.bytes_written:,} bytes written, {report.seconds:.1f}s")


def _segment_list(numbers: list[int]) -> str:
    from retrodb.snapshot import segment_name

    names = [segment_name(n) for n in numbers]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]} ({len(names)})"


def vacuum(
    db: DbArg,
    retain: Annotated[Optional[int], typer.Option(help="Keep the N newest snapshots (default: 1, only the current one).", min=1)] = None,
    older_than: Annotated[Optional[str], typer.Option(help="Keep every snapshot that was current within this long, e.g. 12h, 7d (with --retain: keep what either keeps).")] = None,
    grace: Annotated[str, typer.Option(help="Always keep snapshots superseded less than this long ago, so readers that just opened them can finish.")] = "10m",
    full: Annotated[bool, typer.Option("--full", help="Also walk every directory for files no retained snapshot references (strays no journal names; verify lists them). Costs a walk of the whole database.")] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Delete old snapshots and every file no retained snapshot references; report bytes freed.

    The current snapshot is always kept, and so is any snapshot superseded less than
    --grace ago (default 10m). Removed snapshots can no longer be read with --at.
    What is garbage is found from the removed snapshots (what they reference and the
    retained ones do not), so its cost follows what is removed; --full also walks
    every directory. Asks for confirmation on a terminal; elsewhere --yes is required.

    [bold]Examples[/]

      retrodb vacuum my-db --dry-run
      retrodb vacuum my-db --yes                  # keep only the current snapshot
      retrodb vacuum my-db --older-than 7d --yes  # keep a week of history
      retrodb vacuum my-db --retain 5 --yes
    """
    from retrodb.vacuum import parse_duration, vacuum as run_vacuum

    out = Output(fmt.value)
    older = parse_duration(older_than) if older_than else None
    grace_s = parse_duration(grace)
    report = run_vacuum(db, retain, older, grace_s, dry_run=True, full=full)
    if not dry_run:
        if report.plan.files or report.plan.manifests:
            if not out.json:
                _show_vacuum(out, report, db)
            confirm(yes, f"delete {len(report.plan.removed_versions)} snapshot(s) and free "
                               f"{report.plan.bytes:,} bytes?")
        report = run_vacuum(db, retain, older, grace_s, wait=wait, full=full)  # with nothing to delete, it still cleans
    if out.json:
        out.record(report.to_dict())
        return
    if dry_run:
        _show_vacuum(out, report, db)
        out.say("dry run: nothing deleted")
    else:
        out.say(f"removed {len(report.plan.removed_versions)} snapshot(s) and {report.files_removed:,} file(s), "
                f"freed {report.bytes_freed:,} bytes; retained: "
                + ", ".join(f"v{v}" for v in report.plan.retained))
    if report.plan.kept_by_grace and not report.plan.removed_versions:
        out.say(f"--grace {grace} kept {', '.join(f'v{v}' for v in report.plan.kept_by_grace)}: superseded less than "
                f"{grace} ago, so a reader may still have them open; --grace 0 removes them now")


def _show_vacuum(out: Output, report, db: Path) -> None:
    p = report.plan
    out.say(f"{db}: retain {', '.join(f'v{v}' for v in p.retained)}; remove {len(p.removed_versions)} snapshot(s) "
            f"({', '.join(f'v{v}' for v in p.removed_versions[:20])}{' ...' if len(p.removed_versions) > 20 else ''})"
            f" and {len(p.files):,} file(s): {p.bytes:,} bytes")


def register(app: typer.Typer) -> None:
    for fn in (add, delete, compact, vacuum):
        app.command()(fn)
