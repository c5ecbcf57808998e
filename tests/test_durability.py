"""Crash and power-loss safety beyond the kill points of test_crash.py, and what long-lived readers keep.

- ingest's duplicate removal rewrites a staged segment: killed at any point of it, a rerun finishes it;
- every new directory is fsynced into its parent (checked by wrapping os.fsync);
- two first ingests into the same new path: one creates the database, the other waits (--wait) for it;
- a long-lived handle keeps one loaded index per segment, whatever the deletes; the model's identity is
  hashed once, not per query;
- a script that calls retrodb at its top level (no __main__ guard) runs, in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import retrodb
from retrodb.ingest import IngestOptions, ingest
from retrodb.verify import verify
from tests.conftest import REPO, run_retrodb
from tests.edit_helpers import build_db, content, write_jsonl

DROP_POINTS = ["ingest.drop_planned#1", "ingest.drop_documents_written#1", "ingest.drop_chunks_written#1",
               "ingest.drop_planned#2", "ingest.drop_chunks_written#2"]


@pytest.fixture(scope="module")
def dup_template(tmp_path_factory):
    """A database holding a0..a5, and an input whose later segments repeat ids of earlier ones and of the
    database, so that duplicate removal rewrites two staged segments."""
    root = tmp_path_factory.mktemp("dups")
    ingest(root / "db", [str(write_jsonl(root / "first.jsonl", [f"a{i}" for i in range(6)]))],
           IngestOptions(workers=1))
    ids = [f"n{i}" for i in range(6)] + ["n1", "a2"] + [f"n{i}" for i in range(6, 12)] + ["n5", "a4", "n14"]
    write_jsonl(root / "more.jsonl", ids, seed=500)
    return root


@pytest.mark.parametrize("point", DROP_POINTS)
def test_kill9_inside_duplicate_removal_then_rerun(dup_template, tmp_path, point):
    import shutil

    args = lambda db: ("ingest", db, dup_template / "more.jsonl", "--workers", "1", "--segment-mb", "0.003")  # noqa: E731
    ref, db = tmp_path / "ref", tmp_path / "db"
    shutil.copytree(dup_template / "db", ref)
    shutil.copytree(dup_template / "db", db)
    proc = run_retrodb(*args(ref), "--format", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["issue_counts"] == {"duplicate-id": 4}
    proc = run_retrodb(*args(db), env={"RETRODB_KILL_AT": point})
    assert proc.returncode == -signal.SIGKILL, f"kill point {point} was never reached"
    assert retrodb.open(db).version == 1
    proc = run_retrodb(*args(db), "--format", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    report = verify(db)
    assert report.ok and not report.warnings, [f.message for f in report.findings]
    assert content(db) == content(ref)


def test_new_directories_are_fsynced_into_their_parents(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_mkdir = os.fsync, os.mkdir

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        events.append(("mkdir", os.path.abspath(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "mkdir", mkdir)
    db = tmp_path / "new" / "db"
    ingest(db, [str(write_jsonl(tmp_path / "in.jsonl", [f"d{i}" for i in range(12)]))],
           IngestOptions(workers=1, segment_bytes=1500))
    from retrodb.compact import compact
    from retrodb.delete import delete

    delete(db, doc_ids=["d1", "d2", "d3"])
    compact(db, 0.1, 0, workers=1)
    created = [p for kind, p in events if kind == "mkdir"]
    expected = {str(tmp_path / "new"), str(db), str(db / "manifests"), str(db / "segments"), str(db / "_work"),
                str(db / "segments" / "seg-000001")}
    assert expected <= set(created), created
    assert any("seg-00000" in p and p > str(db / "segments" / "seg-000003") for p in created)  # compact's
    for i, (kind, path) in enumerate(events):
        if kind == "mkdir":
            parent = os.path.dirname(path)
            assert ("fsync", parent) in events[i + 1:], f"{path} was created but {parent} never fsynced after"


HOLD = r"""
import sys, time
from retrodb.lock import WriterLock
lock = WriterLock(sys.argv[1], "holder").acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_first_ingest_waits_for_the_lock_instead_of_refusing(tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    src = write_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(5)])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db), "2"], cwd=REPO, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = run_retrodb("ingest", db, src)  # without --wait: busy, and said so (not "not empty")
        assert busy.returncode == 1 and b"database busy" in busy.stderr, busy.stderr
        proc = run_retrodb("ingest", db, src, "--wait", "60")
        assert proc.returncode == 0, proc.stderr.decode()
    finally:
        holder.wait(timeout=60)
    assert retrodb.open(db).stats()["documents"] == 5


