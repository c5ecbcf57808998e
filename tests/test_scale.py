"""Issue 13: a snapshot tree whose commits rewrite what they change, the id index, journals, tiered indexes.

Each test builds (or copies) a tiny database; the scaling itself is measured in bench/bench_scale.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import retrodb
from retrodb import manifest
from retrodb.add import add
from retrodb.compact import compact
from retrodb.delete import delete
from retrodb.ingest import IngestOptions
from retrodb.tokenizer import default_model_dir
from retrodb.vacuum import vacuum
from retrodb.verify import verify
from tests.conftest import run_retrodb
from tests.edit_helpers import build_db, content, write_jsonl

OLD_FORMAT = Path(__file__).parent / "data" / "old-format-v1"


def old_database(tmp_path) -> Path:
    """A copy of the format-1 fixture, its recorded tokenizer path pointed at this checkout's (the same model:
    the sha256 is unchanged; the fixture was made in another directory)."""
    db = tmp_path / "old"
    shutil.copytree(OLD_FORMAT, db)
    for path in (db / "manifests").glob("v-*.json"):
        data = json.loads(path.read_text())
        data["config"]["tokenizer"]["path"] = str(Path(default_model_dir()).resolve())
        path.write_text(json.dumps(data, indent=1, sort_keys=True))
    (db / "_work").mkdir(exist_ok=True)
    return db


def query_ids(db, text="retrieval database chunk", k=5) -> list[int]:
    return [n.chunk_id for n in retrodb.open(db).query(text, k=k, ef=200)[0].neighbours]


def test_old_format_is_read_then_upgraded_by_its_next_commit(tmp_path):
    db = old_database(tmp_path)
    handle = retrodb.open(db)
    snap = handle.snapshot
    assert snap.format_version == 1 and not snap.ids_indexed
    assert sorted(snap.segments) == [2, 4, 5, 6] and snap.segments[5].compacted_from == (1,)
    before = content(db)
    hits = query_ids(db)
    stats = handle.stats()
    assert (stats["documents"], stats["segments"], stats["index_units"]) == (len(before["documents"]), 4, 4)
    report = verify(db)
    assert report.ok, [f.message for f in report.errors]
    assert any("every segment until the next commit" in f.message for f in report.findings)
    assert retrodb.open(db).query(chunk_ids=[hits[0]], k=2)[0].neighbours  # chunk ids found in an old database
    # the next commit (a delete by id, found by reading the old segments) writes the tree
    gone = next(d for d in before["documents"] if d not in ("d1", "d7", "d10"))
    delete(db, doc_ids=[gone])
    new = retrodb.open(db).snapshot
    assert new.format_version == 2 and new.ids_indexed and len(new.group_refs) == 1 and new.id_runs
    assert {u["name"] for u in new.index_units} == {f"seg-{n:06d}" for n in (2, 4, 5, 6)}
    assert json.loads((db / "manifests" / f"v-{new.version:08d}.json").read_text()).get("segments") is None
    after = content(db)
    assert set(after["documents"]) == set(before["documents"]) - {gone}
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]
    assert content(db, at=7) == before  # the format-1 snapshot is still read as it was
    assert verify(db, at=7).ok
    # its ids now come from the id runs, and a vacuum removes the format-1 snapshots by difference
    live, dead = retrodb.ids.lookup(new, [gone, "d10", "d2"])
    assert [d.doc_id for d in live] == ["d2"] and sorted(d.doc_id for d in dead) == sorted([gone, "d10"])
    vacuum(db, grace=0)
    assert retrodb.open(db).log()[0]["version"] == new.version
    assert verify(db).ok and content(db) == after
    assert set(query_ids(db)) - set(r for r in hits) <= set(query_ids(db))  # still answers


def many_segments(tmp_path, n_docs=16) -> Path:
    """One document per segment: n_docs segments, embedded (hash:16), indexed with small parameters."""
    return build_db(tmp_path / "db", n_docs=n_docs, segment_bytes=300, index=True)


def test_a_commit_rewrites_only_the_group_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "GROUP_MAX", 4)
    monkeypatch.setattr(manifest, "GROUP_MIN", 2)
    db = many_segments(tmp_path)
    snap = retrodb.open(db).snapshot
    assert len(snap.segments) == 16 and len(snap.group_refs) >= 4
    assert all(len(snap.group(i)) <= 4 for i in range(len(snap.group_refs)))
    refs = {r.lo: r.path for r in snap.group_refs}
    target = snap.segments[sorted(snap.segments)[5]]
    doc = retrodb.open(db).sql(f"SELECT doc_id FROM documents WHERE segment = '{target.name}'").column(0)[0].as_py()
    delete(db, doc_ids=[doc])
    after = retrodb.open(db).snapshot
    changed = [r for r in after.group_refs if refs.get(r.lo) != r.path]
    assert len(changed) == 1 and after.group_index(target.number) == after.group_refs.index(changed[0])
    written = sorted(p.name for p in (db / "manifests" / "groups").glob(f"g-{after.version:08d}-*.json"))
    assert len(written) == 1  # the other groups are referenced by the new root as they were
    assert after.totals()["documents"] == snap.totals()["documents"] - 1
    # adding a segment rewrites the last group only; removing segments joins a shrunken group to its neighbour
    write_jsonl(tmp_path / "one.jsonl", ["new-1"], seed=77)
    add(db, [str(tmp_path / "one.jsonl")], IngestOptions(workers=1))
    added = retrodb.open(db).snapshot
    kept = [r for r in added.group_refs if r.path in {g.path for g in after.group_refs}]
    assert kept == after.group_refs[:-1] and len(added.group_refs) - len(kept) in (1, 2)  # the last one, split
    compact(db, 0.0, 10 ** 6, merge_indexes=False)  # merges every small segment: most groups empty
    merged = retrodb.open(db).snapshot
    assert len(merged.segments) == 1 and len(merged.group_refs) == 1
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]


def test_compacting_a_segment_writes_one_group_and_vacuum_and_redact_see_the_removal(tmp_path, monkeypatch):
    """A commit that only removes segments from a group (compaction's sources) records them in the group's
    reference, not by rewriting the group: compacting writes one group, the newest. Older snapshots still see
    the removed segments; vacuum removes their files; redaction leaves no text behind; past REMOVED_MAX, or
    at the group's next change, the group is rewritten without them."""
    from retrodb.absent import scan_absent
    from retrodb.redact import build_selectors, redact
    from retrodb.snapshot import read_manifest, summarize

    monkeypatch.setattr(manifest, "GROUP_MAX", 4)
    monkeypatch.setattr(manifest, "GROUP_MIN", 2)
    monkeypatch.setattr(manifest, "REMOVED_MAX", 2)
    db = build_db(tmp_path / "db", n_docs=32, segment_bytes=700, index=True)  # two documents per segment
    snap = retrodb.open(db).snapshot
    assert len(snap.group_refs) == 4 and all(len(snap.group(i)) == 4 for i in range(4))
    assert all(s.documents == 2 for s in snap.segments.values())

    def doc_of(n: int) -> str:
        return retrodb.open(db).sql(f"SELECT doc_id FROM documents WHERE segment = 'seg-{n:06d}' ORDER BY doc_id"
                                    ).column(0)[0].as_py()

    victims = sorted(snap.group(1))
    delete(db, doc_ids=[doc_of(victims[0]), doc_of(victims[1])])
    vacuum(db, retain=1, grace=0)  # so that the one older snapshot left shares the group file with the next
    pre = retrodb.open(db).snapshot
    report = compact(db, 0.4, 0, merge_indexes=False)
    assert sorted(n for g in report.groups for n in g.sources) == victims[:2]
    after = retrodb.open(db).snapshot
    written = {f"manifests/groups/{p.name}" for p in (db / "manifests" / "groups").glob(f"g-{after.version:08d}-*")}
    assert written and written <= {r.path for r in after.group_refs if r.lo >= snap.group_refs[-1].lo}
    ref = after.group_refs[1]
    assert (ref.path, ref.bytes, ref.removed) == (pre.group_refs[1].path, pre.group_refs[1].bytes, tuple(victims[:2]))
    assert victims[0] not in after.segments and after.segment(victims[1]) is None and len(after.group(1)) == 2
    assert ref.summary == summarize(after.group(1).values())
    assert after.totals()["documents"] == 30 and retrodb.open(db).stats()["segments"] == 16
    assert victims[0] in read_manifest(db, pre.version).segments  # the snapshot before still has it
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]
    broken = tmp_path / "broken"  # a file only the older snapshot references goes missing: verify names it
    shutil.copytree(db, broken)
    (broken / pre.segment(victims[0]).files["chunks"]["path"]).unlink()
    assert any(f"retained snapshot v{pre.version} references a missing file" in f.message
               for f in verify(broken).findings)
    vacuum(db, retain=1, grace=0)
    assert not (db / "segments" / f"seg-{victims[0]:06d}").exists()  # the group file is kept; the segment is not
    assert (db / ref.path).exists()
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]
    # a redaction in that group: the text is gone from every file, and the group's next change rewrites it
    doc = doc_of(victims[2])
    secret = content(db)["documents"][doc]
    assert scan_absent(db, [secret[:40]])
    redact(db, build_selectors(doc_ids=[doc]), mode="drop")
    assert scan_absent(db, [secret[:40]]) == []
    now = retrodb.open(db).snapshot
    assert now.group_refs[1].path != ref.path and not set(victims[:2]) & set(now.group(1))
    # more removals than REMOVED_MAX: the group is rewritten
    monkeypatch.setattr(manifest, "REMOVED_MAX", 1)
    two = sorted(now.group(2))[:2]
    delete(db, doc_ids=[doc_of(n) for n in two])
    compact(db, 0.4, 0, merge_indexes=False)
    last = retrodb.open(db).snapshot
    assert not last.group_refs[2].removed and not set(two) & set(last.segments)
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]


