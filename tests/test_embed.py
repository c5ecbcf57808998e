"""`retrodb embed` with the hash test embedder: alignment, resumption, commits, identity, CLI.

The BERT path (reference keys, dtypes, batching) is in test_embed_bert.py.
"""

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

import retrodb
from retrodb.embed import embed, embed_texts, job_name
from retrodb.embedder import HashEmbedder, load_embedder
from retrodb.errors import ConfigMismatch, MissingStage
from retrodb.ingest import IngestOptions, ingest
from tests.conftest import make_text, run_retrodb

HASH = "hash:64"


def write_corpus(directory, ids, n_words=150):
    directory.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (directory / f"doc{i:03d}.txt").write_text(make_text(i, n_words), encoding="utf-8")
    return directory


def small_segments(db_path, corpus, segment_bytes=3000):
    return ingest(db_path, [str(corpus)], IngestOptions(workers=1, segment_bytes=segment_bytes))


def chunk_text_by_id(db) -> dict[int, str]:
    """Each chunk's text from its character span, joined in SQL (independent of the embed stage's reader)."""
    rows = db.sql("SELECT c.chunk_id, substr(d.text, c.char_start + 1, c.char_end - c.char_start) AS t "
                  "FROM chunks c JOIN documents d ON c.doc_id = d.doc_id AND c.segment = d.segment").to_pylist()
    return {r["chunk_id"]: r["t"] for r in rows}


def stored_and_expected(db_path, embed_fn):
    """(stored keys, keys of the chunk texts row by row) for every segment of the current snapshot."""
    db = retrodb.open(db_path)
    text_of = chunk_text_by_id(db)
    out = {}
    for name, seg in sorted(db.snapshot.segments.items()):
        ids = pq.read_table(db.root / seg.files["chunks"]["path"], columns=["chunk_id"])["chunk_id"].to_pylist()
        stored = np.load(db.root / seg.files["keys"]["path"])
        assert stored.dtype == np.float16 and stored.shape == (seg.chunks, stored.shape[1])
        out[name] = (stored, embed_fn([text_of[i] for i in ids]))
    return out


def assert_keys_match(db_path, dim=64):
    pairs = stored_and_expected(db_path, HashEmbedder(dim).embed)
    assert pairs
    for name, (stored, expected) in pairs.items():
        assert stored.shape == expected.shape, name
        cos = np.sum(stored.astype(np.float32) * expected, axis=1)
        assert cos.min() > 0.999, (name, cos.min())
        if len(expected) > 1:  # neighbouring rows differ, so a shifted row could not pass
            assert np.sum(expected[:-1] * expected[1:], axis=1).min() < 0.99
    return pairs


def test_keys_line_up_with_chunks_across_runs_and_shuffled_segments(tmp_path, db_path):
    ids = list(range(36))
    random.Random(7).shuffle(ids)
    small_segments(db_path, write_corpus(tmp_path / "a", ids[:12]))
    first = embed(db_path, HASH)
    assert first.chunks > 0 and len(first.segments) >= 3 and first.commits == 1
    small_segments(db_path, write_corpus(tmp_path / "b", ids[12:24]))
    small_segments(db_path, write_corpus(tmp_path / "c", ids[24:]), segment_bytes=5000)
    db = retrodb.open(db_path)
    old = {s.name: s.files["keys"] for s in db.snapshot.segments.values() if "keys" in s.files}
    second = embed(db_path)  # the database's embedder, only the new segments
    assert sorted(second.segments) == sorted({s.name for s in db.snapshot.segments.values()} - set(old))
    assert second.skipped_segments == len(old)
    after = retrodb.open(db_path).snapshot.segments
    assert {n: after[n].files["keys"] for n in old} == old  # committed keys untouched
    assert_keys_match(db_path)
    assert sum(s.chunks for s in after.values()) == first.chunks + second.chunks


def test_first_commit_records_identity_with_keys_and_commits_in_groups(tmp_path, db_path):
    small_segments(db_path, write_corpus(tmp_path / "a", range(20)), segment_bytes=2500)
    segments = retrodb.open(db_path).snapshot.segments
    assert len(segments) >= 5
    before = retrodb.open(db_path).version
    report = embed(db_path, HASH, commit_every_segments=2)
    assert report.commits == (len(segments) + 1) // 2
    assert report.version == before + report.commits
    first = retrodb.open(db_path, at=before + 1).snapshot
    assert first.config["embedder"] == HashEmbedder(64).identity()
    assert sum("keys" in s.files for s in first.segments.values()) == 2
    assert retrodb.open(db_path, at=before).config["embedder"] is None
    assert all("keys" in s.files for s in retrodb.open(db_path).snapshot.segments.values())
    assert not (db_path / "_work" / job_name(HashEmbedder(64).identity())).exists()


