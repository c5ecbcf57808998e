"""add, delete, compact, vacuum: library functions and their CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import retrodb
from retrodb.add import add
from retrodb.compact import compact, plan_compaction
from retrodb.delete import delete, plan_delete
from retrodb.errors import BadInput, DatabaseNotFound, RetrodbError
from retrodb.ingest import IngestOptions
from retrodb.vacuum import parse_duration, plan_vacuum, vacuum
from retrodb.verify import verify
from tests.edit_helpers import build_db, content, keys_by_chunk, write_jsonl


@pytest.fixture
def db(tmp_path):
    return build_db(tmp_path / "db")


def test_delete_hides_documents_from_that_commit_on(db):
    before = retrodb.open(db)
    s0 = before.stats()
    victims = before.sql("SELECT doc_id, num_chunks, num_tokens FROM documents WHERE doc_id IN ('d1', 'd17')").to_pylist()
    report = delete(db, doc_ids=["d1", "d17", "nope"])
    assert (report.documents, report.unknown, report.version) == (2, ["nope"], before.version + 1)
    assert report.chunks == sum(v["num_chunks"] for v in victims)
    after = retrodb.open(db)
    s1 = after.stats()
    assert s1["documents"] == s0["documents"] - 2 and s1["deleted_documents"] == 2
    assert s1["chunks"] == s0["chunks"] - report.chunks and s1["tokens"] == s0["tokens"] - sum(v["num_tokens"] for v in victims)
    n_docs, n_chunks, n_tokens = after.sql(
        "SELECT (SELECT count(*) FROM documents), count(*), sum(num_tokens) FROM chunks").to_pylist()[0].values()
    assert (n_docs, n_chunks, n_tokens) == (s1["documents"], s1["chunks"], s1["tokens"])
    assert after.sql("SELECT count(*) FROM chunks WHERE doc_id IN ('d1', 'd17')").column(0)[0].as_py() == 0
    # the previous snapshot still sees them (time travel), and its files were not touched
    old = retrodb.open(db, at=before.version)
    assert old.sql("SELECT count(*) FROM documents WHERE doc_id IN ('d1', 'd17')").column(0)[0].as_py() == 2
    assert verify(db).ok and verify(db, at=before.version).ok


def test_tombstone_files_are_replaced_never_edited(db):
    r1 = delete(db, doc_ids=["d0"])
    seg = next(s for s in retrodb.open(db).snapshot.segments.values() if s.get("deleted_documents"))
    first = dict(seg["files"]["tombstones"])
    assert first["path"].endswith(f"tombstones-v{r1.version:08d}.parquet")
    r2 = delete(db, doc_ids=["d2"])  # same segment: a new file holding both rows
    seg2 = retrodb.open(db).snapshot.segments[r1.segments[0]]
    assert r2.segments == r1.segments and seg2["files"]["tombstones"]["path"].endswith(f"v{r2.version:08d}.parquet")
    assert seg2["deleted_documents"] == 2
    from retrodb.atomic import file_digest

    assert file_digest(db / first["path"]) == first["sha256"]  # the old file is intact for the old snapshot
    assert verify(db, at=r1.version).ok


def test_delete_again_is_a_no_op_and_unknown_ids_are_an_error(db):
    delete(db, doc_ids=["d3"])
    v = retrodb.open(db).version
    again = delete(db, doc_ids=["d3"])
    assert again.documents == 0 and again.version == v and retrodb.open(db).version == v
    with pytest.raises(RetrodbError, match="none of the 2 document id"):
        delete(db, doc_ids=["x1", "x2"])
    with pytest.raises(RetrodbError, match="no document matches --where"):
        delete(db, where="num_tokens < 0")
    with pytest.raises(RetrodbError, match="--where: .*Referenced column"):
        delete(db, where="no_such_column = 1")
    with pytest.raises(RetrodbError, match="say what to delete"):
        plan_delete(retrodb.open(db).snapshot)


def test_delete_refuses_a_plan_the_database_moved_under(db):
    plan = plan_delete(retrodb.open(db).snapshot, doc_ids=["d4", "d5"])
    delete(db, doc_ids=["d5"])
    with pytest.raises(RetrodbError, match="changed .* since the delete was planned"):
        delete(db, plan=plan)
    plan = plan_delete(retrodb.open(db).snapshot, doc_ids=["d4"])
    delete(db, doc_ids=["d6"])  # unrelated commit: the plan still holds, so it goes through
    assert delete(db, plan=plan).documents == 1


def test_delete_cli_plans_confirms_and_refuses_without_a_terminal(cli, db, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("d7\n\nd8\nmissing\n")
    v = retrodb.open(db).version
    dry = cli("delete", db, "--ids-file", ids, "--dry-run")
    assert dry.code == 0 and "2 documents" in dry.out and "dry run" in dry.out and "missing" in dry.err
    assert retrodb.open(db).version == v
    refused = cli("delete", db, "--ids-file", ids)  # stdin is not a terminal under pytest
    assert refused.code == 1 and "--yes" in refused.err and retrodb.open(db).version == v
    done = cli("delete", db, "--ids-file", ids, "--doc-id", "d9", "--yes", "--format", "json").json_lines()
    assert done[-1]["documents"] == 3 and done[-1]["unknown"] == ["missing"] and done[-1]["version"] == v + 1
    where = cli("delete", db, "--where", "doc_id IN ('d10', 'd11')", "--yes", "-f", "json").json_lines()
    assert where[-1]["documents"] == 2
    assert cli("delete", db, "--doc-id", "d1", "--where", "true", "--yes").code == 2  # a usage error
    assert cli("delete", db, "--yes").code == 2


def test_compact_keeps_chunk_ids_continuations_and_keys(db):
    delete(db, doc_ids=[f"d{i}" for i in range(0, 30, 3)])
    live = content(db)
    keys = keys_by_chunk(db)
    before = retrodb.open(db)
    report = compact(db, min_deleted_ratio=0.2, target_segment_chunks=40, workers=1)
    after = retrodb.open(db)
    assert report.version == before.version + 1 and report.chunks_dropped == before.stats()["deleted_chunks"]
    assert content(db) == live  # same documents, same chunk ids, positions, tokens, continuation ids
    assert keys_by_chunk(db) == keys  # keys carried over row for row, not recomputed
    assert after.stats()["deleted_chunks"] == 0 and after.stats()["chunks"] == before.stats()["chunks"]
    assert not any(s.get("files", {}).get("tombstones") for s in after.snapshot.segments.values())
    new = [n for n in after.snapshot.segments if n not in before.snapshot.segments]
    assert new and min(int(n[4:]) for n in new) == before.snapshot.data["next_segment"]
    assert all(after.snapshot.segments[n]["chunks"] <= 40 for n in new)
    # the rewritten keys equal a fresh embedding of the kept chunks
    from retrodb.embedder import HashEmbedder
    from retrodb.stages.embed import chunk_texts

    seg = after.snapshot.segments[new[0]]
    fresh = HashEmbedder(16).embed(chunk_texts(after.root, seg)).astype(np.float16)
    assert np.array_equal(np.load(db / seg["files"]["keys"]["path"]), fresh)
    assert verify(db).ok and content(db, at=before.version) == live  # the old snapshot still reads
    assert compact(db, 0.2, 40).groups == []  # nothing left to do: no commit
    assert retrodb.open(db).version == after.version


def test_compact_plan_rules(db):
    snap = retrodb.open(db).snapshot
    sizes = {n: s["chunks"] for n, s in snap.segments.items()}
    assert plan_compaction(snap, 0.2, 0) == []  # no deletions, no merging
    merged = plan_compaction(snap, 0.2, 10 ** 6)
    assert len(merged) == 1 and merged[0].sources == sorted(sizes) and merged[0].reason == "merge"
    # a segment reaches the ratio only with enough of it deleted; a fully deleted one is just dropped
    name = sorted(sizes)[1]
    docs = retrodb.open(db).sql(f"SELECT doc_id, num_chunks FROM documents WHERE segment = '{name}'").to_pylist()
    delete(db, doc_ids=[docs[0]["doc_id"]])
    share = docs[0]["num_chunks"] / sizes[name]
    snap = retrodb.open(db).snapshot
    assert [g.sources for g in plan_compaction(snap, share, 0)] == [[name]]
    assert plan_compaction(snap, min(1.0, share + 0.01), 0) == []
    delete(db, doc_ids=[d["doc_id"] for d in docs[1:]])
    groups = plan_compaction(retrodb.open(db).snapshot, 0.2, 0)
    assert [(g.sources, g.reason, g.segment) for g in groups] == [([name], "empty", None)]
    report = compact(db, 0.2, 0)
    assert name not in retrodb.open(db).snapshot.segments and report.segments_after == len(sizes) - 1
    with pytest.raises(RetrodbError, match="between 0 and 1"):
        plan_compaction(snap, 1.5, 0)


def test_compact_merges_only_segments_of_the_same_shape(tmp_path):
    root = build_db(tmp_path / "db", n_docs=12, embed=None)
    from retrodb.embed import embed

    embed(root, "hash:16")
    write_jsonl(tmp_path / "more.jsonl", ["m1", "m2"], seed=500)
    add(root, [str(tmp_path / "more.jsonl")], IngestOptions(workers=1))
    snap = retrodb.open(root).snapshot
    # forge an un-embedded segment: same data, keys dropped from the manifest
    db = retrodb.open(root)
    with db.writer("test") as w:
        data = w.base.derive("test")
        last = sorted(data["segments"])[-1]
        del data["segments"][last]["files"]["keys"]
        w.commit(data)
    groups = plan_compaction(retrodb.open(root).snapshot, 0.2, 10 ** 6)
    assert [g.sources for g in groups] == [sorted(snap.segments)[:-1]]


def test_vacuum_retention_and_bytes_freed(db):
    delete(db, doc_ids=["d1"])
    compact(db, 0.0, 0)
    versions = [e["version"] for e in retrodb.open(db).log()]
    current = versions[-1]
    # the default grace keeps just-superseded snapshots for readers: nothing goes
    assert plan_vacuum(db).removed_versions == []
    plan = plan_vacuum(db, retain=3, grace=0)
    assert plan.retained == versions[-3:] and plan.removed_versions == versions[:-3]
    dry = vacuum(db, retain=3, grace=0, dry_run=True)
    assert dry.files_removed == 0 and all((db / p).exists() for p, _ in dry.plan.files)
    on_disk = sum(f.stat().st_size for f in db.rglob("*") if f.is_file())
    report = vacuum(db, grace=0)
    assert report.plan.retained == [current] and report.bytes_freed == report.plan.bytes > 0
    assert on_disk - sum(f.stat().st_size for f in db.rglob("*") if f.is_file()) == report.bytes_freed
    assert [e["version"] for e in retrodb.open(db).log()] == [current]
    with pytest.raises(DatabaseNotFound, match=f"snapshot {versions[0]} .* is not retained"):
        retrodb.open(db, at=versions[0])
    assert verify(db).ok and not verify(db).warnings
    assert vacuum(db, grace=0).bytes_freed == 0


def test_vacuum_older_than_keeps_recent_history(db):
    delete(db, doc_ids=["d2"])
    versions = [e["version"] for e in retrodb.open(db).log()]
    far_future = time.time() + 3 * 86400
    keep_all = plan_vacuum(db, older_than=parse_duration("7d"), grace=0, now=far_future)
    assert keep_all.removed_versions == []
    keep_new = plan_vacuum(db, older_than=parse_duration("1d"), grace=0, now=far_future)
    assert keep_new.retained == [versions[-1]]
    either = plan_vacuum(db, retain=2, older_than=parse_duration("1d"), grace=0, now=far_future)
    assert either.retained == versions[-2:]


def test_reader_of_a_superseded_snapshot_survives_vacuum_within_grace(db):
    reader = retrodb.open(db)
    n = reader.sql("SELECT count(*) FROM chunks").column(0)[0].as_py()
    delete(db, doc_ids=["d4"])
    compact(db, 0.0, 0)
    vacuum(db)  # default grace: the reader's snapshot is kept
    assert reader.sql("SELECT count(*) FROM chunks").column(0)[0].as_py() == n
    vacuum(db, grace=0)  # no grace: the reader gets a clear error, not a crash
    with pytest.raises(DatabaseNotFound, match="vacuumed while it was being read"):
        reader.sql("SELECT count(*) FROM chunks")


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800),
                                          ("1d12h", 129600), ("2w", 1209600), ("0", 0), ("7", 7)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "-7", "7x", "d7", "1d garbage"])
def test_parse_duration_rejects(bad):
    with pytest.raises(RetrodbError, match="bad duration"):
        parse_duration(bad)


def test_add_is_one_commit_with_keys_and_refuses_existing_ids(db, tmp_path):
    before = retrodb.open(db)
    src = write_jsonl(tmp_path / "new.jsonl", ["n1", "n2", "d3"], seed=700)
    report = add(db, [str(src)], IngestOptions(workers=1))
    after = retrodb.open(db)
    assert after.version == before.version + 1 and [e["command"] for e in after.log()][-1] == "add"
    assert report.ingest.documents == 2 and report.ingest.issue_counts == {"duplicate-id": 1}
    assert "add --replace" in report.ingest.issues[0]["message"]
    new = [n for n in after.snapshot.segments if n not in before.snapshot.segments]
    assert len(new) == 1 and "keys" in after.snapshot.segments[new[0]]["files"]
    assert report.embedded_chunks == after.snapshot.segments[new[0]]["chunks"]
    assert after.stats()["documents"] == before.stats()["documents"] + 2
    assert content(db)["documents"]["d3"] == content(db, at=before.version)["documents"]["d3"]  # not replaced
    assert verify(db).ok
    with pytest.raises(BadInput, match="already in the database"):
        add(db, [str(src)], IngestOptions(workers=1, on_error="fail"))
    assert retrodb.open(db).version == after.version


def test_add_replace_supersedes_in_the_same_commit(db, tmp_path):
    before = content(db)
    src = write_jsonl(tmp_path / "fix.jsonl", ["d5", "d6", "brand-new"], seed=900)
    v = retrodb.open(db).version
    report = add(db, [str(src)], IngestOptions(workers=1), replace=True)
    assert report.version == v + 1 and report.replaced == 2
    now = content(db)
    assert set(now["documents"]) == set(before["documents"]) | {"brand-new"}
    assert now["documents"]["d5"] != before["documents"]["d5"]
    assert now["documents"]["d5"] == json.loads(src.read_text().splitlines()[0])["text"]
    old_chunks = {c for c, (d, *_) in before["chunks"].items() if d in ("d5", "d6")}
    assert not old_chunks & set(now["chunks"])  # the old versions' chunks are gone, the new ones have new ids
    s = retrodb.open(db).stats()
    assert s["deleted_documents"] == 2 and s["documents"] == len(now["documents"])
    assert verify(db).ok


def test_add_needs_an_existing_database_and_ingest_only_when_not_embedded(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["a1"], seed=3)
    with pytest.raises(DatabaseNotFound, match="no retrodb database"):
        add(tmp_path / "nothing", [str(src)])
    root = build_db(tmp_path / "plain", n_docs=3, embed=None)
    report = add(root, [str(src)], IngestOptions(workers=1))
    assert report.embedded_chunks == 0 and "no keys yet" in report.notes[0]
    assert retrodb.open(root).stats()["documents"] == 4


def test_edit_cli_end_to_end(cli, db, tmp_path):
    src = write_jsonl(tmp_path / "new.jsonl", ["n1", "d0"], seed=40)
    r = cli("add", db, src, "--replace")
    assert r.code == 0 and "added 2 documents" in r.out and "replacing 1 older" in r.out
    r = cli("compact", db, "--min-deleted-ratio", "0.01", "--dry-run", "-f", "json").json_lines()[0]
    assert r["dry_run"] and r["groups"] and r["chunks_dropped"] > 0
    v = retrodb.open(db).version
    assert retrodb.open(db).version == v
    r = cli("compact", db, "--min-deleted-ratio", "0.01")
    assert r.code == 0 and f"committed v{v + 1}" in r.out
    r = cli("vacuum", db, "--grace", "0s")
    assert r.code == 1 and "--yes" in r.err  # destructive: refused without confirmation off a terminal
    r = cli("vacuum", db, "--grace", "0s", "--retain", "2", "--dry-run", "-f", "json").json_lines()[0]
    assert r["dry_run"] and r["retained"] == [v, v + 1] and r["bytes"] > 0
    r = cli("vacuum", db, "--grace", "0s", "--yes", "-f", "json").json_lines()[0]
    assert r["retained"] == [v + 1] and r["bytes_freed"] > 0
    r = cli("verify", db)
    assert r.code == 0 and "OK" in r.out
    r = cli("vacuum", db, "--older-than", "seven days")
    assert r.code == 2 and "bad duration" in r.err


def test_edit_commands_have_help_with_examples():
    from tests.conftest import run_retrodb

    for cmd in ("add", "delete", "compact", "vacuum", "verify"):
        proc = run_retrodb(cmd, "--help")
        assert proc.returncode == 0 and b"Examples" in proc.stdout, cmd


ODD_TEXT = "zebra quantum marmalade xylophone walrus " * 12


def test_add_and_delete_change_what_query_returns(tmp_path):
    from tests.edit_helpers import top_doc_ids

    db = build_db(tmp_path / "db", n_docs=12, index=True)
    assert "odd" not in top_doc_ids(db, ODD_TEXT)
    src = tmp_path / "odd.jsonl"
    src.write_text(json.dumps({"id": "odd", "text": ODD_TEXT}) + "\n")
    before = retrodb.open(db)
    report = add(db, [str(src)], IngestOptions(workers=1))
    assert report.indexed_segments == 1 and report.version == before.version + 1
    new = [s for n, s in retrodb.open(db).snapshot.segments.items() if n not in before.snapshot.segments][0]
    assert "index" in new["files"] and "keys" in new["files"]
    assert top_doc_ids(db, ODD_TEXT)[0] == "odd"  # visible to query from the add's commit
    assert "odd" not in [n.doc_id for n in retrodb.open(db, at=before.version).query(ODD_TEXT, k=5)[0].neighbours]
    delete(db, doc_ids=["odd"])
    assert "odd" not in top_doc_ids(db, ODD_TEXT)
    assert verify(db).ok


def test_compact_rebuilds_only_the_new_segments_indexes(tmp_path):
    import hnswlib

    db = build_db(tmp_path / "db", n_docs=30, index=True)
    delete(db, doc_ids=[f"d{i}" for i in range(0, 30, 2)])
    before = retrodb.open(db)
    q = "retrieval chunk neighbour snapshot redact"
    exact = [(n.chunk_id, round(n.score, 5)) for n in before.query(q, k=8, exact=True)[0].neighbours]
    report = compact(db, 0.2, 50, workers=1)
    after = retrodb.open(db)
    untouched = {n: s for n, s in after.snapshot.segments.items() if n in before.snapshot.segments}
    for n, s in untouched.items():  # segments not compacted keep their very files
        assert s["files"] == before.snapshot.segments[n]["files"]
    new = {n: s for n, s in after.snapshot.segments.items() if n not in before.snapshot.segments}
    assert len(new) == sum(1 for g in report.groups if g.segment is not None) >= 1
    for name, seg in new.items():
        index = hnswlib.Index(space="cosine", dim=16)
        index.load_index(str(db / seg["files"]["index"]["path"]))
        import pyarrow.parquet as pq

        ids = pq.read_table(db / seg["files"]["chunks"]["path"], columns=["chunk_id"])["chunk_id"].to_pylist()
        assert sorted(index.get_ids_list()) == sorted(ids)  # no vector of a dropped row is left in the file
    assert [(n.chunk_id, round(n.score, 5)) for n in after.query(q, k=8, exact=True)[0].neighbours] == exact
    hnsw = {n.chunk_id for n in after.query(q, k=8, ef=200)[0].neighbours}
    assert len(hnsw & {c for c, _ in exact}) >= 6
    assert verify(db).ok


def test_cli_defaults_match_the_library():
    import inspect

    from retrodb.cli import edit as cli_edit
    from retrodb import compact as lib

    params = inspect.signature(cli_edit.compact).parameters
    assert params["target_segment_chunks"].default == lib.DEFAULT_TARGET_SEGMENT_CHUNKS
    assert params["min_deleted_ratio"].default == lib.DEFAULT_MIN_DELETED_RATIO