def test_group_summaries_answer_stats_without_reading_groups(tmp_path, monkeypatch):
    db = many_segments(tmp_path, n_docs=6)
    delete(db, doc_ids=["d2"])
    read = []
    real, real_list = retrodb.snapshot.load_group, retrodb.snapshot.load_group_list
    monkeypatch.setattr(retrodb.snapshot, "load_group", lambda root, ref: read.append(ref.path) or real(root, ref))
    monkeypatch.setattr(retrodb.snapshot, "load_group_list",
                        lambda root, rec: read.append(rec["path"]) or real_list(root, rec))
    handle = retrodb.open(db)
    stats = handle.stats()
    assert (stats["documents"], stats["deleted_documents"], stats["segments"]) == (5, 1, 6)
    assert handle.log()[-1]["documents"] == 5
    assert read == []  # the root's totals answered; neither the group list nor a group manifest was read
    assert len(handle.stats(segments=True)["per_segment"]) == 6 and read


def test_writer_start_after_a_crash_reads_the_journal_not_the_tree(tmp_path, monkeypatch):
    """An add killed before its commit leaves a new segment; the next writer removes it from the journal alone:
    no group manifest read (the segment is numbered after the snapshot) and `segments/` never listed."""
    import retrodb.database as database

    db = many_segments(tmp_path, n_docs=6)
    write_jsonl(tmp_path / "new.jsonl", ["late"], seed=7)
    proc = run_retrodb("add", db, tmp_path / "new.jsonl", env={"RETRODB_KILL_AT": "add.indexed"})
    assert proc.returncode == -9, proc.stderr.decode()
    handle = retrodb.open(db)
    left = sorted(p.name for p in (db / "segments").iterdir())
    assert len(left) == 7  # the dead add's segment is on disk, uncommitted
    retrodb.snapshot.clear_caches()
    groups, listed = [], []
    real_group, real_tmp = retrodb.snapshot.load_group, database._remove_temporaries
    monkeypatch.setattr(retrodb.snapshot, "load_group", lambda root, ref: groups.append(ref.path) or real_group(root, ref))
    monkeypatch.setattr(database, "_remove_temporaries", lambda d, name: listed.append(Path(d)) or real_tmp(d, name))
    with handle.writer("test"):
        pass
    assert sorted(p.name for p in (db / "segments").iterdir()) == left[:6]
    assert groups == [] and db / "segments" not in listed
    assert retrodb.open(db).stats()["documents"] == 6


