"""Precomputed training neighbours: exact same-document exclusion, the SQL view, incremental runs, staleness,
compaction carry-over, redaction purge, resumption."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import retrodb
from retrodb.errors import ConfigMismatch, MissingStage, RetrodbError
from retrodb.neighbours import compute_neighbours, status
from retrodb.verify import verify
from tests.conftest import run_retrodb
from tests.edit_helpers import build_db, write_jsonl


@pytest.fixture(scope="module")
def base_db(tmp_path_factory):
    """Several segments of hash:16 keys with small HNSW indexes."""
    return build_db(tmp_path_factory.mktemp("nb") / "db", n_docs=30, segment_bytes=2000, index=True)


@pytest.fixture
def db(base_db, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(base_db, path)
    return path


def live_keys(root):
    """chunk ids, doc ids and unit float32 keys of every live chunk."""
    handle = retrodb.open(root)
    live = {r["chunk_id"]: r["doc_id"] for r in handle.sql("SELECT chunk_id, doc_id FROM chunks").to_pylist()}
    ids, docs, keys = [], [], []
    for seg in handle.snapshot.segments.values():
        all_ids = pq.read_table(root / seg.files["chunks"]["path"], columns=["chunk_id"])["chunk_id"].to_numpy()
        k = np.load(root / seg.files["keys"]["path"]).astype(np.float32)
        for i, c in enumerate(all_ids.tolist()):
            if c in live:
                ids.append(c)
                docs.append(live[c])
                keys.append(k[i])
    keys = np.stack(keys)
    return np.array(ids), np.array(docs), keys / np.linalg.norm(keys, axis=1, keepdims=True)


def view(root, where: str = "") -> dict[int, list[tuple[int, int, float]]]:
    rows = retrodb.open(root).sql(f"SELECT * FROM neighbours {where} ORDER BY chunk_id, rank").to_pylist()
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(r["chunk_id"], []).append((r["rank"], r["neighbour_chunk_id"], r["score"]))
    return out


def test_exact_same_document_exclusion_and_agreement_with_brute_force(db):
    report = compute_neighbours(db, 2, ef=200)
    assert report.committed and len(report.segments) == len(retrodb.open(db).snapshot.segments)
    ids, docs, keys = live_keys(db)
    got = view(db)
    assert set(got) == set(ids.tolist())  # every live chunk has neighbours
    doc_of = dict(zip(ids.tolist(), docs.tolist()))
    scores = keys @ keys.T
    checked = 0
    for i, cid in enumerate(ids.tolist()):
        rows = got[cid]
        assert [r for r, _, _ in rows] == list(range(1, 5))  # margin 2k = 4
        assert all(doc_of[n] != doc_of[cid] for _, n, _ in rows)  # never the chunk's own document
        other = docs != docs[i]
        exact = np.sort(scores[i][other])[::-1][:4]
        stored = np.array([s for _, _, s in rows])
        # the stored ones score as high as the exact top 4 (ties count), best first
        np.testing.assert_allclose(stored, exact, atol=2e-3)
        checked += 1
    assert checked >= 50


def test_a_document_longer_than_the_margin_still_gets_other_documents(tmp_path):
    """A long document's own chunks are its nearest keys: the over-fetch must go past all of them."""
    src = tmp_path / "src.jsonl"
    long_text = " ".join(["retrieval chunk neighbour"] * 400)  # ~20 near-identical chunks of one document
    with open(src, "w") as f:
        f.write(json.dumps({"id": "long", "text": long_text}) + "\n")
        f.write(json.dumps({"id": "other", "text": "retrieval chunk neighbour " * 20 + "zebra"}) + "\n")
        for i in range(4):
            f.write(json.dumps({"id": f"third{i}", "text": f"different words {i} about walruses " * 14}) + "\n")
    from retrodb.embed import embed
    from retrodb.index import index
    from retrodb.ingest import IngestOptions, ingest

    root = tmp_path / "db"
    ingest(root, [str(src)], IngestOptions(workers=1))
    embed(root, "hash:16")
    index(root, M=8, ef_construction=40, threads=1)
    compute_neighbours(root, 2)
    handle = retrodb.open(root)
    long_ids = {r["chunk_id"] for r in handle.sql("SELECT chunk_id FROM chunks WHERE doc_id = 'long'").to_pylist()}
    assert len(long_ids) > 10
    got = view(root)
    for cid in long_ids:
        assert len(got[cid]) == 4 and not {n for _, n, _ in got[cid]} & long_ids


