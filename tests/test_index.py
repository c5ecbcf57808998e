import json
import shutil
from pathlib import Path

import hnswlib
import numpy as np
import pytest

import retrodb
from retrodb.embed import embed
from retrodb.errors import ConfigMismatch, MissingStage, RetrodbError
from retrodb.index import build_segment_index, index
from retrodb.ingest import IngestOptions, ingest
from tests.conftest import run_retrodb

TOPICS = ["assert", "assignment", "async", "atom-identifiers", "augassign", "await", "break", "class", "compound",
          "context-managers", "continue", "conversions", "customization", "del", "dict", "exceptions", "for",
          "formatstrings", "function", "global", "if", "imaginary", "import", "in", "lambda", "lists", "naming",
          "numbers", "pass", "raise", "return", "sequence-types", "slicings", "string-methods", "try", "while", "with",
          "yield"]


def topic_corpus(directory: Path, names=TOPICS) -> Path:
    """Real English text: Python's documentation topics (pydoc_data), one file each."""
    from retrodb.demo_corpus import topics

    directory.mkdir(parents=True, exist_ok=True)
    all_topics = topics()
    for name in names:
        (directory / f"{name}.txt").write_text(all_topics[name], encoding="utf-8")
    return directory


def embedded_db(tmp: Path, names=TOPICS, segment_bytes: int = 20_000, db: Path | None = None) -> Path:
    """A database of several segments with hash:64 keys (no index)."""
    db = db or tmp / "db"
    ingest(db, [str(topic_corpus(tmp / f"corpus-{len(names)}-{names[0]}", names))],
           IngestOptions(workers=1, segment_bytes=segment_bytes))
    embed(db, "hash:64")
    return db


@pytest.fixture(scope="module")
def keyed_db(tmp_path_factory) -> Path:
    return embedded_db(tmp_path_factory.mktemp("index"))


@pytest.fixture
def fresh_db(keyed_db, tmp_path) -> Path:
    """A private copy of the keyed database, to edit."""
    path = tmp_path / "db"
    shutil.copytree(keyed_db, path)
    return path


def index_records(db: Path) -> dict[str, dict]:
    return {s.name: s.files.get("index") for s in retrodb.open(db).snapshot.segments.values()}


def test_index_every_segment_labels_are_chunk_ids(fresh_db):
    report = index(fresh_db, threads=2)
    snap = retrodb.open(fresh_db).snapshot
    assert len(snap.segments) >= 4 and sorted(report.segments) == [s.name for s in snap.segments.values()]
    assert snap.config["index"] == {"space": "cosine", "M": 32, "ef_construction": 200}
    assert report.chunks == snap.totals()["chunks"] and report.version == snap.version
    for seg in snap.segments.values():
        name = seg.name
        rec = seg.files["index"]
        assert rec["path"].startswith(f"segments/{name}/index-cosine-M32-efc200-")
        idx = hnswlib.Index(space="cosine", dim=64)
        idx.load_index(str(fresh_db / rec["path"]))
        ids = retrodb.open(fresh_db).sql(f"SELECT chunk_id FROM chunks WHERE segment = '{name}' ORDER BY 1")
        assert sorted(idx.get_ids_list()) == ids.column(0).to_pylist()
        # the stored vector of a chunk is its key
        keys = np.load(fresh_db / seg.files["keys"]["path"]).astype(np.float32)
        first = ids.column(0)[0].as_py()
        np.testing.assert_allclose(idx.get_items([first])[0], keys[0] / np.linalg.norm(keys[0]), atol=1e-6)
    assert not list(fresh_db.rglob(".tmp-*"))


def test_only_segments_without_index_are_built(fresh_db, tmp_path):
    first = index(fresh_db)
    before = index_records(fresh_db)
    again = index(fresh_db)
    assert again.segments == [] and again.up_to_date == len(first.segments) and again.version == first.version
    more = topic_corpus(tmp_path / "more", ["nonlocal", "objects", "operator-summary"])
    ingest(fresh_db, [str(more)], IngestOptions(workers=1))
    embed(fresh_db, "hash:64")
    new = set(index_records(fresh_db)) - set(before)
    report = index(fresh_db)
    assert set(report.segments) == new and len(new) == 1
    after = index_records(fresh_db)
    assert {n: after[n] for n in before} == before