# ---------------------------------------------------------------- tiered index shards


def exact_ids(db, vectors, k=6) -> list[list[int]]:
    return [[n.chunk_id for n in r.neighbours] for r in retrodb.open(db).query(vectors=vectors, k=k, exact=True)]


def hnsw_ids(db, vectors, k=6) -> list[list[int]]:
    return [[n.chunk_id for n in r.neighbours] for r in retrodb.open(db).query(vectors=vectors, k=k, ef=200)]


def probe_vectors(db, n=8) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)


def test_index_merge_builds_a_shard_that_answers_like_the_segments(tmp_path):
    from retrodb.index import index

    db = many_segments(tmp_path)
    q = probe_vectors(db)
    want = exact_ids(db, q)
    assert hnsw_ids(db, q) == want
    report = index(db, merge=True, threads=1)
    assert len(report.merged) == 1 and report.merged[0]["segments"] == 16 and report.merged[0]["units"] == 16
    snap = retrodb.open(db).snapshot
    [unit] = snap.index_units
    assert unit["kind"] == "shard" and unit["vectors"] == snap.totals()["chunks"]
    assert all(s.shard == unit["name"] and "index" not in s.files for s in snap.segments.values())
    assert hnsw_ids(db, q) == want  # one index instead of sixteen, the same neighbours
    assert retrodb.open(db).stats()["index_units"] == 1
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]
    assert index(db, merge=True).merged == []  # nothing more to merge: no commit