def test_view_filters_deleted_chunks_on_both_sides_and_renumbers(db):
    from retrodb.delete import delete

    compute_neighbours(db, 2)
    before = view(db)
    victim = retrodb.open(db).sql("SELECT doc_id FROM chunks WHERE chunk_id = "
                                  f"{before[min(before)][0][1]}").column(0)[0].as_py()
    gone = {r["chunk_id"] for r in retrodb.open(db).sql(
        f"SELECT chunk_id FROM chunks WHERE doc_id = '{victim}'").to_pylist()}
    delete(db, doc_ids=[victim])
    after = view(db)
    assert not set(after) & gone
    for cid, rows in after.items():
        want = [(n, s) for _, n, s in before[cid] if n not in gone]
        assert [(n, s) for _, n, s in rows] == want
        assert [r for r, _, _ in rows] == list(range(1, len(rows) + 1))
    assert any(len(rows) < 4 for rows in after.values())  # some lost a neighbour, and were renumbered


def test_incremental_after_add_staleness_and_refresh(db, tmp_path):
    from retrodb.add import add
    from retrodb.ingest import IngestOptions

    compute_neighbours(db, 2)
    old = retrodb.open(db).snapshot
    old_files = {s.name: s.files["neighbours"]["path"] for s in old.segments.values()}
    add(db, [str(write_jsonl(tmp_path / "new.jsonl", [f"n{i}" for i in range(8)], seed=900))],
        IngestOptions(workers=1, segment_bytes=2000))
    new_segs = sorted({s.name for s in retrodb.open(db).snapshot.segments.values()} - set(old_files))
    st = status(retrodb.open(db).snapshot)
    assert st["missing"] == new_segs and st["stale"] == sorted(old_files) and st["added_since"] == new_segs
    assert (st["missing_count"], st["stale_count"], st["added_since_count"]) == (2, len(old_files), 2)
    assert status(retrodb.open(db).snapshot, names=1)["stale"] == sorted(old_files)[:1]  # lists are capped
    report = compute_neighbours(db, 2)
    assert sorted(report.segments) == new_segs and report.up_to_date == len(old_files)
    snap = retrodb.open(db).snapshot
    assert {n: snap.segments[n].files["neighbours"]["path"] for n in old_files} == old_files  # untouched
    st = status(snap)
    assert st["missing"] == [] and st["stale"] == sorted(old_files) and st["added_since"] == new_segs
    assert any("predate" in f.message for f in verify(db).findings if f.level == "info")
    stats = retrodb.open(db).stats()["neighbours"]
    assert stats["stale"] == sorted(old_files)
    # the new segments' neighbours searched everything; the old ones cannot name new chunks until --refresh
    new_ids = {r["chunk_id"] for r in retrodb.open(db).sql(
        "SELECT chunk_id FROM chunks WHERE doc_id LIKE 'n%'").to_pylist()}
    old_rows = view(db, f"WHERE chunk_id < {int(new_segs[0][4:]) << 32}")
    assert not {n for rows in old_rows.values() for _, n, _ in rows} & new_ids
    report = compute_neighbours(db, 2, refresh=True)
    # the new segments' files were computed from the same inputs as a refresh would use: kept as they are
    assert sorted(report.segments) == sorted(old_files) and report.up_to_date == len(new_segs)
    st = status(retrodb.open(db).snapshot)
    assert st["stale"] == [] and st["missing"] == [] and not verify(db).findings
    old_rows = view(db, f"WHERE chunk_id < {int(new_segs[0][4:]) << 32}")
    assert {n for rows in old_rows.values() for _, n, _ in rows} & new_ids


