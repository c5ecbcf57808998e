"""Patterns for `retrodb redact`: one regex engine (RE2) and the built-in PII detectors.

Selection runs in DuckDB, whose regexes are RE2; spans are found in Python with
`google-re2`, the same engine, so a pattern means the same thing on both sides
(`\\w`, `\\d`, `\\b` are ASCII-only, `\\pL` is any letter, POSIX classes such as
`[[:digit:]]` work, no look-arounds or back-references) and every match runs in
time linear in the text. The two RE2 builds differ in one thing: their Unicode
tables (DuckDB's is Unicode 15.0, google-re2's 15.1), so a pattern with a Unicode
property class (`\\pL`) is matched by Python alone, and the email detector gives
DuckDB a superset pattern. tests/test_pii.py proves the two sides agree on random
Unicode text for every other pattern, and that the superset holds.

A detector is an RE2 candidate pattern (DuckDB finds candidate documents with it,
Python finds candidate spans) plus a check that keeps the real ones, trying
shorter sub-spans of a candidate where a real value can hide inside a longer run
(a card number followed by its expiry date, an IBAN followed by a BIC):
- email: `email-validator` (internationalised domains and local parts);
- phone: `phonenumbers`: numbers with a country code (+44 ..., 0044 ...) are valid
  numbers of that country; numbers without one are checked as US/Canada and UK
  numbers and must be written with separators (415-555-2671, (415) 555-2671,
  020 7946 0958), so bare digit runs (ids, timestamps) are not taken for phones;
- credit-card: `python-stdnum`'s Luhn check, 13-19 digits, a known issuer prefix;
- iban: `python-stdnum` (country format, length and mod-97);
- ipv4 / ipv6: `ipaddress`, and not part of a longer dotted or hex run.
Each check costs a bounded amount per candidate and candidates do not overlap, so
a detector is linear in the text (tests run each on 1 MB adversarial inputs).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

Span = tuple[int, int]


# ---------------------------------------------------------------- the engine


class PatternError(ValueError):
    """A pattern RE2 (hence DuckDB) cannot run; `str()` says why."""


def _escapes(pattern: str) -> set[str]:
    """The characters that follow a backslash in `pattern` (escaped backslashes skipped)."""
    out, i = set(), 0
    while i < len(pattern) - 1:
        if pattern[i] == "\\":
            out.add(pattern[i + 1])
            i += 2
        else:
            i += 1
    return out


def _unsupported(pattern: str) -> str | None:
    """Why RE2 would run `pattern` but we must not: `\\C` matches one byte, which can split a character."""
    if "C" in _escapes(pattern):
        return "\\C (any single byte) can split a UTF-8 character; use . instead"
    return None


@lru_cache(maxsize=256)
def compile_re2(pattern: str, ignore_case: bool = False):
    """`pattern` compiled by RE2 as DuckDB compiles it (UTF-8, Perl classes, case-sensitive unless asked)."""
    import re2

    why = _unsupported(pattern)
    if why:
        raise PatternError(why)
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = not ignore_case
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise PatternError(msg.decode() if isinstance(msg, bytes) else str(msg)) from None


def uses_unicode_classes(pattern: str) -> bool:
    """Whether `pattern` uses a Unicode property class (\\pL, \\p{Han}, \\PN). RE2's tables for those follow
    the Unicode version it was built with: DuckDB's RE2 (Unicode 15.0) and google-re2 (15.1) disagree on the
    627 characters 15.1 added, so such a pattern is never left to DuckDB to select with."""
    return bool(_escapes(pattern) & {"p", "P"})


def literal_pattern(text: str) -> str:
    """An RE2 pattern matching exactly `text`."""
    import re2

    return re2.escape(text)


def json_variants(text: str) -> list[str]:
    """`text`, and the form it takes inside a JSON string (metadata is stored as JSON text: a quote, a backslash
    or a control character is escaped there) when that differs."""
    import json

    escaped = json.dumps(text, ensure_ascii=False)[1:-1]
    return [text] if escaped == text else [text, escaped]


def finditer_spans(pattern: str, text: str, ignore_case: bool = False) -> list[Span]:
    """Non-empty, non-overlapping leftmost matches of `pattern` in `text` (character offsets)."""
    return [m.span() for m in compile_re2(pattern, ignore_case).finditer(text) if m.end() > m.start()]


# ---------------------------------------------------------------- checks


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _groups(text: str, a: int, b: int, seps: str) -> list[tuple[int, int]]:
    """(start, end) of the runs between separator characters in text[a:b]."""
    out, start = [], a
    for i in range(a, b):
        if text[i] in seps:
            if i > start:
                out.append((start, i))
            start = i + 1
    if b > start:
        out.append((start, b))
    return out


FILE_SUFFIXES = frozenset("png jpg jpeg gif svg webp ico css js ts py json txt pdf md".split())  # icon@2x.png


def _email(text: str, a: int, b: int) -> list[Span]:
    from email_validator import EmailNotValidError, validate_email

    while a < b and text[a] in ".-+%_":  # a run of separators before the address is not part of it
        a += 1
    tld = text[text.rindex(".", a, b) + 1:b]
    if len(tld) < 2 or tld.lower() in FILE_SUFFIXES:
        return []
    at = text.index("@", a, b)
    if at - a > 64:  # a long run glued to the address (base64, a URL): the local part is at most 64 characters
        a = at - 64
        while a < at and text[a] in ".-+%_":
            a += 1
    try:
        validate_email(text[a:b], check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return []
    return [(a, b)]


PHONE_REGIONS = ("US", "GB")  # numbers without a country code are checked as numbers of these regions


def _phone(text: str, a: int, b: int) -> list[Span]:
    """A valid number: the whole candidate, or (with a country code) its longest valid prefix of whole groups
    (`+1 415 555 2671 2672` holds `+1 415 555 2671`)."""
    if a > 0 and (_word_char(text[a - 1]) or text[a - 1] in "+-./"):
        return []
    international = text.startswith(("+", "00"), a)
    ends = [b] + ([i for i in range(b - 1, a, -1) if text[i] == " " and text[i - 1].isdigit()] if international else [])
    for end in ends:
        if (end < len(text) and _word_char(text[end])) or \
                (end + 1 < len(text) and text[end] in "-./" and text[end + 1].isdigit()):  # a date, an id
            continue
        if _phone_ok(text[a:end], international):
            return [(a, end)]
    return []


def _phone_ok(candidate: str, international: bool) -> bool:
    import phonenumbers

    digits = "".join(ch for ch in candidate if ch.isdigit())
    if not 7 <= len(digits) <= 15:
        return False
    if international:
        regions: tuple = (None,)
        candidate = "+" + candidate[2:] if candidate.startswith("00") else candidate
    elif not any(ch in candidate for ch in " -.()"):
        return False
    elif not (len(digits) == 10 and digits[0] in "23456789" or len(digits) == 11 and digits[0] == "1"
              or digits[0] == "0" and len(digits) in (10, 11)):  # the shapes of US/Canada and UK numbers
        return False
    else:
        regions = PHONE_REGIONS
    for region in regions:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


_CARD_PREFIXES = (("4",), ("51", "52", "53", "54", "55") + tuple(str(n) for n in range(2221, 2721)), ("34", "37"),
                  ("6011", "65") + tuple(str(n) for n in range(644, 650)) + tuple(str(n) for n in range(3528, 3590)),
                  ("300", "301", "302", "303", "304", "305", "36", "38", "39", "62", "50")
                  + tuple(str(n) for n in range(56, 70)))
CARD_PREFIXES = tuple(p for group in _CARD_PREFIXES for p in group)  # Visa, Mastercard, Amex, Discover/JCB, others


def _card_ok(digits: str) -> bool:
    from stdnum import luhn

    return 13 <= len(digits) <= 19 and digits.startswith(CARD_PREFIXES) and luhn.is_valid(digits)


def _card(text: str, a: int, b: int) -> list[Span]:
    """Valid card numbers in a run of digit groups: from each group on, the longest valid run of whole groups
    (so `4111 1111 1111 1111 12/27` yields the card without the expiry month), then again after it."""
    groups = _groups(text, a, b, " -")
    out, i = [], 0
    while i < len(groups):
        found = None
        if text[groups[i][0]] not in "23456":  # no issuer prefix starts otherwise
            i += 1
            continue
        for j in range(min(len(groups), i + 10), i, -1):  # 19 digits are at most 10 groups: linear in the run
            if _card_ok("".join(text[s:e] for s, e in groups[i:j])):
                found = j
                break
        if found is None:
            i += 1
            continue
        out.append((groups[i][0], groups[found - 1][1]))
        i = found
    return out


def _iban_length(country: str) -> int | None:
    """The IBAN length of `country` from python-stdnum's registry (None: not an IBAN country)."""
    from stdnum import iban

    try:
        info = iban._ibandb.info(country)[0][1]  # noqa: SLF001 - python-stdnum's country table
    except Exception:  # pragma: no cover - a newer stdnum: check every length instead
        return 0
    bban = info.get("bban")
    return 4 + sum(int(n) for n in re.findall(r"\d+", bban)) if bban else None