def test_tombstones_compaction_and_new_segments_apply_to_a_shard(tmp_path):
    from retrodb.add import add
    from retrodb.index import index

    db = many_segments(tmp_path)
    index(db, merge=True, threads=1)
    q = probe_vectors(db)
    delete(db, doc_ids=["d3", "d4"])
    unit = retrodb.open(db).snapshot.index_units[0]
    assert unit["files"]["dead"] and unit["live"] == unit["vectors"] - sum(
        len(v) for d, v in chunks_of(db, ["d3", "d4"], at=retrodb.open(db).version - 1).items())
    assert hnsw_ids(db, q) == exact_ids(db, q)
    gone = {c for ids in chunks_of(db, ["d3", "d4"], at=retrodb.open(db).version - 1).values() for c in ids}
    assert not gone & {c for row in hnsw_ids(db, q, k=30) for c in row}
    compact(db, 0.0, 0, merge_indexes=False)  # drops the two emptied segments: they leave the shard
    snap = retrodb.open(db).snapshot
    assert len(snap.segments) == 14 and [u["kind"] for u in snap.index_units] == ["shard"]
    assert hnsw_ids(db, q) == exact_ids(db, q)
    write_jsonl(tmp_path / "more.jsonl", ["m1", "m2"], seed=321)
    add(db, [str(tmp_path / "more.jsonl")], IngestOptions(workers=1))  # a fresh segment: its own index
    assert sorted(u["kind"] for u in retrodb.open(db).snapshot.index_units) == ["segment", "shard"]
    assert hnsw_ids(db, q) == exact_ids(db, q)
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]


def chunks_of(db, doc_ids, at=None) -> dict[str, list[int]]:
    rows = retrodb.open(db, at=at).sql("SELECT doc_id, list(chunk_id) AS ids FROM chunks GROUP BY 1").to_pylist()
    return {r["doc_id"]: r["ids"] for r in rows if r["doc_id"] in doc_ids}


@pytest.mark.parametrize("point", ["merge.batch_added#3", "merge.index_saved", "commit.group_written",
                                   "merge.before_commit"])
def test_kill9_during_a_tier_merge(tmp_path, point):
    db = many_segments(tmp_path)
    q = probe_vectors(db)
    want, version = exact_ids(db, q), retrodb.open(db).version
    proc = run_retrodb("index", db, "--merge", "--threads", "1", env={"RETRODB_KILL_AT": point})
    assert proc.returncode == -9, proc.stderr
    assert retrodb.open(db).version == version and hnsw_ids(db, q) == want  # still the last commit
    report = verify(db)
    assert report.ok, [f.message for f in report.errors]
    proc = run_retrodb("index", db, "--merge", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert [u["kind"] for u in retrodb.open(db).snapshot.index_units] == ["shard"]
    assert hnsw_ids(db, q) == want
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]
    assert len(list((db / "indexes").iterdir())) == 1  # the killed attempt's shard was removed by the journal


def test_redaction_leaves_no_vector_in_a_merged_shard(tmp_path):
    from retrodb.absent import AbsenceScanner
    from retrodb.index import index
    from retrodb.redact import build_selectors, redact
    from tests.edit_helpers import keys_by_chunk

    db = many_segments(tmp_path)
    index(db, merge=True, threads=1)
    delete(db, doc_ids=["d2"])  # a dead row the shard still holds in its file
    removed = chunks_of(db, ["d5"])["d5"] + chunks_of(db, ["d2"], at=retrodb.open(db).version - 1)["d2"]
    keys = keys_by_chunk(db)
    vectors = [np.frombuffer(keys[c], dtype=np.float16).astype(np.float32) for c in chunks_of(db, ["d5"])["d5"]]
    scanner = AbsenceScanner([], keys=vectors)
    shard = retrodb.open(db).snapshot.index_units[0]
    assert scanner.scan_file(db / shard["files"]["index"]["path"], "shard")  # the vectors are there before
    redact(db, build_selectors(doc_ids=["d5"]))
    after = retrodb.open(db).snapshot
    unit = next(u for u in after.index_units if u["name"] == shard["name"])
    assert unit["files"]["index"]["path"] != shard["files"]["index"]["path"]  # a rewritten copy
    assert not (db / shard["files"]["index"]["path"]).exists()
    assert AbsenceScanner([], keys=vectors).scan(db) == []  # no key file, no index, no shard holds them
    import hnswlib

    idx = hnswlib.Index(space="cosine", dim=16)
    idx.load_index(str(db / unit["files"]["index"]["path"]))
    labels, _ = idx.knn_query(np.stack(vectors), k=min(5, idx.get_current_count() - len(removed)))
    assert not set(labels.ravel().tolist()) & set(removed)  # erased vectors are marked deleted too
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]