def test_two_concurrent_first_ingests_both_land(tmp_path):
    db = tmp_path / "db"
    srcs = [write_jsonl(tmp_path / f"{x}.jsonl", [f"{x}{i}" for i in range(5)], seed=k * 50)
            for k, x in enumerate("ab")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "retrodb.cli", "ingest", str(db), str(s), "--wait", "120"],
                              cwd=REPO, env=env, stderr=subprocess.PIPE) for s in srcs]
    errs = [p.communicate(timeout=180)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert retrodb.open(db).stats()["documents"] == 10 and verify(db).ok


def test_long_lived_handle_keeps_one_index_per_segment(tmp_path):
    from retrodb.delete import delete

    root = build_db(tmp_path / "db", n_docs=12, segment_bytes=1500, index=True)
    handle = retrodb.open(root)
    segments = len(handle.snapshot.segments)
    for i in range(6):
        handle.query("retrieval database chunk", k=3)
        delete(root, doc_ids=[f"d{i}"])
        handle.snapshot = retrodb.open(root).snapshot  # what refresh() does: the handle moves on
    handle.query("retrodb database chunk", k=3)
    indexes = [k for k in handle._query_cache if k[0] == "index"]
    assert len(indexes) <= segments, indexes
    delete(root, doc_ids=["d11"])
    assert handle.refresh().version == retrodb.open(root).version
    assert "d11" not in {n.doc_id for n in handle.query("retrieval database chunk", k=12)[0].neighbours}


def test_model_identity_is_hashed_once(tmp_path, monkeypatch):
    from retrodb import embedder as em

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(1 << 16))
    calls = []
    real = em._hash_files
    monkeypatch.setattr(em, "_hash_files", lambda files: calls.append(files) or real(files))
    monkeypatch.setattr(em, "_IDENTITIES", {})
    first = em.weights_sha256(model)
    assert em.weights_sha256(model) == first and len(calls) == 1
    monkeypatch.setattr(em, "_IDENTITIES", {})  # a new process: the digest comes from the on-disk cache
    assert em.weights_sha256(model) == first and len(calls) == 1
    import hashlib

    assert first == hashlib.sha256(b"model.safetensors" + (model / "model.safetensors").read_bytes()).hexdigest()
    with open(model / "model.safetensors", "ab") as f:  # changed weights are hashed again
        f.write(b"x")
    assert em.weights_sha256(model) != first and len(calls) == 2


SCRIPT = """
from retrodb.ingest import ingest, IngestOptions
{guard}report = ingest({db!r}, [{src!r}], IngestOptions(workers=2, segment_bytes=1500))
{indent}print("documents", report.documents)
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_readme_example_as_a_script(tmp_path, guarded):
    src = write_jsonl(tmp_path / "in.jsonl", [f"d{i}" for i in range(12)])
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(SCRIPT).format(
        guard='if __name__ == "__main__":\n    ' if guarded else "", indent="    " if guarded else "",
        db=str(tmp_path / "db"), src=str(src)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "documents 12"
    assert ("runs in this process" in proc.stderr) == (not guarded), proc.stderr


def test_a_create_killed_before_current_is_finished_by_the_rerun(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["a0", "a1"])
    proc = run_retrodb("ingest", tmp_path / "db", src, env={"RETRODB_KILL_AT": "commit.before_current"})
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "db" / "CURRENT").exists()
    proc = run_retrodb("ingest", tmp_path / "db", src)  # the leftovers of the create are not "not empty"
    assert proc.returncode == 0, proc.stderr.decode()
    assert retrodb.open(tmp_path / "db").stats()["documents"] == 2
