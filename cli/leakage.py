"""`retrodb leakage`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.text import Text

from ._options import AtOpt, DbArg, Format, FormatOpt
from ._output import Output
from ._text import flat, label, print_wrapped


def leakage(
    db: DbArg,
    files: Annotated[List[str], typer.Argument(help="Evaluation texts: files or folders of .txt/.md (one text each), .jsonl[.gz|.zst] or .parquet (one text per record).", show_default=False)],
    k: Annotated[int, typer.Option("--k", "-k", help="Database chunks retrieved per evaluation chunk (the paper: 10).", min=1)] = 10,
    ef: Annotated[int, typer.Option("--ef", help="HNSW search breadth (at least k is used).", min=1)] = 64,
    dedup: Annotated[bool, typer.Option("--dedup", help="Also list database documents that nearly duplicate an evaluation text (MinHash over 13-grams, Jaccard >= 0.8).")] = False,
    out_ids: Annotated[Optional[Path], typer.Option("--out-ids", help="With --dedup: write those documents' ids here, one per line, for `retrodb delete --ids-file`.")] = None,
    top: Annotated[int, typer.Option("--top", help="Most leaked chunks to list.", min=0)] = 10,
    text_field: Annotated[str, typer.Option(help="JSONL field / Parquet column holding the text.")] = "text",
    at: AtOpt = None,
    fmt: FormatOpt = Format.human,
) -> None:
    """How much of an evaluation text the database already holds: the RETRO paper's r(C).

    Each evaluation text is cut into chunks with the database's tokenizer; for each chunk C
    the k nearest database chunks are retrieved, and r(C) = (longest token run C shares with
    a retrieved chunk + continuation) / (tokens in C). Reported per file and overall: chunks
    per r bucket (0, <=12.5%, 25%, 50%, 75%, 100%), the share of evaluation bytes with
    r > 0.5, and the most leaked chunks with the documents they leak from. --format json
    prints one {"file", "position", "r", "doc_id", ...} per chunk, then {"summary": {...}}.

    [bold]Examples[/]

      retrodb leakage my-db eval/wikitext-test.txt
      retrodb leakage my-db eval/ --format json > leakage.jsonl
      retrodb leakage my-db eval/ --dedup --out-ids leaked.txt && retrodb delete my-db --ids-file leaked.txt
    """
    from retrodb.errors import RetrodbError
    from retrodb.leakage import leakage as run_leakage, write_ids

    if out_ids is not None and not dedup:
        raise RetrodbError("--out-ids needs --dedup (it writes the near-duplicate documents' ids)")
    out = Output(fmt.value)
    with out.progress("leakage", unit="chunks") as progress:
        report = run_leakage(db, files, k=k, ef=ef, dedup=dedup, at=at, text_field=text_field, progress=progress)
    for issue in report.issues:
        out.warn(f"skipped {issue}")
    written = write_ids(out_ids, report.duplicates) if out_ids is not None else None
    summary = report.summary(top)
    if written is not None:
        summary["out_ids"] = {"path": str(out_ids), "documents": written}
    if out.json:
        for c in report.chunks:
            out.record(c.to_dict())
        out.record({"summary": summary})
        return
    show_report(out, report, summary, db, k, top)
    if written is not None:
        out.say(Text(f"wrote {written} document id(s) to {out_ids}; remove them with: "
                     f"retrodb delete {db} --ids-file {out_ids}"))


def show_report(out: Output, report, summary: dict, db, k: int, top: int) -> None:
    """Per-file bucket table, the most leaked chunks as wrapped blocks, the near-duplicates (data as text)."""

    from retrodb.overlap import BUCKETS

    def row(name: str, s: dict) -> list:
        return [name, s["chunks"], *s["buckets"].values(), f"{s['share_bytes_r_above_half']:.1%}"]

    rows = [row(label(f), s) for f, s in summary["files"].items()]
    o = summary["overall"]
    rows.append(row("all", o))
    out.table(["file", "chunks", *[b.replace("<=", "≤") for _, b in BUCKETS], "bytes r>.5"], rows,
              title=f"r(C) of {o['chunks']:,} evaluation chunks against {db} @ v{report.version} "
                    f"(k={k})")
    leaked = report.most_leaked(top)
    if leaked:
        out.say(Text("most leaked chunks", style="bold"))
    for c in leaked:
        head = Text(f"r={c.r:.3f}", style="bold yellow")
        head.append(f" ({c.run}/{c.tokens} tokens)  ")
        head.append(label(c.file, 60))
        head.append(f" chunk {c.position} ← ")
        head.append(str(c.doc_id), style="bold")
        head.append(f" (chunk {c.chunk_id})", style="dim")
        print_wrapped(out.out, head, 2)
        print_wrapped(out.out, Text(flat(report.texts[c.file][c.char_start:c.char_end]), style="dim"), 4)
    if report.duplicates is not None:
        if report.duplicates:
            out.table(["doc_id", "near-duplicate of", "Jaccard"],
                      [[d.doc_id, label(d.file), f"{d.jaccard:.3f}"] for d in report.duplicates],
                      title=f"{len(report.duplicates)} database document(s) nearly duplicate an evaluation text "
                            "(MinHash over 13-grams, Jaccard ≥ 0.8)")
        else:
            out.say("no database document nearly duplicates an evaluation text (Jaccard >= 0.8 over 13-grams)")


def register(app: typer.Typer) -> None:
    app.command()(leakage)
