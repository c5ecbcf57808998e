"""Crash safety and concurrency of the edit commands, end to end in subprocesses.

Each case copies a small embedded database, runs one command under
RETRODB_KILL_AT (the process SIGKILLs itself at that point, exactly like
kill -9), then checks that the database opens at the last committed
snapshot, that verify finds no error, and that rerunning the command
finishes the job with the same content as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import retrodb
from retrodb.cli.main import run as cli_run
from retrodb.verify import verify
from tests.conftest import REPO, run_retrodb
from tests.edit_helpers import build_db, write_jsonl
from tests.edit_helpers import content as edit_content

# (command, kill points): a point with #N is its Nth hit in the process
KILL_POINTS = {
    "add": ["ingest.before_close", "ingest.before_marker", "ingest.segment_done#1", "ingest.segment_done#2",
            "embed.pass_done#1", "embed.pass_done#2", "add.embedded", "index.batch_added#1", "index.saved#2",
            "index.segment_published#1", "add.indexed", "delete.tombstones_written#1", "delete.tombstones_written#2",
            "commit.group_written#1", "commit.id_run_written#1", "commit.metadata_written",
            "commit.before_manifest", "commit.before_current", "commit.after_current"],
    "delete": ["delete.tombstones_written#1", "delete.tombstones_written#2", "commit.group_written#1",
               "commit.metadata_written", "commit.before_manifest", "commit.before_current", "commit.after_current"],
    "compact": ["compact.documents_written", "compact.chunks_written", "compact.keys_written#1",
                "compact.keys_written#2", "index.saved#1", "compact.index_written#2", "compact.neighbours_written#1",
                "compact.segment_done#1",
                "compact.segment_done#2",
                "compact.before_commit", "commit.group_written#1", "commit.id_run_written#1", "commit.before_manifest",
                "commit.before_current", "commit.after_current"],
    "neighbours": ["neighbours.block_done#1", "neighbours.block_done#3", "neighbours.segment_published#1",
                   "neighbours.segment_published#2", "neighbours.before_commit", "commit.before_manifest",
                   "commit.before_current", "commit.after_current"],
    "vacuum": ["vacuum.manifests_removed", "vacuum.file_removed#1", "vacuum.file_removed#4",
               "vacuum.file_removed#12"],
}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """An embedded, indexed database with neighbours, deletions in several segments since, and history to vacuum,
    plus the add input."""
    root = tmp_path_factory.mktemp("crash")
    db = build_db(root / "db", n_docs=24, segment_bytes=1500, index=True)
    from retrodb.delete import delete
    from retrodb.neighbours import compute_neighbours

    compute_neighbours(db, 2)

    delete(db, doc_ids=[f"d{i}" for i in range(0, 24, 2)])  # every other document: all segments qualify
    write_jsonl(root / "add.jsonl", [f"d{i}" for i in (1, 3)] + [f"new{i}" for i in range(10)], seed=300)
    return root


def command_args(cmd: str, db, template) -> list:
    return {
        "add": ["add", db, template / "add.jsonl", "--replace", "--segment-mb", "0.002", "--workers", "1"],
        "delete": ["delete", db, "--doc-id", "d1", "--doc-id", "d5", "--doc-id", "d9", "--yes"],
        "compact": ["compact", db, "--target-segment-chunks", "10", "--workers", "1"],
        "vacuum": ["vacuum", db, "--grace", "0s", "--yes"],
        "neighbours": ["neighbours", db, "--refresh"],
    }[cmd]


def prepare(template, name: str, cmd: str):
    db = template / name
    shutil.rmtree(db, ignore_errors=True)
    shutil.copytree(template / "db", db)
    if cmd == "vacuum":  # give vacuum something to delete: superseded segments
        from retrodb.compact import compact

        compact(db, 0.2, 10, workers=1)
    return db


def content(db) -> dict:
    """What readers see, the stored neighbours (SQL view) included."""
    out = edit_content(db)
    out["neighbours"] = retrodb.open(db).sql("SELECT * FROM neighbours ORDER BY chunk_id, rank").to_pylist()
    return out


def without_ids(c: dict) -> tuple:
    return c["documents"], sorted((doc, pos, tokens) for doc, pos, tokens, _ in c["chunks"].values())


def files_on_disk(db) -> set[str]:
    return {p.relative_to(db).as_posix() for p in db.rglob("*") if p.is_file() and p.name != "LOCK"}


@pytest.mark.parametrize("cmd", sorted(KILL_POINTS))
def test_kill9_at_every_point_then_rerun(template, cmd):
    reference = prepare(template, f"{cmd}-ref", cmd)
    proc = run_retrodb(*command_args(cmd, reference, template))
    assert proc.returncode == 0, proc.stderr.decode()
    want = content(reference)
    want_version = retrodb.open(reference).version
    killed = 0
    for point in KILL_POINTS[cmd]:
        db = prepare(template, f"{cmd}-kill", cmd)
        before = retrodb.open(db).version
        before_content = content(db)
        proc = run_retrodb(*command_args(cmd, db, template), env={"RETRODB_KILL_AT": point})
        assert proc.returncode == -signal.SIGKILL, f"{cmd}: kill point {point} was never reached"
        killed += 1
        committed = point == "commit.after_current"
        db_now = retrodb.open(db)
        assert db_now.version == (before + 1 if committed else before), point
        if not committed:
            assert content(db) == before_content, point  # nothing partial is visible
        report = verify(db)
        assert report.ok, (point, [f.message for f in report.errors])
        code = cli_run([str(a) for a in command_args(cmd, db, template)] + ["--format", "json"])  # rerun, in process
        assert code == 0, point
        if committed and cmd == "add":  # the rerun replaces the (identical) documents once more: new chunk ids
            assert without_ids(content(db)) == without_ids(want), point
            assert retrodb.open(db).version == want_version + 1, point
        else:
            assert content(db) == want, point
            assert retrodb.open(db).version == want_version, point
        report = verify(db)
        assert report.ok and not report.warnings, (point, [f.message for f in report.findings])
        if cmd == "vacuum":
            assert files_on_disk(db) == files_on_disk(reference), point
    print(f"\n{cmd}: {killed} kill points tried, each reopened, verified and rerun to the same result")
    assert killed == len(KILL_POINTS[cmd])


def test_kill_point_count():
    total = sum(len(p) for p in KILL_POINTS.values())
    print(f"\nkill points across add, delete, compact, neighbours, vacuum: {total}")
    assert total >= 30


READER = r"""
import json, sys, time
import retrodb
root, stop, query = sys.argv[1], sys.argv[2], sys.argv[3]
import os
while not os.path.exists(stop):
    try:
        db = retrodb.open(root)
        s = db.stats()
        docs, chunks, tokens = db.sql(
            "SELECT (SELECT count(*) FROM documents), count(*), coalesce(sum(num_tokens), 0) FROM chunks"
        ).to_pylist()[0].values()
        found = [n.doc_id for n in db.query(query, k=3, ef=100)[0].neighbours]
        print(json.dumps({"version": s["version"], "stats": [s["documents"], s["chunks"], s["tokens"]],
                          "sql": [docs, chunks, int(tokens)], "found": found}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""


def test_readers_see_whole_snapshots_during_add_and_compact(tmp_path):
    db = build_db(tmp_path / "db", n_docs=24, segment_bytes=1500, index=True)
    from retrodb.add import add
    from retrodb.compact import compact
    from retrodb.delete import delete
    from retrodb.ingest import IngestOptions

    delete(db, doc_ids=[f"d{i}" for i in range(0, 24, 3)])
    src = write_jsonl(tmp_path / "more.jsonl", [f"m{i}" for i in range(40)], seed=1000)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"id": "odd", "text": ODD_TEXT}) + "\n")
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db), str(stop), ODD_TEXT], cwd=REPO,
                              stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)), text=True)
    try:
        time.sleep(1.5)
        for i in range(3):
            add(db, [str(src)] + ([str(odd)] if i == 1 else []), IngestOptions(workers=1, segment_bytes=2000),
                replace=True)
            compact(db, 0.1, 60, workers=1)
        time.sleep(0.5)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = [json.loads(line) for line in out.splitlines()]
    assert seen and not [s for s in seen if "error" in s]
    committed = {e["version"]: [e["documents"], e["chunks"], e["tokens"]] for e in retrodb.open(db).log()}
    has_odd = {e["version"]: bool(retrodb.open(db, at=e["version"]).sql(
        "SELECT count(*) FROM documents WHERE doc_id = 'odd'").column(0)[0].as_py()) for e in retrodb.open(db).log()}
    for s in seen:
        assert s["stats"] == s["sql"] == committed[s["version"]], s  # a whole snapshot, never a partial add
        assert (s["found"][0] == "odd") == has_odd[s["version"]], s  # query sees the add exactly from its commit
    versions = {s["version"] for s in seen}
    assert len(versions) >= 3, versions  # the reader really ran across several commits


