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


def test_group_summaries_answer_stats_without_reading_groups(tmp_path, monkeypatch):
    db = many_segments(tmp_path, n_docs=6)
    delete(db, doc_ids=["d2"])
    read = []
    real = retrodb.snapshot.load_group
    monkeypatch.setattr(retrodb.snapshot, "load_group", lambda root, ref: read.append(ref.path) or real(root, ref))
    handle = retrodb.open(db)
    stats = handle.stats()
    assert (stats["documents"], stats["deleted_documents"], stats["segments"]) == (5, 1, 6)
    assert handle.log()[-1]["documents"] == 5
    assert read == []  # the root's summaries answered; no group manifest was read
    assert len(handle.stats(segments=True)["per_segment"]) == 6 and read