def test_rerun_embeds_nothing_and_commits_nothing(tmp_path, db_path):
    small_segments(db_path, write_corpus(tmp_path / "a", range(6)))
    embed(db_path, HASH)
    version = retrodb.open(db_path).version
    again = embed(db_path)
    assert (again.chunks, again.segments, again.commits, again.version) == (0, [], 0, version)
    assert again.skipped_segments == len(retrodb.open(db_path).snapshot.segments)


def test_other_model_refused_unless_reembed(tmp_path, db_path, cli):
    small_segments(db_path, write_corpus(tmp_path / "a", range(8)))
    embed(db_path, HASH)
    with pytest.raises(ConfigMismatch, match=r"keys were made by hash:64 .*this embedder is hash:32"):
        embed(db_path, "hash:32")
    with pytest.raises(ConfigMismatch, match="max length 128.*max length 16"):
        embed(db_path, max_length=16)
    res = cli("embed", db_path, "--model", "hash:32")
    assert res.code == 1 and res.err.startswith("error: the database's keys were made by hash:64")
    assert "--reembed" in res.err and "Traceback" not in res.err
    # An index made from the old keys must go too.
    db = retrodb.open(db_path)
    with db.writer("test") as w:
        edit = w.edit("test")
        seg = next(iter(w.base.segments.values()))
        edit.set_files(seg.number, {"index": dict(seg.files["keys"])})
        w.commit(edit)
    report = embed(db_path, "hash:32", reembed=True, commit_every_segments=1)
    db = retrodb.open(db_path)
    assert db.config["embedder"]["dim"] == 32 and report.segments == [s.name for s in db.snapshot.segments.values()]
    first = retrodb.open(db_path, at=db.version - report.commits + 1).snapshot
    assert [s.name for s in first.segments.values() if "keys" in s.files] == report.segments[:1]
    assert not any("index" in s.files for s in first.segments.values())
    assert_keys_match(db_path, dim=32)