def _iban(text: str, a: int, b: int) -> list[Span]:
    from stdnum import iban

    expected = _iban_length(text[a:a + 2])
    if expected is None:
        return []
    n, found = 0, None
    for end in range(a + 1, b + 1):  # the prefix of the country's length (any length when unknown), longest first
        n += text[end - 1] != " "
        if text[end - 1] != " " and (n == expected or not expected and n >= 15) and (end == b or text[end] == " ") \
                and iban.is_valid(text[a:end]):
            found = end
    return [(a, found)] if found else []


def _ipv4(text: str, a: int, b: int) -> list[Span]:
    if a >= 2 and text[a - 1] == "." and text[a - 2].isdigit():
        return []
    if b + 1 < len(text) and text[b] == "." and text[b + 1].isdigit():
        return []
    try:
        ipaddress.IPv4Address(text[a:b])
    except ValueError:
        return []
    return [(a, b)]


def _ipv6(text: str, a: int, b: int) -> list[Span]:
    if (a > 0 and (_word_char(text[a - 1]) or text[a - 1] in ":.")) or (b < len(text) and (_word_char(text[b])
                                                                                         or text[b] == ":")):
        return []
    candidate = text[a:b]
    hexdigits = sum(ch not in ":." for ch in candidate.split("%")[0])
    if hexdigits < 3 and candidate != "::1":  # std::, a::b
        return []
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return []
    return [(a, b)]


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: str  # RE2 candidate pattern (Python)
    check: Callable[[str, int, int], list[Span]]  # (text, candidate start, end) -> validated spans inside it
    about: str  # one line for --help and the README

    @property
    def prefilter(self) -> str:
        """The pattern DuckDB selects candidate documents with: `pattern` itself, or where that uses Unicode
        letter classes, a superset (any non-ASCII character allowed there too), so that no difference between
        the two RE2 builds' Unicode tables can hide a candidate from the scan."""
        return self.pattern.replace(r"\p{L}\p{N}", r"\p{L}\p{N}\x{80}-\x{10FFFF}")