def test_a_compacted_segment_leaves_its_shard_and_keeps_its_chunks(tmp_path):
    from retrodb.index import index

    db = build_db(tmp_path / "db", n_docs=30, segment_bytes=1200, index=True)
    assert len(retrodb.open(db).snapshot.segments) >= 8
    index(db, merge=True, threads=1)
    q = probe_vectors(db)
    delete(db, doc_ids=["d0"])
    before = content(db)
    compact(db, 0.0, 0, merge_indexes=False)  # d0's segment is rewritten without it, under a new number
    snap = retrodb.open(db).snapshot
    [seg_unit] = [u for u in snap.index_units if u["kind"] == "segment"]
    shard = next(u for u in snap.index_units if u["kind"] == "shard")
    moved = snap.segments[seg_unit["segment"]]
    assert moved.compacted_from and moved.shard is None and shard["live"] < shard["vectors"]
    assert content(db) == before and hnsw_ids(db, q) == exact_ids(db, q)
    [r] = retrodb.open(db).query(chunk_ids=[chunks_of(db, ["d1"])["d1"][0]], k=3)  # found in its new segment
    assert r.neighbours and all(n.doc_id != "d1" for n in r.neighbours)
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]


# ---------------------------------------------------------------- the id index


@pytest.fixture
def segment_reads(monkeypatch):
    """The segment directories whose files pyarrow or DuckDB is asked to read, by number."""
    import pyarrow.parquet as pq

    from retrodb import sql

    seen: set[int] = set()

    def note(path):
        parts = Path(str(path)).parts
        if "segments" in parts and parts.index("segments") + 1 < len(parts):
            seen.add(int(parts[parts.index("segments") + 1].removeprefix("seg-")))

    for name in ("read_table", "read_metadata", "ParquetFile"):
        real = getattr(pq, name)
        monkeypatch.setattr(pq, name, lambda path, *a, _real=real, **kw: note(path) or _real(path, *a, **kw))
    real_paths = sql._paths
    monkeypatch.setattr(sql, "_paths", lambda root, segs, kind: [note(p) or p for p in real_paths(root, segs, kind)])
    return seen


def test_ids_are_found_without_reading_other_segments(tmp_path, segment_reads):
    from retrodb.add import add
    from retrodb.redact import build_selectors, redact

    db = many_segments(tmp_path, n_docs=12)
    snap = retrodb.open(db).snapshot
    home = {d.doc_id: d.segment for d in retrodb.ids.locate(snap, [f"d{i}" for i in range(12)])}
    assert len(set(home.values())) == 12
    segment_reads.clear()
    delete(db, doc_ids=["d4"])
    assert segment_reads <= {home["d4"]}  # its tombstones at most, nothing else
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("d6\nd7\n")
    segment_reads.clear()
    from retrodb.delete import read_ids_file

    delete(db, doc_ids=read_ids_file(ids_file))
    assert segment_reads <= {home["d6"], home["d7"]}
    segment_reads.clear()
    delete(db, doc_ids=["d4", "d5"])  # d4 was deleted: its tombstones say so; d5 is live
    assert segment_reads == {home["d4"]}
    # add: the duplicate check reads the new segment and the segments of clashing ids only
    write_jsonl(tmp_path / "dup.jsonl", ["d8", "new-a"], seed=99)
    segment_reads.clear()
    report = add(db, [str(tmp_path / "dup.jsonl")], IngestOptions(workers=1))
    new = set(retrodb.open(db).snapshot.segments) - set(snap.segments)
    assert report.ingest.issue_counts == {"duplicate-id": 1} and segment_reads <= new | {home["d8"]}
    segment_reads.clear()
    report = add(db, [str(tmp_path / "dup.jsonl")], IngestOptions(workers=1), replace=True)
    newer = set(retrodb.open(db).snapshot.segments) - set(snap.segments) - new
    assert report.replaced == 2 and segment_reads <= newer | new | {home["d8"]}
    # redact --doc-id: planned and carried out on the segments that hold the id
    segment_reads.clear()
    next_before = retrodb.open(db).snapshot.next_segment
    redact(db, build_selectors(doc_ids=["d9"]))
    assert home["d9"] in segment_reads and {n for n in segment_reads if n < next_before} == {home["d9"]}
    assert verify(db).ok


