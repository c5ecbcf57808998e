"""`retrodb redact`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ._options import DbArg, DryRunOpt, Format, FormatOpt, WaitOpt, YesOpt
from ._output import Output, confirm


def redact(
    db: DbArg,
    doc_id: Annotated[List[str], typer.Option("--doc-id", help="Remove this document (repeatable).")] = [],
    ids_file: Annotated[Optional[Path], typer.Option("--ids-file", help="Document ids, one per line.")] = None,
    literal: Annotated[List[str], typer.Option("--literal", help="Remove what contains this exact text (repeatable; case-sensitive unless --ignore-case).")] = [],
    regex: Annotated[List[str], typer.Option("--regex", help="Remove what matches this regular expression (RE2 syntax: no look-arounds or back-references).")] = [],
    pii: Annotated[List[str], typer.Option("--pii", help="Built-in detectors, comma-separated: email, phone, ipv4, ipv6, credit-card (Luhn-checked), iban (mod-97-checked).")] = [],
    from_file: Annotated[Optional[Path], typer.Option("--from-file", help="Literals to remove, one per line.")] = None,
    mode: Annotated[str, typer.Option(help="drop: remove every matching document whole; mask: replace each match with --mask-token and re-chunk, re-embed and re-index only those documents.")] = "drop",
    mask_token: Annotated[str, typer.Option(help="Replacement text in --mode mask.")] = "[REDACTED]",
    ignore_case: Annotated[bool, typer.Option("--ignore-case", help="Match --literal, --from-file and --regex in any case.")] = False,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Remove private or harmful text from every file of the database, provably.

    Finds the matching documents with one parallel DuckDB scan over every segment
    that any retained snapshot can reach (tombstoned rows included), shows the plan
    (matches are masked in the samples), then under the writer lock: tombstones them
    (mask mode: adds their masked versions, re-embedded and re-indexed), rewrites every
    affected segment without them (other chunks keep their ids and keys), deletes every
    older snapshot and file that still holds them (redaction overrides retention), checks
    the files it touched, and appends an entry to audit.jsonl (salted hashes, never the
    text). A crash leaves the redaction pending (`verify` says so); rerun `retrodb redact
    DB` to finish it. Prove it with `retrodb verify DB --absent TEXT`.

    [bold]Examples[/]

      retrodb redact my-db --literal "Jane Doe" --dry-run
      retrodb redact my-db --pii email,credit-card --mode mask --yes
      retrodb redact my-db --doc-id leaked-42 --yes --format json
      retrodb verify my-db --absent "Jane Doe" --absent-key
    """
    from retrodb.database import Database
    from retrodb.redact import build_selectors, redact as run_redact

    out = Output(fmt.value)
    pending = (Database(db).snapshot.data.get("pending") or {}).get("redaction")
    nothing = not (doc_id or ids_file or literal or regex or pii or from_file)
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
            confirm(yes, f"redact {plan.plan['documents']:,} document(s) ({mode}) from every file?")
    elif pending and not out.json:
        out.say("finishing the pending redaction")
    report = run_redact(db, selectors, mode=mode, mask_token=mask_token, ignore_case=ignore_case, wait=wait)
    if out.json:
        out.record(report.to_dict())
        return
    out.say(f"committed v{report.version}: redacted {report.plan['documents']:,} document(s) ({mode}), "
            f"rewrote {len(report.compacted_segments)} segment(s), purged {len(report.purged_snapshots)} older "
            f"snapshot(s) and {report.purged_files} file(s); checked {report.checked_files} file(s); "
            f"{report.seconds:.1f}s. Audit entry appended to {db}/audit.jsonl")


def _show_plan(out: Output, plan: dict, dry_run: bool) -> None:
    if out.json:
        if dry_run:
            out.record({**plan, "dry_run": True})
        return
    out.kv([("mode", plan["mode"]), ("documents", f"{plan['documents']:,}"), ("chunks", f"{plan['chunks']:,}"),
            ("segments", ", ".join(plan["segments"]) or "-")], title="redaction plan")
    for line in plan["samples"]:
        out.say(f"  {line}")
    if dry_run:
        out.say("dry run: nothing changed")


def register(app: typer.Typer) -> None:
    app.command()(redact)