_HEX = "[0-9A-Fa-f]"
_L = r"\p{L}\p{N}"
DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("email", rf"[{_L}._%+-]+@[{_L}](?:[{_L}-]*[{_L}])?(?:\.[{_L}](?:[{_L}-]*[{_L}])?)+", _email,
             "email addresses, internationalised domains included (email-validator)"),
    Detector("phone", r"(?:\+|\b00)[1-9][0-9 ().\-/]{5,20}[0-9]"
                      r"|(?:\b1[ .\-])?(?:\([0-9]{2,5}\)[ .\-]?|\b[0-9]{2,5}[ .\-])[0-9]{3,4}[ .\-]?[0-9]{3,4}\b",
             _phone, "phone numbers with a country code, or US/UK numbers with separators (phonenumbers)"),
    Detector("ipv4", r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b", _ipv4, "IPv4 addresses"),
    Detector("ipv6", rf"{_HEX}{{0,4}}(?::{_HEX}{{0,4}}){{2,7}}(?:(?:\.[0-9]{{1,3}}){{3}})?(?:%[0-9A-Za-z._-]+)?",
             _ipv6, "IPv6 addresses"),
    Detector("credit-card", r"\b[0-9]{4}(?:[ -]?[0-9]{2,6})+\b", _card,
             "card numbers: 13-19 digits, Luhn-checked, known issuer prefix (python-stdnum)"),
    Detector("iban", r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", _iban,
             "IBANs: country format and mod-97 (python-stdnum)"),
)}


def find(detector: Detector, text: str) -> list[Span]:
    """Validated spans of `detector` in `text` (character offsets), in order."""
    out: list[Span] = []
    for a, b in finditer_spans(detector.pattern, text):
        out.extend(detector.check(text, a, b))
    return out
