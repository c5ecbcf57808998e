"""`retrodb ingest`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import DbArg, ExecutorOpt, RayAddressOpt, FormatsOpt, IdFieldOpt, OnErrorOpt, SegmentMbOpt, SourcesArg, TextFieldOpt, WaitOpt, WorkersOpt
from ._output import Output


def ingest(
    db: DbArg,
    sources: SourcesArg,
    formats: FormatsOpt = [],
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = "id",
    on_error: OnErrorOpt = "skip",
    workers: WorkersOpt = None,
    segment_mb: SegmentMbOpt = 64,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer directory for a new database (default: the bundled RETRO model's byte-level BPE).")] = None,
    chunk_size: Annotated[int, typer.Option(help="Tokens per chunk for a new database.", min=1)] = 64,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    wait: WaitOpt = 0,
) -> None:
    """Tokenise and chunk documents into new segments, committed as one snapshot.

    Creates the database if it does not exist. Bad records (invalid UTF-8, binary
    files, empty documents, malformed JSON, missing text field, bad or duplicate ids)
    are skipped and reported with file and line, or stop the run with --on-error fail.
    Hidden files and symlinked folders inside a folder are not read (listed as ignored).
    Ingesting nothing is an error (exit 1) that lists the fields found. An interrupted
    run leaves nothing visible; rerun the same command to finish it.

    [bold]Examples[/]

      retrodb ingest my-db corpus/
      retrodb ingest my-db shard-*.jsonl.zst --text-field content --id-field url --workers 8
      zcat dump.jsonl.gz | retrodb ingest my-db - --format json
      man bash | retrodb ingest my-db - --format text      # stdin as one plain-text document
    """
    from retrodb.ingest import IngestOptions, NothingIngested, ingest as run_ingest

    input_format, output_format = split_formats(formats)
    out = Output(output_format)
    opts = IngestOptions(fmt=input_format, text_field=text_field, id_field=id_field, on_error=on_error,
                         segment_bytes=int(segment_mb * (1 << 20)), workers=workers, executor=executor,
                         ray_address=ray_address)
    try:
        with out.progress("ingest") as progress:
            report = run_ingest(db, sources, opts, tokenizer=tokenizer, chunk_size=chunk_size, wait=wait,
                                progress=progress)
    except NothingIngested as exc:
        show_nothing_ingested(out, exc)
        raise
    summary = report.to_dict()
    if out.json:
        out.record(summary)
    else:
        out.say(f"committed v{report.version}: {report.documents:,} documents, {report.chunks:,} chunks, "
                f"{report.tokens:,} tokens in {len(report.segments)} segment(s), {report.seconds:.1f}s "
                f"({summary['tokens_per_s'] or 0:,} tokens/s)"
                + (f"; resumed {report.resumed_segments} finished segment(s)" if report.resumed_segments else ""))
        warn_skipped(out, report)


def warn_skipped(out: Output, report) -> None:
    """Warn about the records an ingest (or add) skipped: counts by kind, then the first few; then what the
    folder policy left out (hidden entries, symlinked folders)."""
    if report.skipped:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(report.issue_counts.items()))
        out.warn(f"skipped {report.skipped} record(s): {counts}")
        for issue in report.issues[:10]:
            out.warn(f"  {issue['where']}: {issue['message']}")
        if report.skipped > 10:
            out.warn("  ... (--format json lists up to 1000)")
    if report.ignored:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(report.ignored_counts.items()))
        out.warn(f"ignored {sum(report.ignored_counts.values())} path(s) in the folders: {counts}")
        for item in report.ignored[:5]:
            out.warn(f"  {item['where']}: {item['message']}")


def show_nothing_ingested(out: Output, exc) -> None:
    """Before the error itself: the report (JSON mode) or what was skipped."""
    if out.json:
        out.record({**exc.report.to_dict(), "error": exc.message, "hint": exc.hint})
    else:
        warn_skipped(out, exc.report)


def split_formats(values: list[str]) -> tuple[str, str]:
    """ingest's --format names the input format, the output format, or one of each."""
    from retrodb.readers import FORMATS

    input_format, output_format = "auto", "human"
    for v in values:
        if v in FORMATS:
            input_format = v
        elif v in ("human", "json"):
            output_format = v
        else:
            raise typer.BadParameter(f"{v!r} is neither an input format ({', '.join(FORMATS)}) nor human/json",
                                     param_hint="--format")
    return input_format, output_format


def register(app: typer.Typer) -> None:
    app.command()(ingest)
