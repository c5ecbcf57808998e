"""Redaction: planted secrets leave every file, untouched documents keep ids and keys, crashes finish on rerun."""

import json

import pytest

import retrodb
from retrodb.absent import scan_absent
from retrodb.redact import build_selectors, redact
from retrodb.errors import RetrodbError
from retrodb.verify import verify
from tests.conftest import make_text, run_retrodb
from tests.edit_helpers import keys_by_chunk

EMAIL = "jane.roe@example.org"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
PHRASE = "purple elephant whispers at midnight"
SECRETS = {3: f"Write to {EMAIL} today.", 7: f"Call {PHONE} after six.", 11: f"Card {CARD} on file.",
           15: f"They said {PHRASE} again.", 19: f"Also {EMAIL} and {PHRASE}."}


def build(root, n=24, index=True):
    from retrodb.embed import embed
    from retrodb.index import index as run_index
    from retrodb.ingest import IngestOptions, ingest

    src = root.parent / "src.jsonl"
    with open(src, "w") as f:
        for i in range(n):
            text = make_text(i, 60) + (" " + SECRETS[i] + " " + make_text(500 + i, 20) if i in SECRETS else "")
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    ingest(root, [str(src)], IngestOptions(workers=1, segment_bytes=2500))
    embed(root, "hash:32")
    if index:
        run_index(root, M=8, ef_construction=40, threads=1)
    return root


def chunk_ids_by_doc(root):
    rows = retrodb.open(root).sql("SELECT doc_id, list(chunk_id ORDER BY chunk_id) AS ids FROM chunks GROUP BY 1")
    return {r["doc_id"]: r["ids"] for r in rows.to_pylist()}


def assert_absent(root, *texts, keys=False):
    db = retrodb.open(root)
    emb = None
    if keys:
        from retrodb.embedder import embedder_for

        emb = embedder_for(db.config)
    hits = scan_absent(root, list(texts), tokenizer_path=db.config["tokenizer"]["path"], check_keys=keys,
                       embedder=emb)
    assert hits == []


@pytest.mark.parametrize("selector,removed,secret", [
    (dict(pii=["email"]), {"d3", "d19"}, EMAIL),
    (dict(pii=["phone"]), {"d7"}, PHONE),
    (dict(pii=["credit-card"]), {"d11"}, CARD),
    (dict(literals=[PHRASE]), {"d15", "d19"}, PHRASE),
    (dict(regexes=[r"purple\s+elephant"]), {"d15", "d19"}, PHRASE),
    (dict(doc_ids=["d7"]), {"d7"}, PHONE),
])
def test_drop_mode_removes_documents_from_every_file(tmp_path, selector, removed, secret):
    root = build(tmp_path / "db")
    before_ids, before_keys = chunk_ids_by_doc(root), keys_by_chunk(root)
    assert scan_absent(root, [secret])  # planted: the scanner does see it before
    report = redact(root, build_selectors(**selector), mode="drop")
    assert report.plan["documents"] == len(removed)
    after = chunk_ids_by_doc(root)
    assert set(before_ids) - set(after) == removed
    for doc, ids in after.items():  # untouched documents keep chunk ids and keys byte for byte
        assert ids == before_ids[doc]
    after_keys = keys_by_chunk(root)
    assert all(after_keys[c] == before_keys[c] for c in after_keys)
    assert_absent(root, secret, keys=True)
    for n in retrodb.open(root).query(secret, k=8, exact=True)[0].neighbours:
        assert secret not in n.text and n.doc_id not in removed
    audit = (root / "audit.jsonl").read_text()
    assert secret not in audit and not any(f"\"{d}\"" in audit for d in removed)  # ids only as salted hashes
    entry = json.loads(audit.splitlines()[-1])
    assert entry["documents"] == len(removed) and len(entry["doc_id_hashes"]) == len(removed)
    assert verify(root).ok


