"""`retrodb redact`: privacy removal that leaves nothing behind.

Selection runs in DuckDB over the snapshot's Parquet text (parallel scan,
RE2 regexes); Python only looks at the candidate documents, to find exact
spans and validate PII candidates (Luhn, mod-97). Execution, all under one
writer lock: (1) tombstone the matched documents (and, in mask mode, add
their masked versions as a new segment) and record a pending redaction in
the snapshot; (2) compact every affected segment, physically without the
removed rows, keys carried over; (3) purge every older snapshot and file that
still holds removed rows, whatever the retention; (4) check the touched
files for the removed strings; (5) commit with the pending mark cleared and
append an audit entry. A crash anywhere leaves a consistent database whose
`verify` reports the redaction as incomplete; rerunning `redact` finishes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import RetrodbError
from .pii import DETECTORS, find as find_pii

MODES = ("drop", "mask")
AUDIT_LOG = "audit.jsonl"
AUDIT_SALT = "audit.salt"
DEFAULT_MASK = "[REDACTED]"
SAMPLE_CONTEXT = 40


@dataclass
class Selector:
    kind: str  # doc-id | literal | regex | pii
    value: str  # the id, literal, pattern or detector name

    def describe_for_audit(self, salt: bytes) -> dict:
        if self.kind == "pii":
            return {"kind": "pii", "detector": self.value}
        if self.kind == "doc-id":
            return {"kind": "doc-id"}
        # never the literal or pattern itself: a slow salted hash, enough to match a later request
        digest = hashlib.pbkdf2_hmac("sha256", self.value.encode(), salt, 200_000).hex()
        return {"kind": self.kind, "pbkdf2_sha256": digest}


def build_selectors(doc_ids=(), literals=(), regexes=(), pii=(), from_file: str | Path | None = None,
                    ids_file: str | Path | None = None) -> list[Selector]:
    sel = [Selector("doc-id", d) for d in doc_ids]
    if ids_file:
        sel += [Selector("doc-id", d) for d in _lines(ids_file)]
    sel += [Selector("literal", t) for t in literals]
    if from_file:
        sel += [Selector("literal", t) for t in _lines(from_file)]
    for pattern in regexes:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RetrodbError(f"--regex {pattern!r} is not a valid regular expression: {exc}") from None
        sel.append(Selector("regex", pattern))
    for name in pii:
        for n in (x.strip() for x in name.split(",")):
            if n and n not in DETECTORS:
                raise RetrodbError(f"unknown PII detector {n!r}; choose from {', '.join(DETECTORS)}")
            if n:
                sel.append(Selector("pii", n))
    if not sel:
        raise RetrodbError("nothing selected", hint="give --doc-id, --ids-file, --literal, --regex, --pii or --from-file")
    for s in sel:
        if s.kind in ("literal", "doc-id") and not s.value:
            raise RetrodbError(f"empty {s.kind} selector")
    return sel


def _lines(path: str | Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RetrodbError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RetrodbError(f"{path} is not UTF-8 text") from None
    return [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]


@dataclass
class Match:
    segment: str
    doc_id: str
    first_chunk_id: int
    num_chunks: int
    num_tokens: int
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # start, end, selector kind (text selectors)
    whole: bool = False  # selected by id


@dataclass
class RedactionPlan:
    mode: str
    matches: list[Match]
    samples: list[str]
    texts: dict[str, str] = field(repr=False, default_factory=dict)  # doc_id -> text (mask mode, verification)

    @property
    def documents(self) -> int:
        return len(self.matches)

    @property
    def chunks(self) -> int:
        return sum(m.num_chunks for m in self.matches)

    @property
    def segments(self) -> list[str]:
        return sorted({m.segment for m in self.matches})

    def matched_strings(self) -> list[str]:
        """The distinct removed strings (text selectors), for checking their absence afterwards."""
        out = set()
        for m in self.matches:
            text = self.texts.get(m.doc_id, "")
            out.update(text[a:b] for a, b, _ in m.spans)
        return sorted(s for s in out if s)

    def summary(self) -> dict:
        return {"mode": self.mode, "documents": self.documents, "chunks": self.chunks, "segments": self.segments,
                "samples": self.samples}


def _sql_condition(sel: Selector, ignore_case: bool) -> tuple[str, list]:
    if sel.kind == "literal":
        return ("contains(lower(text), lower(?))", [sel.value]) if ignore_case else ("contains(text, ?)", [sel.value])
    pattern = sel.value if sel.kind == "regex" else DETECTORS[sel.value].pattern
    return ("regexp_matches(text, ?, 'i')", [pattern]) if ignore_case and sel.kind == "regex" \
        else ("regexp_matches(text, ?)", [pattern])


def _spans(sel: Selector, text: str, ignore_case: bool) -> list[tuple[int, int, str]]:
    if sel.kind == "literal":
        flags = re.IGNORECASE if ignore_case else 0
        return [(m.start(), m.end(), sel.kind) for m in re.finditer(re.escape(sel.value), text, flags)]
    if sel.kind == "regex":
        flags = re.IGNORECASE if ignore_case else 0
        return [(m.start(), m.end(), sel.kind) for m in re.finditer(sel.value, text, flags) if m.end() > m.start()]
    if sel.kind == "pii":
        return [(a, b, sel.value) for a, b in find_pii(DETECTORS[sel.value], text)]
    return []


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for a, b, k in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b), out[-1][2])
        else:
            out.append((a, b, k))
    return out


def plan_redaction(snapshot, selectors: list[Selector], mode: str = "drop", ignore_case: bool = False,
                   sample_size: int = 5) -> RedactionPlan:
    """Which documents (and spans) the selectors match in `snapshot`; nothing is changed."""
    from .sql import connect

    if mode not in MODES:
        raise RetrodbError(f"unknown --mode {mode!r}; use drop or mask")
    if mode == "mask" and any(s.kind == "doc-id" for s in selectors):
        raise RetrodbError("--mode mask needs text selectors (--literal, --regex, --pii, --from-file)",
                           hint="to remove whole documents by id use --mode drop")
    ids = sorted({s.value for s in selectors if s.kind == "doc-id"})
    text_selectors = [s for s in selectors if s.kind != "doc-id"]
    conds, params = [], []
    if ids:
        conds.append("doc_id IN (SELECT unnest(?::VARCHAR[]))")
        params.append(ids)
    for sel in text_selectors:
        c, p = _sql_condition(sel, ignore_case)
        conds.append(c)
        params += p
    con = connect(snapshot)
    try:  # one parallel scan for all selectors; Python sees only the candidates
        rows = con.execute(
            "SELECT segment, doc_id, first_chunk_id, num_chunks, num_tokens, text FROM documents WHERE "
            + " OR ".join(f"({c})" for c in conds), params).fetchall()
    finally:
        con.close()
    wanted = set(ids)
    matched: dict[str, Match] = {}
    texts: dict[str, str] = {}
    for seg, doc_id, first, n, ntok, text in rows:
        spans = [span for sel in text_selectors for span in _spans(sel, text, ignore_case)]
        if doc_id not in wanted and not spans:
            continue  # a PII candidate that failed validation
        matched[doc_id] = Match(seg, doc_id, first, n, ntok, spans, whole=doc_id in wanted)
        texts[doc_id] = text
    matches = sorted(matched.values(), key=lambda m: (m.segment, m.first_chunk_id))
    for m in matches:
        m.spans = _merge(m.spans)
    samples = []
    for m in matches:
        if m.spans:
            samples.append(_masked_context(texts[m.doc_id], m.spans, 0, m.doc_id))
        if len(samples) >= sample_size:
            break
    return RedactionPlan(mode, matches, samples, texts)


def _masked_context(text: str, spans: list[tuple[int, int, str]], which: int, doc_id: str) -> str:
    """A sample line that shows where a match is without showing it, or any other match near it."""
    a, b, _ = spans[which]
    lo, hi = max(0, a - SAMPLE_CONTEXT), min(len(text), b + SAMPLE_CONTEXT)
    parts, last = [], lo
    for x, y, kind in spans:
        if y <= lo or x >= hi:
            continue
        parts.append(" ".join(text[last:max(x, lo)].split()))
        parts.append(f"«{kind}: {y - x} chars»")
        last = min(y, hi)
    parts.append(" ".join(text[last:hi].split()))
    return f"{doc_id}: …" + " ".join(p for p in parts if p) + "…"


def mask_text(text: str, spans: list[tuple[int, int, str]], token: str) -> str:
    out, last = [], 0
    for a, b, _ in spans:
        out.append(text[last:a])
        out.append(token)
        last = b
    out.append(text[last:])
    return "".join(out)


# ---------------------------------------------------------------- audit log


def audit_salt(root: Path) -> bytes:
    """The database's audit salt (created once; kept out of snapshots)."""
    path = root / AUDIT_SALT
    if not path.exists():
        from .atomic import atomic_write_bytes

        atomic_write_bytes(path, secrets.token_hex(32).encode())
    return path.read_bytes().strip()


def doc_id_hash(salt: bytes, doc_id: str) -> str:
    return hmac.new(salt, doc_id.encode(), hashlib.sha256).hexdigest()


def append_audit(root: Path, entry: dict) -> None:
    """Append one JSON line to the audit log and fsync it (O_APPEND: earlier lines are never rewritten)."""
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(root / AUDIT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def audit_entry(root: Path, plan: RedactionPlan, selectors: list[Selector], ignore_case: bool,
                version_before: int, version_after: int) -> dict:
    salt = audit_salt(root)
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": plan.mode,
        "ignore_case": ignore_case,
        "selectors": [s.describe_for_audit(salt) for s in selectors],
        "documents": plan.documents,
        "chunks": plan.chunks,
        "segments": plan.segments,
        "doc_id_hashes": sorted(doc_id_hash(salt, m.doc_id) for m in plan.matches),
        "version_before": version_before,
        "version_after": version_after,
    }
