"""Clear errors instead of "internal error": a damaged or mistyped database, a full disk, a denied permission.

Every command gets one line that says what is wrong and a hint (exit 1; 2 for usage), never a
traceback; `verify` diagnoses a database it cannot open; a failed commit leaves the database at its
last commit, and the manifest it may have left behind is never shown or read as a snapshot.
"""

from __future__ import annotations

import json
import shutil

import pytest

import retrodb
from tests.conftest import make_text, run_retrodb
from tests.edit_helpers import build_db, content


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    build_db(root / "db", n_docs=8, segment_bytes=1500, index=True)
    (root / "more.jsonl").write_text(json.dumps({"id": "more", "text": make_text(77)}) + "\n")
    return root


@pytest.fixture
def db(template, tmp_path):
    shutil.copytree(template / "db", tmp_path / "db")
    return tmp_path / "db"


def every_command(db, src) -> list[tuple]:
    return [("stats", db), ("log", db), ("sql", db, "SELECT 1"), ("query", db, "retrieval"), ("verify", db),
            ("delete", db, "--doc-id", "d1", "--yes"), ("compact", db), ("vacuum", db, "--yes"),
            ("embed", db), ("index", db), ("add", db, src), ("ingest", db, src), ("redact", db, "--doc-id", "d1")]


def clear(r, *words) -> bool:
    return r.code == 1 and "internal error" not in r.err and "Traceback" not in r.err and \
        all(w in r.err for w in words)


def test_database_path_is_a_file(cli, template, tmp_path):
    path = tmp_path / "not-a-db"
    path.write_text("hello")
    for cmd in every_command(path, template / "more.jsonl"):
        r = cli(*cmd)
        assert clear(r, "is a file, not a retrodb database"), (cmd, r.err)


@pytest.mark.parametrize("current", ["", "garbage\n", "v-00000099.json\n"])
def test_broken_current_every_command_and_verify_diagnoses(cli, db, template, current):
    version = retrodb.open(db).version
    (db / "CURRENT").write_text(current)
    for cmd in every_command(db, template / "more.jsonl"):
        r = cli(*cmd)
        assert clear(r, "CURRENT", *(() if cmd[0] == "verify" else ("retrodb verify",))), (cmd, r.err)
    r = cli("verify", db)
    assert clear(r, f"v{version} (", "can be read and has all its files", "printf")
    assert "no readable current snapshot" in r.out
    fix = [line for line in r.err.splitlines() if "printf" in line][0]
    assert f"v-{version:08d}.json" in fix
    (db / "CURRENT").write_text(f"v-{version:08d}.json\n")  # what the diagnosis says to do
    assert cli("verify", db).code == 0


def test_manifest_that_is_an_empty_object(cli, db):
    version = retrodb.open(db).version
    (db / "manifests" / f"v-{version:08d}.json").write_text("{}")
    r = cli("stats", db)
    assert clear(r, f"v-{version:08d}.json is damaged", "no 'format_version' field", "retrodb verify")
    r = cli("verify", db, "--format", "json")
    report = r.json_lines()[0]
    assert r.code == 1 and not report["ok"]
    messages = [f["message"] for f in report["findings"]]
    assert any(f"newest complete snapshot is v{version - 1}" in m for m in messages), messages
    r = cli("stats", db, "--at", str(version - 1))  # older snapshots still read
    assert r.code == 0


@pytest.mark.parametrize("path", ["segments/seg-000001/../../../etc/passwd", "segments/../etc/passwd",
                                  "segments/seg-000001/./documents.parquet", "segments/seg-000001\\..\\x",
                                  "/segments/seg-000001/documents.parquet", "segments//documents.parquet",
                                  "segments/seg-000001", "ids/run.parquet", "segments/seg-000001/.."])
def test_group_file_paths_that_leave_a_segment_directory_are_damage(path):
    """A group's file paths are checked by one pattern for speed; whatever it does not match takes the general
    check, so every way out of `segments/<dir>/` is still refused."""
    from retrodb.schema import group_problems

    def group(p):
        return {"format_version": 2, "lo": 1, "segments": {"seg-000001": {
            "documents": 1, "chunks": 1, "tokens": 1, "files": {"documents": {"path": p, "bytes": 1, "sha256": "ab"}}}}}

    assert not group_problems(group("segments/seg-000001/documents-1.parquet"))
    assert any("outside the database's segments" in p for p in group_problems(group(path))), path