def test_kill9_mid_segment_resumes_from_last_pass(tmp_path, db_path):
    small_segments(db_path, write_corpus(tmp_path / "a", range(12)), segment_bytes=1 << 20)
    total = retrodb.open(db_path).snapshot.totals()["chunks"]
    assert total > 30
    env = {"RETRODB_EMBED_PASS_ROWS": "10"}
    proc = run_retrodb("embed", db_path, "--model", HASH, "-f", "json", env={**env, "RETRODB_KILL_AT": "embed.pass_done#2"})
    assert proc.returncode == -9
    db = retrodb.open(db_path)
    assert db.version == 1 and db.config["embedder"] is None  # nothing committed
    proc = run_retrodb("embed", db_path, "--model", HASH, "-f", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["resumed_chunks"] == 20 and report["chunks"] == total - 20  # no key computed twice
    assert_keys_match(db_path)


@pytest.mark.parametrize("kill_at", ["embed.segment_done#2", "embed.before_commit", "commit.before_current"])
def test_kill9_between_segments_and_commit_keeps_finished_segments(tmp_path, db_path, kill_at):
    small_segments(db_path, write_corpus(tmp_path / "a", range(12)))
    n_segments = len(retrodb.open(db_path).snapshot.segments)
    assert n_segments >= 3
    proc = run_retrodb("embed", db_path, "--model", HASH, "-f", "json", env={"RETRODB_KILL_AT": kill_at})
    assert proc.returncode == -9
    assert retrodb.open(db_path).version == 1
    proc = run_retrodb("embed", db_path, "--model", HASH, "-f", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    done_before = 2 if kill_at.startswith("embed.segment_done") else n_segments
    seg_chunks = [s.chunks for _, s in sorted(retrodb.open(db_path).snapshot.segments.items())]
    assert report["resumed_chunks"] == sum(seg_chunks[:done_before])
    assert report["chunks"] == sum(seg_chunks[done_before:])
    assert report["commits"] == 1 and report["version"] == 2
    assert_keys_match(db_path)


def test_other_commit_discards_unfinished_work(tmp_path, db_path):
    """Partial keys are kept only while the database is unchanged; afterwards the rerun starts over, correctly."""
    small_segments(db_path, write_corpus(tmp_path / "a", range(12)), segment_bytes=1 << 20)
    env = {"RETRODB_EMBED_PASS_ROWS": "10"}
    proc = run_retrodb("embed", db_path, "--model", HASH, env={**env, "RETRODB_KILL_AT": "embed.pass_done#2"})
    assert proc.returncode == -9
    assert (db_path / "_work" / job_name(HashEmbedder(64).identity())).exists()
    small_segments(db_path, write_corpus(tmp_path / "b", range(12, 15)))
    assert not (db_path / "_work" / job_name(HashEmbedder(64).identity())).exists()
    report = embed(db_path, HASH)
    assert report.resumed_chunks == 0
    assert_keys_match(db_path)


def test_embed_texts_matches_stored_keys(tmp_path, db_path):
    small_segments(db_path, write_corpus(tmp_path / "a", range(5)))
    with pytest.raises(MissingStage, match="no keys yet"):
        embed_texts(db_path, ["x"])
    embed(db_path, HASH)
    (stored, _), = list(stored_and_expected(db_path, HashEmbedder(64).embed).values())[:1]
    db = retrodb.open(db_path)
    name, seg = sorted(db.snapshot.segments.items())[0]
    ids = pq.read_table(db.root / seg.files["chunks"]["path"], columns=["chunk_id"])["chunk_id"].to_pylist()
    texts = [chunk_text_by_id(db)[i] for i in ids[:7]]
    got = embed_texts(db, texts)
    assert got.dtype == np.float32 and got.shape == (7, 64)
    assert np.allclose(got, stored[:7].astype(np.float32), atol=1e-3)
    assert np.allclose(embed_texts(str(db_path), texts[:2]), got[:2])
    assert embed_texts(db, []).shape == (0, 64)
    with pytest.raises(retrodb.RetrodbError, match="list of strings"):
        embed_texts(db, "one string")


def test_cli_json_schema(cli, tmp_path, db_path):
    small_segments(db_path, write_corpus(tmp_path / "a", range(4)))
    res = cli("embed", db_path, "--model", HASH, "--format", "json")
    assert res.code == 0, res.err
    (rec,) = res.json_lines()
    assert set(rec) == {"version", "model", "device", "dtype", "batch_size", "segments", "skipped_segments", "chunks",
                        "resumed_chunks", "commits", "model_loaded", "load_seconds", "seconds", "chunks_per_s",
                        "executor", "nodes", "retried_units"}
    assert rec["executor"] == "local" and rec["nodes"] == {} and rec["retried_units"] == 0
    total = retrodb.open(db_path).snapshot.totals()["chunks"]
    assert (rec["version"], rec["model"], rec["chunks"], rec["commits"], rec["resumed_chunks"]) == (2, HASH, total, 1, 0)
    assert rec["device"] == "cpu" and rec["model_loaded"] is False and rec["chunks_per_s"] > 0
    assert rec["segments"] == [s.name for s in retrodb.open(db_path).snapshot.segments.values()]
    res = cli("embed", db_path, "-f", "json")
    (rec,) = res.json_lines()
    assert (rec["chunks"], rec["segments"], rec["commits"], rec["chunks_per_s"]) == (0, [], 0, None)
    human = cli("embed", db_path)
    assert human.code == 0 and "nothing to embed" in human.out


@pytest.mark.parametrize("args, message", [
    (["--model", "hash:x"], "bad hash embedder"),
    (["--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
    (["--device", "tpu", "--model", "/"], "unknown device 'tpu'"),
])
def test_bad_options_are_clear_errors(cli, tmp_path, db_path, args, message):
    small_segments(db_path, write_corpus(tmp_path / "a", range(2)))
    res = cli("embed", db_path, *args)
    assert res.code == (1 if "does not exist" in message else 2) and message in res.err and "Traceback" not in res.err


def test_missing_database_is_a_clear_error(cli, tmp_path):
    res = cli("embed", tmp_path / "nope", "--model", HASH)
    assert res.code == 1 and "no retrodb database" in res.err


def test_hash_embedder_is_deterministic_and_unit():
    emb = load_embedder(HASH)
    a = emb.embed(["the frozen encoder", "", "retrieval database"])
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0)
    assert np.array_equal(a, load_embedder(HASH).embed(["the frozen encoder", "", "retrieval database"]))
    assert np.array_equal(a[2:], emb.embed(["retrieval database"]))


def test_progress_shows_rate_and_eta(cli, tmp_path, db_path):
    small_segments(db_path, write_corpus(tmp_path / "a", range(6)))
    res = cli("embed", db_path, "--model", HASH)
    assert res.code == 0, res.err
    assert "chunks/s" in res.err and "ETA" in res.err and "committed v2" in res.out