def test_mask_mode_keeps_the_rest_of_the_document(tmp_path):
    root = build(tmp_path / "db")
    before_ids = chunk_ids_by_doc(root)
    report = redact(root, build_selectors(pii=["email", "credit-card"], literals=[PHRASE]), mode="mask",
                    mask_token="[GONE]")
    assert report.masked_documents == 4
    db = retrodb.open(root)
    texts = {r["doc_id"]: r["text"] for r in db.sql("SELECT doc_id, text FROM documents").to_pylist()}
    assert len(texts) == 24
    assert texts["d19"].count("[GONE]") == 2 and "Also [GONE] and [GONE]." in texts["d19"]
    assert "Card [GONE] on file." in texts["d11"] and PHONE in texts["d7"]  # phone was not selected
    after = chunk_ids_by_doc(root)
    for doc in ("d3", "d11", "d15", "d19"):
        assert set(after[doc]).isdisjoint(before_ids[doc])  # re-chunked as new chunks
    for doc in set(after) - {"d3", "d11", "d15", "d19"}:
        assert after[doc] == before_ids[doc]
    assert_absent(root, EMAIL, CARD, PHRASE, keys=True)
    # the masked documents were re-embedded and re-indexed: the index finds them
    row = db.sql("SELECT c.chunk_id, d.text[c.char_start + 1:c.char_end] AS t FROM chunks c JOIN documents d "
                 "USING (doc_id) WHERE doc_id = 'd11' AND t LIKE '%[GONE]%'").to_pylist()[0]
    assert db.query(row["t"], k=1, ef=200)[0].neighbours[0].chunk_id == row["chunk_id"]
    assert verify(root).ok


def test_old_snapshots_and_tombstoned_copies_are_purged(tmp_path):
    from retrodb.add import add
    from retrodb.compact import compact
    from retrodb.delete import delete

    root = build(tmp_path / "db")
    # a replaced older version of d15 stays physically in its segment, tombstoned
    src = tmp_path / "fix.jsonl"
    src.write_text(json.dumps({"id": "d15", "text": make_text(15, 60)}) + "\n")
    add(root, [str(src)], replace=True)
    delete(root, ["d19"])  # d19 deleted: still on disk, still in older snapshots
    compact(root, min_deleted_ratio=0.0)  # old segments now only referenced by older snapshots
    assert scan_absent(root, [PHRASE])
    v_before = retrodb.open(root).version
    report = redact(root, build_selectors(literals=[PHRASE]), mode="drop")
    assert report.plan["documents"] == 2 and report.purged_snapshots
    assert_absent(root, PHRASE, keys=True)
    assert retrodb.open(root).sql("SELECT count(*) FROM documents WHERE doc_id = 'd15'").column(0)[0].as_py() == 1
    with pytest.raises(RetrodbError, match="not retained"):
        retrodb.open(root, at=v_before - 1)


def test_dry_run_changes_nothing_and_masks_the_sample(tmp_path, cli):
    root = build(tmp_path / "db", index=False)
    version = retrodb.open(root).version
    r = cli("redact", root, "--pii", "email", "--literal", PHRASE, "--dry-run", "--format", "json")
    assert r.code == 0
    plan = r.json_lines()[0]
    assert plan["dry_run"] and plan["documents"] == 3 and plan["segments"]
    assert EMAIL not in r.out and PHRASE not in r.out and "«email: 20 chars»" in r.out
    human = cli("redact", root, "--literal", PHRASE, "--dry-run")
    assert PHRASE not in human.out and "dry run" in human.out
    assert retrodb.open(root).version == version and scan_absent(root, [PHRASE])
    refused = cli("redact", root, "--literal", PHRASE)  # not a terminal: --yes required
    assert refused.code == 1 and "--yes" in refused.err


def test_cli_redact_and_verify_absent(tmp_path, cli):
    root = build(tmp_path / "db")
    assert cli("verify", root, "--absent", EMAIL).code == 1
    r = cli("redact", root, "--pii", "email", "--yes", "--format", "json")
    assert r.code == 0 and r.json_lines()[0]["plan"]["documents"] == 2
    ok = cli("verify", root, "--absent", EMAIL, "--absent-key", "--format", "json")
    assert ok.code == 0 and ok.json_lines()[0]["ok"]
    bad = cli("verify", root, "--absent", make_text(5, 60)[:60])
    assert bad.code == 1 and "absent text #1 found" in bad.err