def test_manifest_paths_outside_the_database_are_refused(cli, db):
    version = retrodb.open(db).version
    path = db / "manifests" / f"v-{version:08d}.json"
    root = json.loads(path.read_text())
    list_path = db / root["groups"]["path"]
    listing = json.loads(list_path.read_text())
    group_path = db / listing["groups"][0]["path"]
    group = json.loads(group_path.read_text())
    seg = next(iter(group["segments"].values()))
    seg["files"]["documents"]["path"] = "../../../etc/passwd"
    group_path.write_text(json.dumps(group))
    # a consistent forgery (sizes recorded up the tree): only the path checks can catch it
    listing["groups"][0]["bytes"] = group_path.stat().st_size
    list_path.write_text(json.dumps(listing))
    root["groups"]["bytes"] = list_path.stat().st_size
    path.write_text(json.dumps(root))
    assert clear(cli("sql", db, "SELECT count(*) FROM documents"), "outside the database")
    listing["groups"][0]["path"] = "../../etc/group.json"
    list_path.write_text(json.dumps(listing))
    root["groups"]["bytes"] = list_path.stat().st_size
    path.write_text(json.dumps(root))
    assert clear(cli("sql", db, "SELECT count(*) FROM documents"), "outside the database")
    root["groups"]["path"] = "../../etc/list.json"
    path.write_text(json.dumps(root))
    assert clear(cli("stats", db), "outside the database")


def corrupt_middle(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def corrupt_pages(path) -> None:
    """Overwrite every data page of a Parquet file (its footer kept): whichever row group a reader needs fails."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4: len(data) - 8 - footer] = b"\xff" * (len(data) - 12 - footer)
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_corrupt_segment_file_under_query_and_redact(cli, db):
    name, seg = sorted(retrodb.open(db).snapshot.segments.items())[0]
    rel = seg.files["chunks"]["path"]
    corrupt_pages(db / rel)
    store = seg.files["store"]["path"]  # what a query reads its winners from
    corrupt_middle(db / store)
    r = cli("query", db, "retrieval database", "-k", "20")
    assert clear(r, f"cannot read {store}", f"retrodb verify {db}"), r.err
    r = cli("redact", db, "--literal", "retrieval", "--yes")
    assert clear(r, "retrodb verify"), r.err
    r = cli("sql", db, "SELECT sum(num_tokens) FROM chunks")
    assert clear(r, "cannot be decoded", f"retrodb verify {db}") and "SQL error" not in r.err, r.err
    r = cli("verify", db)
    assert clear(r, rel)


def test_empty_sql_is_a_usage_error(cli, db):
    for query in ("", "   "):
        r = cli("sql", db, query)
        assert r.code == 2 and "empty SQL query" in r.err and "internal error" not in r.err


@pytest.mark.parametrize("failure, words", [
    ("commit.before_current=ENOSPC", ["No space left on device", "free some disk space"]),
    ("delete.tombstones_written=EACCES", ["Permission denied", "check that you may write"]),
])
def test_disk_full_and_permission_denied_keep_the_last_commit(cli, db, failure, words):
    before = retrodb.open(db).version
    seen = content(db)
    proc = run_retrodb("delete", db, "--doc-id", "d1", "--doc-id", "d2", "--yes", env={"RETRODB_FAIL_AT": failure})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "internal error" not in err and "Traceback" not in err, err
    assert all(w in err for w in words) and f"the database stays at its last commit, v{before}" in err, err
    assert retrodb.open(db).version == before and content(db) == seen
    # the manifest written before CURRENT failed is no snapshot: not in log, not readable with --at
    assert [e["version"] for e in retrodb.open(db).log()][-1] == before
    r = cli("stats", db, "--at", str(before + 1))
    assert clear(r, "never committed") or clear(r, "not retained")
    r = cli("log", db)
    assert r.code == 0 and f"\n{before + 1} " not in r.out and f"{before + 1} =" not in r.out
    r = cli("delete", db, "--doc-id", "d1", "--doc-id", "d2", "--yes")  # the rerun finishes the job
    assert r.code == 0 and retrodb.open(db).version == before + 1
    assert "d1" not in content(db)["documents"]


def test_orphan_manifest_is_no_snapshot(cli, db):
    version = retrodb.open(db).version
    orphan = db / "manifests" / f"v-{version + 1:08d}.json"
    data = json.loads((db / "manifests" / f"v-{version:08d}.json").read_text())
    data.update(version=version + 1, parent=version, command="delete")
    orphan.write_text(json.dumps(data))
    assert [e["version"] for e in retrodb.open(db).log()][-1] == version
    with pytest.raises(retrodb.errors.DatabaseNotFound, match="never committed"):
        retrodb.open(db, at=version + 1)
    assert any("never committed" in f["message"] for f in cli("verify", db, "-f", "json").json_lines()[0]["findings"])


def test_mistyped_database_path_never_suggests_creating_it(cli, db, tmp_path):
    r = cli("stats", tmp_path / "dbb")
    assert clear(r, "no such directory", f"did you mean {db}?") and "retrodb init" not in r.err
    r = cli("query", tmp_path / "elsewhere" / "x", "hello")
    assert clear(r, "check the path") and "retrodb init" not in r.err
    (tmp_path / "empty-dir").mkdir()
    assert clear(cli("log", tmp_path / "empty-dir"), "is not a retrodb database")