def test_compaction_carries_neighbours_and_the_view_is_unchanged(db):
    from retrodb.compact import compact
    from retrodb.delete import delete
    from retrodb.vacuum import vacuum

    compute_neighbours(db, 2)
    delete(db, doc_ids=[f"d{i}" for i in range(0, 30, 3)])
    before = view(db)
    report = compact(db, 0.2, 40, workers=1)
    assert report.groups
    snap = retrodb.open(db).snapshot
    assert all("neighbours" in s.files for s in snap.segments.values())
    assert view(db) == before
    st = status(snap)
    assert st["missing"] == [] and st["stale"] == []  # compaction adds no chunk: nothing is stale
    vacuum(db, grace=0)
    rep = verify(db)
    assert rep.ok and not rep.warnings, [f.message for f in rep.findings]
    # carried files hold no deleted chunk (a live chunk whose stored neighbours were all deleted is in no view row)
    live = set(retrodb.open(db).sql("SELECT chunk_id FROM chunks")["chunk_id"].to_pylist())
    for seg in snap.segments.values():
        t = pq.read_table(db / seg.files["neighbours"]["path"]).to_pylist()
        assert all(r["chunk_id"] in live for r in t)


def test_redaction_purges_neighbour_files_and_verify_checks_it(db):
    from retrodb.redact import build_selectors, redact

    compute_neighbours(db, 2)
    handle = retrodb.open(db)
    removed = {r["chunk_id"] for r in handle.sql("SELECT chunk_id FROM chunks WHERE doc_id IN ('d4', 'd17')").to_pylist()}
    named = {n for rows in view(db).values() for _, n, _ in rows}
    assert named & removed  # other chunks do name them before
    redact(db, build_selectors(doc_ids=["d4", "d17"]))
    for path in db.rglob("neighbours-*.parquet"):
        t = pq.read_table(path)
        assert not set(t["chunk_id"].to_pylist()) & removed
        assert not set(t["neighbour_chunk_id"].to_pylist()) & removed, path
    rep = verify(db)
    assert rep.ok, [f.message for f in rep.errors]
    from retrodb.data import RetroDataset

    items = list(RetroDataset(db, seq_len=128, k=2))
    assert items and not {n for x in items for n in x["neighbour_ids"].flatten().tolist()} & removed
    # a neighbours file that still names a removed chunk is an error
    seg = next(iter(retrodb.open(db).snapshot.segments.values()))
    src = db / seg.files["neighbours"]["path"]
    t = pq.read_table(src)
    import pyarrow as pa

    t = t.set_column(2, "neighbour_chunk_id", pa.array([min(removed)] + t["neighbour_chunk_id"].to_pylist()[1:]))
    pq.write_table(t, src.with_name("neighbours-planted.parquet"))
    errs = [f for f in verify(db).errors if f.check == "neighbours"]
    assert errs and "redaction removed" in errs[0].message


def test_parameters_are_recorded_and_refused_without_refresh(db):
    compute_neighbours(db, 2)
    with pytest.raises(ConfigMismatch, match="--refresh"):
        compute_neighbours(db, 3)
    report = compute_neighbours(db, 3, refresh=True)
    assert report.params == {"k": 3, "margin": 6, "ef": 64}
    assert max(len(r) for r in view(db).values()) == 6
    again = compute_neighbours(db, 3)
    assert again.segments == [] and again.up_to_date == len(retrodb.open(db).snapshot.segments)
    with pytest.raises(RetrodbError, match="unknown --executor"):
        compute_neighbours(db, 3, executor="slurm")


def test_needs_keys(tmp_path):
    root = build_db(tmp_path / "db", n_docs=4, embed=None)
    with pytest.raises(MissingStage, match="retrodb embed"):
        compute_neighbours(root)


def test_segments_without_an_index_are_searched_exactly(tmp_path):
    root = build_db(tmp_path / "db", n_docs=12, segment_bytes=2000, index=False)
    report = compute_neighbours(root, 2)
    assert report.exact_segments and report.chunks == retrodb.open(root).stats()["chunks"]
    ids, docs, keys = live_keys(root)
    got = view(root)
    for i, cid in enumerate(ids.tolist()):
        exact = np.sort((keys @ keys[i])[docs != docs[i]])[::-1][:4]
        np.testing.assert_allclose([s for _, _, s in got[cid]], exact, atol=2e-3)