def test_errors(tmp_path, cli):
    root = build(tmp_path / "db", index=False)
    assert "nothing selected" in cli("redact", root, "--yes").err
    assert "unknown PII detector" in cli("redact", root, "--pii", "ssn", "--yes").err
    assert "mask needs text selectors" in cli("redact", root, "--doc-id", "d1", "--mode", "mask", "--yes").err
    assert "not a valid RE2 regular expression" in cli("redact", root, "--regex", "(", "--yes").err


@pytest.mark.parametrize("kill_at", ["redact.started", "compact.chunks_written", "redact.compacted",
                                     "redact.snapshots_purged", "redact.files_purged", "commit.before_current#3"])
def test_kill9_mid_redaction_then_rerun_finishes(tmp_path, kill_at):
    root = build(tmp_path / "db")
    proc = run_retrodb("redact", root, "--literal", PHRASE, "--mode", "drop", "--yes", env={"RETRODB_KILL_AT": kill_at})
    assert proc.returncode == -9
    report = verify(root)
    if kill_at != "commit.before_current#3":  # before the first commit nothing happened yet
        assert not report.ok and any("redaction incomplete" in f.message for f in report.errors)
    assert PHRASE not in " ".join(str(f.to_dict()) for f in report.findings)
    proc = run_retrodb("redact", root, "--literal", PHRASE, "--mode", "drop", "--yes", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert verify(root).ok
    assert_absent(root, PHRASE, keys=True)
    docs = {r["doc_id"] for r in retrodb.open(root).sql("SELECT doc_id FROM documents").to_pylist()}
    assert docs == {f"d{i}" for i in range(24)} - {"d15", "d19"}
    assert len((root / "audit.jsonl").read_text().splitlines()) == 1


def test_file_selectors_ignore_case_and_absent_file(tmp_path, cli):
    root = build(tmp_path / "db", index=False)
    literals = tmp_path / "literals.txt"
    literals.write_text(PHRASE.upper() + "\n\n")
    ids = tmp_path / "ids.txt"
    ids.write_text("d7\n")
    assert redact(root, build_selectors(from_file=literals)).plan["documents"] == 0  # case-sensitive by default
    report = redact(root, build_selectors(from_file=literals, ids_file=ids), ignore_case=True)
    assert report.plan["documents"] == 3  # d15, d19 by the phrase in any case, d7 by id
    docs = {r["doc_id"] for r in retrodb.open(root).sql("SELECT doc_id FROM documents").to_pylist()}
    assert not docs & {"d7", "d15", "d19"} and len(docs) == 21
    absent = tmp_path / "absent.txt"
    absent.write_text(f"{PHRASE}\n{PHONE}\n")
    ok = cli("verify", root, "--absent-file", absent, "--format", "json")
    assert ok.code == 0 and ok.json_lines()[0]["ok"], ok.out
    assert cli("verify", root, "--absent", EMAIL).code == 1  # d3 was not selected: still there


# ---------------------------------------------------------------- issue 9: every column, every resume, one engine

ADDR = "jane@example.org"


def build_columns(root, extra=()):
    """Matches in text, metadata, the id and the source of documents (no keys: fast)."""
    from retrodb.ingest import IngestOptions, ingest

    src = root.parent / f"from-{ADDR}.jsonl"
    rows = [{"id": "doc-a", "text": f"Please email {ADDR} today. " + make_text(1, 30), "author": ADDR},
            {"id": ADDR, "text": "A document whose id is an address. " + make_text(2, 30)},
            *({"id": f"p{i}", "text": make_text(10 + i, 30), "lang": "en"} for i in range(6)), *extra]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ingest(root, [str(src)], IngestOptions(workers=1))
    return root


def test_mask_covers_metadata_id_and_source(tmp_path, cli):
    from retrodb.redact import audit_key, audit_salt, redacted_id

    root = build_columns(tmp_path / "db")
    plan = cli("redact", root, "--pii", "email", "--dry-run", "--format", "json").json_lines()[0]
    assert plan["mode"] == "mask" and plan["documents"] == 8  # every document's source names the file
    assert plan["columns"] == {"text": 1, "metadata": 1, "doc_id": 1, "source": 8}
    assert plan["cost"]["mask"]["ids_replaced_by_salted_hash"] == 1 and plan["cost"]["drop"]["documents_removed"] == 8
    r = cli("redact", root, "--pii", "email", "--yes", "--format", "json")
    assert r.code == 0, r.err
    report = r.json_lines()[0]
    assert report["plan"]["mode"] == "mask" and report["checked_needles"] >= 2
    assert cli("verify", root, "--absent", ADDR).code == 0
    assert verify(root).ok
    db = retrodb.open(root)
    rows = {r["doc_id"]: r for r in db.sql("SELECT doc_id, text, metadata, source FROM documents").to_pylist()}
    assert len(rows) == 8 and ADDR not in rows
    new_id = redacted_id(audit_key(audit_salt(root)), ADDR)
    assert new_id in rows and rows[new_id]["text"].startswith("A document whose id is an address.")
    assert json.loads(rows["doc-a"]["metadata"]) == {"author": "[REDACTED]"}
    assert "Please email [REDACTED] today." in rows["doc-a"]["text"]
    assert all("[REDACTED]" in r["source"] and ADDR not in r["source"] for r in rows.values())


def test_drop_removes_documents_matched_in_any_column(tmp_path):
    root = build_columns(tmp_path / "db")
    report = redact(root, build_selectors(literals=[ADDR + ".jsonl"]), mode="drop")  # only in sources
    assert report.plan["documents"] == 8 and report.plan["columns"]["source"] == 8
    assert retrodb.open(root).stats()["documents"] == 0


def test_metadata_match_that_cuts_json_removes_the_metadata(tmp_path):
    root = build_columns(tmp_path / "db")
    redact(root, build_selectors(literals=['"lang": "en'], regexes=[r'[{]"author']))
    metas = [r["metadata"] for r in retrodb.open(root).sql("SELECT metadata FROM documents").to_pylist()]
    assert all(m is None or '"lang": "en' not in m for m in metas)
    assert all(m is None or json.loads(m) is not None for m in metas)
    assert verify(root).ok


@pytest.mark.parametrize("kill_at", ["redact.started", "redact.compacted", "redact.files_purged", "redact.checked",
                                     "redact.audited"])
def test_resumed_redaction_checks_reports_its_mode_and_audits_once(tmp_path, kill_at):
    root = build_columns(tmp_path / "db")
    proc = run_retrodb("redact", root, "--pii", "email", "--yes", env={"RETRODB_KILL_AT": kill_at})
    assert proc.returncode == -9
    assert any("redaction incomplete" in f.message for f in verify(root).errors)
    proc = run_retrodb("redact", root, "--yes", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.decode().splitlines()[-1])
    assert report["resumed"] and report["plan"]["mode"] == "mask" and report["plan"]["documents"] == 8
    if kill_at not in ("redact.checked", "redact.audited"):  # those runs had checked before the kill
        assert report["checked_needles"] >= 2
    assert verify(root).ok and cli_absent_ok(root)
    audit = [json.loads(x) for x in (root / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 1 and audit[0]["mode"] == "mask"
    assert not (root / "redact-check.json").exists()


def cli_absent_ok(root):
    return verify(root, extra=[("absent", __import__("retrodb.redact", fromlist=["absent_check"])
                                .absent_check([ADDR]))]).ok


def test_pending_redaction_never_closes_while_the_text_is_on_disk(tmp_path):
    root = build_columns(tmp_path / "db")
    proc = run_retrodb("redact", root, "--pii", "email", "--yes", env={"RETRODB_KILL_AT": "redact.started"})
    assert proc.returncode == -9
    (root / "notes.txt").write_text(f"someone wrote {ADDR} here")  # a copy the redaction must notice
    proc = run_retrodb("redact", root, "--yes")
    assert proc.returncode == 1 and b"redaction check failed" in proc.stderr
    assert any("redaction incomplete" in f.message for f in verify(root).errors)
    assert not (root / "audit.jsonl").exists()
    (root / "notes.txt").unlink()
    proc = run_retrodb("redact", root, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert b"(mask)" in proc.stdout and verify(root).ok


def test_pending_redaction_without_its_check_file_is_refused(tmp_path):
    root = build_columns(tmp_path / "db")
    run_retrodb("redact", root, "--pii", "email", "--yes", env={"RETRODB_KILL_AT": "redact.started"})
    (root / "redact-check.json").unlink()
    with pytest.raises(RetrodbError, match="cannot be finished"):
        redact(root, [])
    assert not verify(root).ok


def test_regex_is_re2_in_selection_and_spans(tmp_path, cli):
    extra = [{"id": "u1", "text": "Herr Müller hat secret42 gesagt."}, {"id": "u2", "text": "MÜLLER und ΣΑΣ"}]
    root = build_columns(tmp_path / "db", extra)
    plan = cli("redact", root, "--regex", "secret[[:digit:]]+", "--dry-run", "--format", "json").json_lines()[0]
    assert plan["documents"] == 1  # POSIX classes: the old Python `re` spans said "nothing matches"
    assert cli("redact", root, "--regex", r"M\wller", "--dry-run", "-f", "json").json_lines()[0]["documents"] == 0
    assert cli("redact", root, r"--regex", r"M\pLller", "--dry-run", "-f", "json").json_lines()[0]["documents"] == 1
    plan = cli("redact", root, "--regex", "müller|σας", "--ignore-case", "--dry-run", "-f", "json").json_lines()[0]
    assert plan["documents"] == 2
    redact(root, build_selectors(regexes=[r"M\pLller", "secret[[:digit:]]+"]))
    text = retrodb.open(root).sql("SELECT text FROM documents WHERE doc_id = 'u1'").column(0)[0].as_py()
    assert text == "Herr [REDACTED] hat [REDACTED] gesagt."


@pytest.mark.parametrize("pattern,says", [(r"(a)\1", "invalid escape sequence"), (r"(?<=a)b", "invalid perl operator"),
                                          ("(", "missing )"), ("x*", "matches the empty string"),
                                          (r"\C", "single byte")])
def test_regex_re2_rejects_is_a_usage_error(tmp_path, cli, pattern, says):
    root = build_columns(tmp_path / "db")
    r = cli("redact", root, "--regex", pattern, "--dry-run")
    assert r.code == 2 and says in r.err and "--regex" in r.err and "internal error" not in r.err, r.err


def test_help_says_regex_is_re2_and_the_default_mode(cli):
    out = " ".join(cli("redact", "--help").out.replace("│", " ").split())
    assert "RE2 regular expression" in out and "ASCII-only" in out and "mask for text selectors" in out


def test_catastrophic_regex_on_a_1mb_document(tmp_path):
    import time

    # DuckDB selects the document (it has "ab" at the end); a backtracking engine then spends forever on the run
    root = build_columns(tmp_path / "db", [{"id": "big", "text": "a" * (1 << 20) + "c, then ab"}])
    started = time.perf_counter()
    plan = redact(root, build_selectors(regexes=["(a+)+b"]), dry_run=True).plan
    assert plan["documents"] >= 1 and plan["columns"]["text"] >= 1
    assert time.perf_counter() - started < 30


def test_from_file_bom_and_thousands_of_lines(tmp_path):
    import time

    root = build_columns(tmp_path / "db")
    lines = [f"not in the corpus {i}" for i in range(3000)]
    f = tmp_path / "literals.txt"
    f.write_bytes(("\ufeff" + ADDR + "\r\n" + "\n".join(lines) + "\n").encode("utf-8"))
    sel = build_selectors(from_file=f)
    assert sel[0].value == ADDR and len(sel) == 3001
    started = time.perf_counter()
    report = redact(root, sel)
    assert report.plan["documents"] == 8  # the first line matches despite the BOM
    assert time.perf_counter() - started < 60  # one key derivation, not 3001 (which took minutes)
    audit = json.loads((root / "audit.jsonl").read_text())
    assert len(audit["selectors"]) == 3001 and ADDR not in json.dumps(audit)


def test_default_mode_and_doc_ids_imply_drop(tmp_path, cli):
    root = build_columns(tmp_path / "db")
    assert cli("redact", root, "--doc-id", "p1", "--dry-run", "-f", "json").json_lines()[0]["mode"] == "drop"
    plan = cli("redact", root, "--doc-id", "p1", "--pii", "email", "--dry-run", "-f", "json").json_lines()[0]
    assert plan["mode"] == "drop" and plan["cost"]["mask"] is None
    human = cli("redact", root, "--pii", "email", "--dry-run")
    assert "drop would" in human.out and "mask would" in human.out and ADDR not in human.out


def test_log_shows_purged_versions(tmp_path, cli):
    from retrodb.delete import delete

    root = build_columns(tmp_path / "db")
    delete(root, ["p1"])
    redact(root, build_selectors(pii=["email"]))
    rows = cli("log", root, "--format", "json").json_lines()
    purged = [r for r in rows if r.get("purged")]
    assert {r["version"]: r["command"] for r in purged} == {1: "ingest", 2: "delete", 3: "redact"}
    assert all(r["created"] for r in purged)
    human = cli("log", root)
    assert "purged" in human.out


def test_mask_token_that_matches_the_selectors_is_refused(tmp_path, cli):
    root = build_columns(tmp_path / "db")
    r = cli("redact", root, "--literal", "RED", "--yes")
    assert r.code == 2 and "--mask-token" in r.err
    assert cli("redact", root, "--literal", "red", "--ignore-case", "--mask-token", "[gone]", "--dry-run").code == 0


def test_literal_with_quotes_in_metadata_is_found_in_its_json_form(tmp_path, cli):
    secret = 'Jane "JD" Doe\\x'
    root = build_columns(tmp_path / "db", [{"id": "q", "text": "plain text here", "note": f"from {secret}, ok"}])
    assert cli("verify", root, "--absent", secret).code == 1  # stored as Jane \"JD\" Doe\\x in the JSON text
    report = redact(root, build_selectors(literals=[secret]))
    assert report.plan["documents"] == 1 and report.plan["columns"]["metadata"] == 1
    meta = retrodb.open(root).sql("SELECT metadata FROM documents WHERE doc_id = 'q'").column(0)[0].as_py()
    assert json.loads(meta) == {"note": "from [REDACTED], ok"}
    assert cli("verify", root, "--absent", secret).code == 0


def test_check_file_of_a_redaction_killed_before_its_first_commit(tmp_path):
    root = build_columns(tmp_path / "db")
    proc = run_retrodb("redact", root, "--pii", "email", "--yes", env={"RETRODB_KILL_AT": "commit.before_manifest#1"})
    assert proc.returncode == -9 and (root / "redact-check.json").exists()
    report = verify(root)
    assert report.ok and any("redact-check.json" == f.path for f in report.warnings)
    redact(root, build_selectors(doc_ids=["p1"]))
    assert not (root / "redact-check.json").exists() and verify(root).ok


def test_unicode_property_classes_are_matched_by_python_over_every_row(tmp_path):
    han = "\U0002EBF0\U0002EBF1"  # Unicode 15.1 letters: DuckDB's RE2 tables do not know them
    root = build_columns(tmp_path / "db", [{"id": "h", "text": f"code: {han} end"}])
    report = redact(root, build_selectors(regexes=[r"code: \pL+"]))
    assert report.plan["documents"] == 1
    assert retrodb.open(root).sql("SELECT text FROM documents WHERE doc_id = 'h'").column(0)[0].as_py() == \
        "[REDACTED] end"