ODD_TEXT = "zebra quantum marmalade xylophone walrus " * 12

HOLDER = r"""
import sys, time
from retrodb.lock import WriterLock
WriterLock(sys.argv[1], "compact (test holder)").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    db = build_db(tmp_path / "db", n_docs=6)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], cwd=REPO, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["delete", db, "--doc-id", "d1", "--yes"], ["compact", db], ["vacuum", db, "--yes"],
                     ["add", db, tmp_path / "db-src.jsonl", "--wait", "0.3"]):
            proc = run_retrodb(*args)
            err = proc.stderr.decode()
            assert proc.returncode == 1 and "database busy" in err, (args, err)
            assert f"pid {holder.pid}" in err and "compact (test holder)" in err and "Traceback" not in err
        warn = {f.path: f.message for f in verify(db).warnings}
        assert "a writer is running now" in warn["LOCK"] and str(holder.pid) in warn["LOCK"]
    finally:
        holder.kill()  # SIGKILL: the holder dies with the lock file still naming it
        holder.wait()
    warn = {f.path: f.message for f in verify(db).warnings}
    assert f"stale writer lock of pid {holder.pid}" in warn["LOCK"]
    proc = run_retrodb("delete", db, "--doc-id", "d1", "--yes")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "d1" not in content(db)["documents"]
    assert not verify(db).warnings and (db / "LOCK").read_text() == ""
