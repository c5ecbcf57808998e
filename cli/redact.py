"""`retrodb redact`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.text import Text

from ._options import DbArg, DryRunOpt, Format, FormatOpt, WaitOpt, YesOpt, usage_errors
from ._output import Output, confirm

PII_HELP = "Built-in detectors, comma-separated: email, phone, ipv4, ipv6, credit-card, iban (each validated: see README)."


def redact(
    db: DbArg,
    doc_id: Annotated[List[str], typer.Option("--doc-id", help="Remove this document (repeatable; implies --mode drop).")] = [],
    ids_file: Annotated[Optional[Path], typer.Option("--ids-file", help="Document ids, one per line.")] = None,
    literal: Annotated[List[str], typer.Option("--literal", help="Remove this exact text (repeatable; case-sensitive unless --ignore-case).")] = [],
    regex: Annotated[List[str], typer.Option("--regex", help="Remove what matches this RE2 regular expression (the syntax DuckDB uses): no look-arounds or back-references; \\w, \\d and \\b are ASCII-only, \\pL is any letter, [[:digit:]] works. Repeatable.")] = [],
    pii: Annotated[List[str], typer.Option("--pii", help=PII_HELP)] = [],
    from_file: Annotated[Optional[Path], typer.Option("--from-file", help="Literals to remove, one per line (UTF-8, a BOM is ignored).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="mask: replace each match with --mask-token in the text, metadata and source (a matching id becomes a salted hash), then re-chunk, re-embed and re-index only those documents; drop: remove every matching document whole. Default: mask for text selectors, drop with --doc-id/--ids-file.", show_default=False)] = None,
    mask_token: Annotated[str, typer.Option(help="Replacement text in --mode mask.")] = "[REDACTED]",
    ignore_case: Annotated[bool, typer.Option("--ignore-case", help="Match --literal, --from-file and --regex in any case (Unicode simple case folding).")] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Remove private or harmful text from every file of the database, provably.

    Finds the matches in every column that holds user data (text, metadata, doc_id, source)
    with one parallel DuckDB scan over every segment that any retained snapshot can reach
    (tombstoned rows included), shows the plan with what each mode costs (matches are masked
    in the samples), then under the writer lock: tombstones the documents (mask mode: adds
    their masked versions, re-embedded and re-indexed), rewrites every affected segment
    without them (other chunks keep their ids and keys), deletes every older snapshot and
    file that still holds them (redaction overrides retention; `log` lists them as purged),
    checks every file it touched for the removed strings, appends an entry to audit.jsonl
    (salted hashes, never the text) and only then commits. A crash leaves the redaction
    pending (`verify` says so); rerun `retrodb redact DB` to finish it, check included.
    Prove it with `retrodb verify DB --absent TEXT`.

    [bold]Examples[/]

      retrodb redact my-db --literal "Jane Doe" --dry-run
      retrodb redact my-db --pii email,credit-card --yes            # mask (the default for text)
      retrodb redact my-db --regex '[[:digit:]]{3}-[[:digit:]]{4}' --mode drop --yes
      retrodb redact my-db --doc-id leaked-42 --yes --format json   # drop
      retrodb verify my-db --absent "Jane Doe" --absent-key
    """
    from retrodb.database import Database
    from retrodb.redact import build_selectors, pending_summary, redact as run_redact

    out = Output(fmt.value)
    pending = pending_summary(Database(db).snapshot)
    nothing = not (doc_id or ids_file or literal or regex or pii or from_file)
    with usage_errors():
        selectors = [] if nothing and pending else build_selectors(doc_id, literal, regex, pii, from_file, ids_file)
        if selectors:
            plan = run_redact(db, selectors, mode=mode, mask_token=mask_token, ignore_case=ignore_case, dry_run=True)
            _show_plan(out, plan.plan, dry_run)
            if dry_run or not plan.plan["documents"]:
                if not dry_run and not out.json:
                    out.say("nothing matches: nothing to redact" + ("; finishing the pending redaction" if pending else ""))
                if dry_run or not pending:
                    return
            else:
                confirm(yes, f"redact {plan.plan['documents']:,} document(s) ({plan.plan['mode']}) from every file?")
        elif pending and not out.json:
            out.say(f"finishing the pending redaction ({pending['mode']}, {pending['documents']:,} document(s))")
        report = run_redact(db, selectors, mode=mode, mask_token=mask_token, ignore_case=ignore_case, wait=wait)
    if out.json:
        out.record(report.to_dict())
        return
    p = report.plan or {}
    out.say(Text(f"committed v{report.version}: redacted {p.get('documents', 0):,} document(s) ({p.get('mode')})"
                 + (" (finished a pending redaction)" if report.resumed else "")
                 + f", rewrote {len(report.compacted_segments)} segment(s), purged {len(report.purged_snapshots)} "
                 f"older snapshot(s) and {report.purged_files} file(s); checked {report.checked_files} file(s) for "
                 f"{report.checked_needles} removed string(s); {report.seconds:.1f}s. Audit entry appended to "
                 f"{db}/audit.jsonl"))


def _show_plan(out: Output, plan: dict, dry_run: bool) -> None:
    if out.json:
        if dry_run:
            out.record({**plan, "dry_run": True})
        return
    cost = plan["cost"]
    rows = [("mode", plan["mode"]), ("documents", f"{plan['documents']:,}"), ("chunks", f"{plan['chunks']:,}"),
            ("segments", ", ".join(plan["segments"]) or "-"),
            ("matches in", ", ".join(f"{c} ({n:,})" for c, n in plan["columns"].items() if n) or "-"),
            ("drop would", f"remove {cost['drop']['documents_removed']:,} document(s), "
                           f"{cost['drop']['chunks_removed']:,} chunk(s)")]
    m = cost["mask"]
    rows.append(("mask would", "not apply (documents named by id)" if m is None else
                 f"mask {m['documents_masked']:,} document(s) and rewrite their {m['chunks_rewritten']:,} chunk(s); "
                 f"{m['ids_replaced_by_salted_hash']:,} id(s) replaced by a salted hash"))
    out.kv(rows, title="redaction plan")  # counts and segment names only: no data through markup
    for line in plan["samples"]:
        out.say(Text(f"  {line}"))
    if dry_run:
        out.say("dry run: nothing changed")


def register(app: typer.Typer) -> None:
    app.command()(redact)