def test_cli_json_and_human(db, cli):
    res = cli("neighbours", db, "--k", "2", "--format", "json")
    assert res.code == 0, res.err
    (rec,) = res.json_lines()
    assert rec["params"]["margin"] == 4 and rec["status"]["missing"] == [] and rec["chunks"] > 0
    res = cli("neighbours", db)
    assert res.code == 0 and "nothing to do" in res.out
    res = cli("neighbours", db, "--k", "0")
    assert res.code == 2
    res = cli("stats", db)
    assert "k=2 (margin 4" in res.out
    res = cli("sql", db, "SELECT count(*) AS n FROM neighbours WHERE rank <= 2", "--format", "json")
    assert res.json_lines()[0]["n"] == 2 * retrodb.open(db).stats()["chunks"]


def test_workers_in_processes_give_the_same_files(db, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(db, other)
    compute_neighbours(db, 2, workers=1, threads=1)
    compute_neighbours(other, 2, workers=2, threads=1)
    assert view(db) == view(other)


def test_rerun_after_kill_picks_up_published_files(db):
    proc = run_retrodb("neighbours", db, env={"RETRODB_KILL_AT": "neighbours.segment_published#3"})
    assert proc.returncode == -9
    assert "neighbours" not in retrodb.open(db).snapshot.segments[1].files
    assert verify(db).ok
    report = compute_neighbours(db, 2)
    assert report.resumed_segments == 3
    rep = verify(db)
    assert rep.ok and not rep.warnings, [f.message for f in rep.findings]


@pytest.mark.parametrize("kill_at", ["redact.neighbours_rewritten", "redact.snapshots_purged"])
def test_redaction_killed_while_purging_neighbours_finishes_on_rerun(db, kill_at):
    compute_neighbours(db, 2)
    removed = {r["chunk_id"] for r in retrodb.open(db).sql(
        "SELECT chunk_id FROM chunks WHERE doc_id IN ('d4', 'd17')").to_pylist()}
    proc = run_retrodb("redact", db, "--doc-id", "d4", "--doc-id", "d17", "--yes", env={"RETRODB_KILL_AT": kill_at})
    assert proc.returncode == -9
    assert any("redaction incomplete" in f.message for f in verify(db).errors)
    proc = run_retrodb("redact", db, "--doc-id", "d4", "--yes")  # any selector finishes the pending one
    assert proc.returncode == 0, proc.stderr.decode()
    for path in db.rglob("neighbours-*.parquet"):
        t = pq.read_table(path)
        assert not (set(t["chunk_id"].to_pylist()) | set(t["neighbour_chunk_id"].to_pylist())) & removed, path
    rep = verify(db)
    assert rep.ok and not rep.warnings, [f.message for f in rep.findings]


def test_small_segments_merge_only_with_segments_of_the_same_neighbours(db, tmp_path):
    from retrodb.add import add
    from retrodb.compact import compact
    from retrodb.ingest import IngestOptions

    compute_neighbours(db, 2)
    add(db, [str(write_jsonl(tmp_path / "new.jsonl", [f"n{i}" for i in range(4)], seed=700))],
        IngestOptions(workers=1, segment_bytes=2000))
    compact(db, 0.2, 1000, workers=1)  # every segment is small: merge by shape
    snap = retrodb.open(db).snapshot
    with_nb = [n for n, s in snap.segments.items() if "neighbours" in s.files]
    assert with_nb and status(snap)["missing"]  # old segments merged keeping theirs; the new ones apart
    assert status(snap)["missing_chunks"] == retrodb.open(db).sql(
        "SELECT count(*) FROM chunks WHERE doc_id LIKE 'n%'").column(0)[0].as_py()


def test_cli_prints_a_database_path_literally(tmp_path, cli):
    root = build_db(tmp_path / "[red]db", n_docs=6, segment_bytes=2000, index=False)
    res = cli("neighbours", root)
    assert res.code == 0, res.err
    assert "[red]db" in res.err  # the warning names the path as it is, not as rich markup
