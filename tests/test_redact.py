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
    report = redact(root, build_selectors(**selector))
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
    report = redact(root, build_selectors(literals=[PHRASE]))
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
    assert "not a valid regular expression" in cli("redact", root, "--regex", "(", "--yes").err


@pytest.mark.parametrize("kill_at", ["redact.started", "compact.chunks_written", "redact.compacted",
                                     "redact.snapshots_purged", "redact.files_purged", "commit.before_current#3"])
def test_kill9_mid_redaction_then_rerun_finishes(tmp_path, kill_at):
    root = build(tmp_path / "db")
    proc = run_retrodb("redact", root, "--literal", PHRASE, "--yes", env={"RETRODB_KILL_AT": kill_at})
    assert proc.returncode == -9
    report = verify(root)
    if kill_at != "commit.before_current#3":  # before the first commit nothing happened yet
        assert not report.ok and any("redaction incomplete" in f.message for f in report.errors)
    assert PHRASE not in " ".join(str(f.to_dict()) for f in report.findings)
    proc = run_retrodb("redact", root, "--literal", PHRASE, "--yes", "--format", "json")
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