def test_lookup_of_ids_in_many_runs_and_odd_ids(tmp_path, monkeypatch):
    """Ids sorted by their UTF-8 bytes across several runs (a merge of runs), including ids that sort oddly."""
    from retrodb import ids
    from retrodb.add import add

    monkeypatch.setattr(ids, "RUN_BASE", 4)  # tiny tiers: runs merge after a few adds
    monkeypatch.setattr(ids, "RUN_FACTOR", 2)
    monkeypatch.setattr(ids, "RUN_ROW_GROUP", 2)
    db = tmp_path / "db"
    odd = ["é", "z", "Z", "a b", "ß", "日本", "\U0001F600", "a", "ab", "a\u0301", "0", "-1"]
    for i in range(0, len(odd), 3):
        write_jsonl(tmp_path / f"part{i}.jsonl", odd[i: i + 3], seed=i)
        if i == 0:
            retrodb.ingest.ingest(db, [str(tmp_path / f"part{i}.jsonl")], IngestOptions(workers=1))
        else:
            add(db, [str(tmp_path / f"part{i}.jsonl")], IngestOptions(workers=1))
    snap = retrodb.open(db).snapshot
    assert 1 <= len(snap.id_runs) < 4  # merged as they filled their tiers
    live, dead = ids.lookup(snap, odd + ["missing", "é "])
    assert sorted(d.doc_id for d in live) == sorted(odd) and dead == []
    delete(db, doc_ids=["日本", "a"])
    live, dead = ids.lookup(retrodb.open(db).snapshot, ["日本", "a", "ab"])
    assert [d.doc_id for d in live] == ["ab"] and sorted(d.doc_id for d in dead) == sorted(["日本", "a"])
    assert verify(db).ok


def test_index_merge_on_unindexed_segments_builds_shards_directly(tmp_path):
    from retrodb.index import index

    db = build_db(tmp_path / "db", n_docs=20, segment_bytes=300)  # keys, no index
    q = probe_vectors(db)
    want = exact_ids(db, q)
    report = index(db, M=8, ef_construction=40, merge=True, threads=1)
    assert report.segments == [] and len(report.merged) == 1 and report.merged[0]["segments"] == 20
    assert not list((db / "segments").glob("*/index-*.hnsw"))  # no per-segment index was built first
    assert retrodb.open(db).config["index"] == {"space": "cosine", "M": 8, "ef_construction": 40}
    assert hnsw_ids(db, q) == want
    report = index(db, M=16, rebuild=True, merge=True, threads=1)  # other parameters: rebuilt, then merged again
    assert len(report.segments) == 20 and len(report.merged) == 1
    assert [u["kind"] for u in retrodb.open(db).snapshot.index_units] == ["shard"]
    assert hnsw_ids(db, q) == want
    assert verify(db).ok


def test_tier_plan_keeps_fewer_than_factor_units_per_tier_and_respects_the_cap():
    from retrodb.tiers import plan_merges, tier_of

    def after(sizes, plan):
        merged = {i for group in plan for i in group}
        return [s for i, s in enumerate(sizes) if i not in merged] + [sum(sizes[i] for i in g) for g in plan]

    rng = np.random.default_rng(1)
    for _ in range(20):
        sizes = rng.integers(1, 5000, rng.integers(1, 200)).tolist()
        plan = plan_merges(sizes, 100, 4)
        assert sorted(i for g in plan for i in g) == sorted(set(i for g in plan for i in g))  # each merged once
        result = after(sizes, plan)
        tiers = [tier_of(s, 100, 4) for s in result]
        assert all(tiers.count(t) < 4 for t in set(tiers))
        capped = after(sizes, plan_merges(sizes, 100, 4, cap=3000))
        assert max(capped) <= max(3000, max(sizes)) and sum(capped) == sum(sizes)
    assert plan_merges([10] * 7, 100, 8) == [] and plan_merges([10] * 8, 100, 8) == [list(range(8))]
