"""Human output shows the data as it is, at any terminal width; small CLI contracts (--version, exit codes).

Data values go through no markup, emoji or highlighting: a corpus of markup-like strings (rich markup,
BBCode, emoji codes, code with brackets) prints exactly as stored. A table that does not fit the terminal
is printed one record per block; stderr lines are never hard-wrapped.
"""

from __future__ import annotations

import json

import pytest

import retrodb
from retrodb.embed import embed
from retrodb.index import index
from retrodb.ingest import IngestOptions, ingest
from tests.conftest import make_text

MARKUP = [
    "console.trace([message][, ...args])",
    "root[:] = [root, root, None, None]",
    ":x: and :thumbs_up:",
    "[/bold]",
    "[b]bold[/b] [url=http://example.org]link[/url] [quote]q[/quote]",
    "[red]danger[/red] [bold magenta]loud",
    "[link=https://example.org]click[/link]",
    r"\[escaped] and [[double]]",
]
IDS = ["[/bold]", ":x:", "[red]id[/red]", "a[0] = b[1]", "[b]bb[/b]", "plain", "[link=x]y", "emoji :smile:"]


@pytest.fixture(scope="module")
def markup_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("markup")
    src = root / "docs.jsonl"
    with open(src, "w") as f:
        for doc_id, text in zip(IDS, MARKUP):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    db = root / "db[red]x[/red]"
    ingest(db, [str(src)], IngestOptions(workers=1))
    embed(db, "hash:16")
    index(db, M=8, ef_construction=40, threads=1)
    return db


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


def test_sql_prints_every_value_as_stored(cli, markup_db, wide):
    r = cli("sql", markup_db, "SELECT doc_id, text FROM documents ORDER BY doc_id")
    assert r.code == 0, r.err
    for value in MARKUP + IDS:
        assert value in r.out, value
    assert "❌" not in r.out and "😄" not in r.out  # :x: and :smile: stay text


def test_query_shows_chunk_ids_and_text_as_stored(cli, markup_db):
    r = cli("query", markup_db, "root console trace", "-k", "8")
    assert r.code == 0, r.err
    rows = {(row["doc_id"], row["text"]): row["chunk_id"]
            for row in retrodb.open(markup_db).sql("SELECT c.doc_id, c.chunk_id, d.text FROM chunks c JOIN documents d "
                                                   "USING (doc_id)").to_pylist()}
    for (doc_id, text), chunk_id in rows.items():
        assert doc_id in r.out and text in r.out and str(chunk_id) in r.out, (doc_id, text)


def test_delete_and_log_and_stats_with_markup_like_ids_and_paths(cli, markup_db, tmp_path):
    import shutil

    db = tmp_path / "[bold]copy"
    shutil.copytree(markup_db, db)
    r = cli("delete", db, "--doc-id", "[/bold]", "--doc-id", ":x:", "--dry-run")
    assert r.code == 0 and "[/bold]" in r.out and ":x:" in r.out, r.err
    r = cli("delete", db, "--doc-id", "[/bold]", "--yes")
    assert r.code == 0, r.err
    assert "[/bold]" not in {row["doc_id"] for row in retrodb.open(db).sql("SELECT doc_id FROM documents").to_pylist()}
    for cmd in ("stats", "log"):
        r = cli(cmd, db)
        assert r.code == 0 and (cmd == "log" or str(db) in r.out), (cmd, r.err)


def test_ingest_reports_print_names_as_they_are(cli, tmp_path):
    src = tmp_path / "[bold]src"
    src.mkdir()
    (src / "[red]notes:x:.csv").write_text("a,b\n")
    (src / "ok.jsonl").write_text(json.dumps({"id": "[/b]", "text": make_text(1)}) + "\n"
                                  + json.dumps({"id": "[/b]", "text": make_text(2)}) + "\n")
    r = cli("ingest", tmp_path / "db", src)
    assert r.code == 0, r.err
    assert f"{src / '[red]notes:x:.csv'}: skipped" in r.err
    assert f"{src / 'ok.jsonl'}:2: duplicate document id '[/b]'" in r.err


# ---------------------------------------------------------------- narrow terminals


def test_narrow_terminal_prints_one_record_per_block(cli, markup_db, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    log = cli("log", markup_db, "-f", "json").json_lines()
    r = cli("log", markup_db)
    assert r.code == 0 and "│" not in r.out
    for entry in log:
        assert f"created = {entry['created']}\n" in r.out  # timestamps whole, on their line
    r = cli("stats", markup_db)
    assert r.code == 0 and "│" not in r.out and "   files = " in r.out
    files = retrodb.open(markup_db).stats()["per_segment"][0]["files"]
    assert f"files = {', '.join(files)}\n" in r.out
    r = cli("sql", markup_db, "SELECT doc_id, text, num_chars, num_tokens FROM documents ORDER BY doc_id")
    assert r.code == 0 and "│" not in r.out
    assert "doc_id = [/bold]\n" in r.out and f"  text = {MARKUP[3]}\n" in r.out
    monkeypatch.setenv("COLUMNS", "200")
    r = cli("sql", markup_db, "SELECT count(*) AS n FROM documents")
    assert "│" in r.out  # a table where it fits


def test_stderr_lines_are_never_hard_wrapped(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(make_text(1))
    long_name = "a-rather-long-file-name-that-does-not-fit-in-forty-columns.csv"
    (src / long_name).write_text("x")
    r = cli("ingest", tmp_path / "db", src)
    assert r.code == 0
    line = next(line for line in r.err.splitlines() if long_name in line)
    assert line.startswith("warning:") and line.endswith("(--format text reads every file as text)"), r.err


# ---------------------------------------------------------------- small contracts


def test_version_chunk_id_json_and_grace(cli, markup_db, tmp_path):
    import shutil

    from retrodb import __version__

    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"retrodb {__version__}"
    cid = retrodb.open(markup_db).sql("SELECT max(chunk_id) FROM chunks").column(0)[0].as_py()
    (rec,) = cli("query", markup_db, "--chunk-id", cid, "-k", "2", "-f", "json").json_lines()
    assert rec["chunk_id"] == cid and rec["neighbours"] and all(n["chunk_id"] != cid for n in rec["neighbours"])
    db = tmp_path / "db"
    shutil.copytree(markup_db, db)
    assert cli("delete", db, "--doc-id", "plain", "--yes").code == 0
    r = cli("vacuum", db, "--yes")  # default grace: the superseded snapshots are kept for readers
    assert r.code == 0 and "--grace 10m kept v" in r.out and "--grace 0 removes them" in r.out, r.out
    r = cli("vacuum", db, "--grace", "0", "--yes")
    assert r.code == 0 and "freed" in r.out and "kept" not in r.out
    assert [e["version"] for e in retrodb.open(db).log()] == [retrodb.open(db).version]


@pytest.mark.parametrize("args", [
    ("query", "{db}", "text", "--chunk-id", "1"),
    ("query", "{db}", "   "),
    ("delete", "{db}", "--yes"),
    ("delete", "{db}", "--doc-id", "x", "--where", "true"),
    ("sql", "{db}", ""),
    ("vacuum", "{db}", "--grace", "5x", "--yes"),
    ("ingest", "{db}", "-", "{db}"),
    ("ingest", "{db}", "-", "--format", "parquet"),
    ("query", "{db}", "x", "-k", "0"),
])
def test_usage_errors_exit_2(cli, markup_db, args):
    r = cli(*[a.format(db=markup_db) for a in args])
    assert r.code == 2 and "internal error" not in r.err, r.err
