"""Built-in PII detectors for `retrodb redact --pii`.

Each detector is an RE2-compatible pattern (so DuckDB can find candidate
documents and spans in its own parallel scan) plus a validator in Python that
runs only on the candidate spans: Luhn for card numbers (random digit runs
do not match), mod-97 for IBANs, octet ranges for IPv4, `ipaddress` for IPv6,
digit counts for phone numbers.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(span: str) -> bool:
    digits = re.sub(r"[ -]", "", span)
    return 13 <= len(digits) <= 19 and digits.isdigit() and luhn_ok(digits)


def _iban(span: str) -> bool:
    s = span.replace(" ", "").upper()
    if not (15 <= len(s) <= 34):
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _ipv4(span: str) -> bool:
    parts = span.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in parts)


def _ipv6(span: str) -> bool:
    if span.count(":") < 2:
        return False
    try:
        ipaddress.IPv6Address(span)
    except ValueError:
        return False
    return True


def _phone(span: str) -> bool:
    digits = re.sub(r"\D", "", span)
    return 7 <= len(digits) <= 15


def _email(span: str) -> bool:
    return True


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: str  # RE2 syntax (DuckDB) and Python re syntax alike
    validate: Callable[[str], bool]


DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", _email),
    Detector("phone", r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{1,4}\)[ .-]?)?[0-9]{2,4}(?:[ .-][0-9]{2,4}){1,4}", _phone),
    Detector("ipv4", r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b", _ipv4),
    Detector("ipv6", r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}", _ipv6),
    Detector("credit-card", r"\b[0-9](?:[ -]?[0-9]){12,18}\b", _card),
    Detector("iban", r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", _iban),
)}


def find(detector: Detector, text: str) -> list[tuple[int, int]]:
    """Validated spans of `detector` in `text` (character offsets)."""
    return [(m.start(), m.end()) for m in re.finditer(detector.pattern, text) if detector.validate(m.group())]
