import random

import pytest

from retrodb.pii import DETECTORS, find, luhn_ok


def spans(name, text):
    return [text[a:b] for a, b in find(DETECTORS[name], text)]


def test_email():
    assert spans("email", "write to jane.doe+x@mail.example.co.uk today") == ["jane.doe+x@mail.example.co.uk"]
    assert spans("email", "no at sign here, or a@b") == []


def test_credit_cards_are_luhn_checked():
    text = "paid with 4111 1111 1111 1111, then 4111-1111-1111-1112 and 378282246310005"
    assert spans("credit-card", text) == ["4111 1111 1111 1111", "378282246310005"]
    r = random.Random(0)
    runs = ["".join(r.choice("0123456789") for _ in range(16)) for _ in range(200)]
    found = [x for x in runs if spans("credit-card", f"id {x} end")]
    assert found == [x for x in runs if luhn_ok(x)]  # only Luhn-valid runs, about one in ten
    assert len(found) < 40


def test_ip_addresses():
    assert spans("ipv4", "hosts 10.0.0.1 and 256.1.1.1 and version 3.11.7") == ["10.0.0.1"]
    assert spans("ipv6", "at 2001:db8::8a2e:370:7334 at 12:30:45") == ["2001:db8::8a2e:370:7334"]


def test_iban_checksum():
    assert spans("iban", "pay GB82 WEST 1234 5698 7654 32 now") == ["GB82 WEST 1234 5698 7654 32"]
    assert spans("iban", "pay GB83 WEST 1234 5698 7654 32 now") == []


@pytest.mark.parametrize("text,expected", [("call +44 20 7946 0958 now", ["+44 20 7946 0958"]),
                                           ("call (555) 123-4567", ["(555) 123-4567"]),
                                           ("in 2024 we", [])])
def test_phone(text, expected):
    assert spans("phone", text) == expected


def test_patterns_are_valid_in_duckdb():
    import duckdb

    con = duckdb.connect()
    for d in DETECTORS.values():
        con.execute("SELECT regexp_matches('x', ?)", [d.pattern]).fetchall()