def test_commits_every_n_segments_and_resumes_after_kill(fresh_db):
    segments = [s.name for s in retrodb.open(fresh_db).snapshot.segments.values()]
    v0 = retrodb.open(fresh_db).version
    proc = run_retrodb("index", fresh_db, "--commit-every", "2", "--threads", "1",
                       env={"RETRODB_KILL_AT": "index.segment_published#3"})
    assert proc.returncode == -9
    db = retrodb.open(fresh_db)
    assert db.version == v0 + 1  # one commit of two segments; the third was published, not committed
    done = [n for n, rec in index_records(fresh_db).items() if rec]
    assert done == segments[:2]
    third = list((fresh_db / "segments" / segments[2]).glob("index-*.hnsw"))
    assert len(third) == 1  # published before the kill: picked up, not rebuilt
    proc = run_retrodb("index", fresh_db, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["segments"] == segments[2:] and report["resumed_segments"] == 1
    assert all(index_records(fresh_db).values())
    assert index_records(fresh_db)[segments[2]]["path"] == third[0].relative_to(fresh_db).as_posix()
    assert not list(fresh_db.rglob(".tmp-*"))


def test_kill_mid_build_leaves_nothing_and_rerun_finishes(fresh_db):
    v0 = retrodb.open(fresh_db).version
    proc = run_retrodb("index", fresh_db, env={"RETRODB_KILL_AT": "index.saved"})
    assert proc.returncode == -9
    assert retrodb.open(fresh_db).version == v0 and not any(index_records(fresh_db).values())
    assert list(fresh_db.rglob(".tmp-*"))  # the half-built index's temporary file...
    report = index(fresh_db)
    assert not list(fresh_db.rglob(".tmp-*"))  # ...is cleaned by the next writer
    assert report.resumed_segments == 0 and all(index_records(fresh_db).values())


def test_params_are_recorded_and_a_change_needs_rebuild(fresh_db):
    index(fresh_db, M=8, ef_construction=50)
    old = index_records(fresh_db)
    with pytest.raises(ConfigMismatch, match="M=8 ef_construction=50") as err:
        index(fresh_db, M=16)
    assert "--rebuild" in err.value.hint
    assert index(fresh_db).segments == []  # no options: the recorded ones, nothing to do
    report = index(fresh_db, M=16, rebuild=True)
    new = index_records(fresh_db)
    assert sorted(report.segments) == sorted(new)
    assert retrodb.open(fresh_db).config["index"] == {"space": "cosine", "M": 16, "ef_construction": 50}
    assert all("-M16-efc50-" in r["path"] and r["path"] != old[n]["path"] for n, r in new.items())
    assert all((fresh_db / r["path"]).exists() for r in old.values())  # old files stay for old snapshots


def test_bad_params_and_missing_keys(tmp_path, keyed_db):
    with pytest.raises(RetrodbError, match="unknown index space 'l2'"):
        index(keyed_db, space="l2")
    db = tmp_path / "db"
    ingest(db, [str(topic_corpus(tmp_path / "c", ["pass"]))], IngestOptions(workers=1))
    with pytest.raises(MissingStage, match="no keys yet") as err:
        index(db)
    assert "retrodb embed" in err.value.hint


def test_build_segment_index_interface(fresh_db):
    snap = retrodb.open(fresh_db).snapshot
    seg = next(iter(snap.segments.values()))
    name = seg.name
    params = {"space": "ip", "M": 8, "ef_construction": 40}
    rec = build_segment_index(fresh_db, seg, params, threads=1)
    path = fresh_db / rec["path"]
    assert path.parent == fresh_db / "segments" / name and path.name.startswith("index-ip-M8-efc40-")
    assert rec == retrodb.atomic.file_record(fresh_db, path)
    idx = hnswlib.Index(space="ip", dim=64)
    idx.load_index(str(path))
    assert idx.get_current_count() == seg.chunks


def test_cli_index_errors_and_json(cli, fresh_db):
    r = cli("index", fresh_db, "--M", "12", "--format", "json")
    assert r.code == 0, r.err
    out = r.json_lines()[0]
    assert out["params"]["M"] == 12 and out["chunks"] > 0 and out["keys_per_s"] > 0
    r = cli("index", fresh_db, "--M", "13")
    assert r.code == 1 and "error: " in r.err and "--rebuild" in r.err and "Traceback" not in r.err
    r = cli("index", fresh_db / "nope")
    assert r.code == 1 and "no retrodb database" in r.err
