"""`retrodb sql` and `delete --where` read only the database and write nothing: every attack of issue 9 fails."""

import json

import pytest

import retrodb
from retrodb.verify import verify
from tests.edit_helpers import build_db


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return build_db(tmp_path_factory.mktemp("sqlsec") / "db", n_docs=8, embed=None)


def _before(root):
    return (root / "CURRENT").read_bytes(), sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("query,says", [
    ("COPY (SELECT content FROM read_blob('/etc/hostname')) TO '{out}'", "COPY statements are not allowed"),
    ("COPY (SELECT 'v-99999999.json') TO '{db}/CURRENT'", "COPY statements are not allowed"),
    ("ATTACH '{out}' AS x", "ATTACH statements are not allowed"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are not allowed"),
    ("DROP VIEW documents", "DROP statements are not allowed"),
    ("INSTALL httpfs", "LOAD statements are not allowed"),
    ("LOAD httpfs", "LOAD statements are not allowed"),
    ("SET enable_external_access = true", "SET statements are not allowed"),
    ("PRAGMA enable_profiling", "PRAGMA statements are not allowed"),
    ("SELECT 1; COPY (SELECT 1) TO '{out}'", "one SQL statement at a time"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_blob('/etc/hostname')", "file system operations are disabled"),
    ("SELECT * FROM read_text('{out}')", "file system operations are disabled"),
    ("SELECT * FROM glob('/etc/*')", "file system operations are disabled"),
    ("SELECT * FROM query('COPY (SELECT 1) TO ''{out}''')", "SQL error"),
])
def test_sql_attacks_fail_with_a_clear_error(db, tmp_path, cli, query, says):
    out = tmp_path / "leak.csv"
    before = _before(db)
    r = cli("sql", db, query.format(out=out, db=db))
    assert r.code == 1 and says in r.err and "internal error" not in r.err, r.err
    assert not out.exists() and _before(db) == before
    assert verify(db).ok


def test_sql_still_reads_views_and_describes(db, cli):
    r = cli("sql", db, "SELECT count(*) AS n FROM documents", "--format", "json")
    assert r.code == 0 and r.json_lines() == [{"n": 8}]
    assert cli("sql", db, "DESCRIBE documents").code == 0
    assert cli("sql", db, "WITH x AS (SELECT doc_id FROM chunks) SELECT count(*) FROM x").code == 0
    assert retrodb.open(db).sql("SELECT current_setting('enable_external_access') AS e").to_pylist() == [{"e": False}]


def test_sql_help_says_what_it_may_do(cli):
    r = cli("sql", "--help")
    assert "read-only" in r.out and "COPY" in r.out


@pytest.mark.parametrize("dry_run", [True, False])
def test_delete_where_stacked_copy_writes_nothing(db, tmp_path, cli, dry_run):
    out = tmp_path / "pwn.csv"
    before = _before(db)
    r = cli("delete", db, "--where", f"1=1; COPY (SELECT 1) TO '{out}'", "--yes", *(["--dry-run"] if dry_run else []))
    assert r.code == 2 and "--where" in r.err, r.err
    assert not out.exists() and _before(db) == before


@pytest.mark.parametrize("dry_run", [True, False])
def test_delete_where_union_injection_forges_nothing(db, cli, dry_run):
    before = _before(db)
    forged = "1=0) UNION ALL SELECT 'seg-000001', 'forged', 0, -5, -5 --"
    r = cli("delete", db, "--where", forged, "--yes", *(["--dry-run"] if dry_run else []))
    assert r.code == 2 and "--where" in r.err
    assert _before(db) == before and verify(db).ok


@pytest.mark.parametrize("where,says", [
    ("doc_id", "boolean"), ("num_tokens > 1, num_tokens < 5", "boolean"), ("count(*) > 0", "aggregates"),
    ("doc_id IN (SELECT * FROM read_csv('/etc/passwd'))", "file system operations are disabled"),
    ("", "empty condition"), ("nonsense_column = 1", "nonsense_column"),
])
def test_delete_where_refuses_what_is_not_one_boolean_expression(db, cli, where, says):
    r = cli("delete", db, "--where", where, "--dry-run")
    assert r.code == 2 and says in r.err, r.err


def test_delete_where_works_and_json_lists_deleted_ids(tmp_path, cli):
    root = build_db(tmp_path / "db", n_docs=6, embed=None)
    r = cli("delete", root, "--where", "doc_id IN ('d1', 'd4') OR doc_id LIKE 'd5%'", "--yes", "--format", "json")
    assert r.code == 0, r.err
    assert sorted(r.json_lines()[-1]["doc_ids"]) == ["d1", "d4", "d5"]
    assert verify(root).ok


def test_delete_human_output_shows_markup_like_ids_as_they_are(tmp_path, cli):
    from retrodb.ingest import IngestOptions, ingest

    src = tmp_path / "in.jsonl"
    ids = ["[/bold]", "[red]x[/red]", ":x:"]
    src.write_text("".join(json.dumps({"id": i, "text": f"text number {k} " * 5}) + "\n" for k, i in enumerate(ids)))
    ingest(tmp_path / "db", [str(src)], IngestOptions(workers=1))
    r = cli("delete", tmp_path / "db", "--doc-id", "[/bold]", "--doc-id", "[red]x[/red]", "--doc-id", ":x:",
            "--doc-id", "[nope]", "--dry-run")
    assert r.code == 0, r.err
    assert all(repr(i) in r.out for i in ids) and "'[nope]'" in r.err
