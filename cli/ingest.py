"""`retrodb ingest`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import DbArg, FormatsOpt, IdFieldOpt, OnErrorOpt, SegmentMbOpt, SourcesArg, TextFieldOpt, WaitOpt, WorkersOpt
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
    executor: Annotated[str, typer.Option(help="local (process pool) or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address for --executor ray.")] = None,
    wait: WaitOpt = 0,
) -> None:
    """Tokenise and chunk documents into new segments, committed as one snapshot.

    Creates the database if it does not exist. Bad records (invalid UTF-8, binary
    files, empty documents, malformed JSON, missing text field, duplicate ids) are
    skipped and counted, or stop the run with --on-error fail. An interrupted run
    leaves nothing visible; rerun the same command to finish it.

    [bold]Examples[/]

      retrodb ingest my-db corpus/
      retrodb ingest my-db shard-*.jsonl.zst --text-field content --id-field url --workers 8
      zcat dump.jsonl.gz | retrodb ingest my-db - --format json
    """
    from retrodb.ingest import IngestOptions, ingest as run_ingest

    input_format, output_format = split_formats(formats)
    out = Output(output_format)
    opts = IngestOptions(fmt=input_format, text_field=text_field, id_field=id_field, on_error=on_error,
                         segment_bytes=int(segment_mb * (1 << 20)), workers=workers, executor=executor,
                         ray_address=ray_address)
    with out.progress("ingest") as progress:
        report = run_ingest(db, sources, opts, tokenizer=tokenizer, chunk_size=chunk_size, wait=wait,
                            progress=progress)
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
    """Warn about the records an ingest (or add) skipped: counts by kind, then the first few."""
    if report.skipped:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(report.issue_counts.items()))
        out.warn(f"skipped {report.skipped} record(s): {counts}")
        for issue in report.issues[:10]:
            out.warn(f"  {issue['where']}: {issue['message']}")
        if report.skipped > 10:
            out.warn("  ... (--format json lists up to 1000)")


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
