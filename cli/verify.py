"""`retrodb verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.text import Text

from ._options import AtOpt, DbArg, Format, FormatOpt
from ._output import Output


def verify(
    db: DbArg,
    quick: Annotated[bool, typer.Option("--quick", help="Compare file sizes only, not sha256 checksums (reads no data files in full).")] = False,
    at: AtOpt = None,
    absent: Annotated[List[str], typer.Option("--absent", help="Prove this text is gone: scan every file under the database (Parquet decoded, .gz/.zst decompressed, the rest as raw bytes, all streamed) for its UTF-8 bytes and its token ids; a hit names the document. Repeatable.")] = [],
    absent_file: Annotated[Optional[Path], typer.Option("--absent-file", help="One text per line (UTF-8, a BOM is ignored), as --absent.")] = None,
    absent_key: Annotated[bool, typer.Option("--absent-key", help="With --absent: also fail if any stored vector (keys files, HNSW files, deleted slots included) is within cosine 0.999 of the text's own key.")] = False,
    ignore_case: Annotated[bool, typer.Option("--ignore-case", help="With --absent: match the text in any case (Unicode case folding, raw files included).")] = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Check a snapshot end to end; exit 1 with a precise report if anything is wrong.

    Errors: a referenced file missing or changed (size, sha256); row counts that do not
    line up across the manifest, documents, chunks, keys (array shape) and HNSW index
    (element count); duplicate chunk ids; chunk ids, positions or continuation pointers
    that do not follow their document; tombstones naming unknown documents; a retained
    older snapshot missing a file; a stored neighbours file that is malformed or still names a
    chunk a redaction removed (any file on disk). Notes: how stale the stored neighbours are. Warnings (harmless, cleaned by the next writing
    command or by vacuum): temporary files, unfinished jobs, uncommitted manifests,
    unreferenced segment files, a stale writer lock.

    [bold]Examples[/]

      retrodb verify my-db
      retrodb verify my-db --quick --format json
      retrodb verify my-db --at 3
      retrodb verify my-db --absent "jane.doe@example.com" --absent-key
    """
    from retrodb.redact import absent_check, read_lines
    from retrodb.verify import verify as run_verify

    out = Output(fmt.value)
    texts = list(absent) + (read_lines(absent_file) if absent_file else [])
    check = absent_check(texts, ignore_case, absent_key) if texts else None
    report = run_verify(db, at=at, quick=quick, extra=[("absent", check)] if check else None)
    if out.json:
        out.record({**report.to_dict(), **({"absent": check.summary} if check else {})})
    else:
        for f in report.findings:  # data (paths, document ids) as Text: never markup
            where = f" ({f.path})" if f.path else ""
            if f.level == "error":
                out.error(f"[{f.check}] {f.message}{where}")
            elif f.level == "info":
                out.say(Text(f"note [{f.check}] {f.message}{where}"))
            else:
                out.warn(f"[{f.check}] {f.message}{where}")
        if check and check.summary:
            s = check.summary
            out.say(Text(f"absent: searched {s['files']:,} file(s) ({s['bytes']:,} bytes) for {s['texts']} text(s)"
                         f"{' in any case' if ignore_case else ''} as {' and '.join(s['kinds'])}: "
                         + ("none found" if not s["found"] else f"{s['found']:,} found")))
        status = "OK" if report.ok else f"FAILED: {len(report.errors)} error(s)"
        at = f"v{report.version}" if report.version >= 0 else "no readable current snapshot"
        out.say(Text(f"{db} @ {at}: {status}; {report.segments} segments, {report.files} files, "
                     f"{report.bytes:,} bytes checked ({'sizes' if quick else 'sha256'}), "
                     f"{len(report.warnings)} warning(s), {report.seconds:.1f}s"))
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(verify)
