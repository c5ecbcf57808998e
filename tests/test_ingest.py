import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import retrodb
from retrodb.errors import BadInput
from retrodb.ingest import IngestOptions, NothingIngested, ingest
from tests.conftest import make_text, run_retrodb


def doc_ids(db_path) -> list[str]:
    return sorted(r["doc_id"] for r in retrodb.open(db_path).sql("SELECT doc_id FROM documents").to_pylist())


def test_text_folder_ids_are_relative_paths(corpus, db_path):
    report = ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    assert report.documents == 12 and report.version == 1 and not report.issue_counts
    assert "sub/doc00.txt" in doc_ids(db_path) and "doc01.txt" in doc_ids(db_path)
    text = retrodb.open(db_path).sql("SELECT text FROM documents WHERE doc_id = 'doc01.txt'").column(0)[0].as_py()
    assert text == (corpus / "doc01.txt").read_text()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, jsonl_file, db_path, suffix):
    data = jsonl_file.read_bytes()
    path = tmp_path / f"in{suffix}"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif suffix.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    report = ingest(db_path, [str(path)], IngestOptions(workers=1))
    assert report.documents == 20
    row = retrodb.open(db_path).sql("SELECT metadata, source FROM documents WHERE doc_id = 'j3'").to_pylist()[0]
    assert json.loads(row["metadata"]) == {"lang": "en"} and row["source"].endswith(f"in{suffix}:4")


def test_jsonl_split_across_segments_keeps_line_numbers(tmp_path, db_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": make_text(i, 40)}) for i in range(60)]
    lines[41] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    report = ingest(db_path, [str(path)], IngestOptions(workers=2, segment_bytes=3000))
    assert len(report.segments) > 3
    assert report.documents == 59
    assert report.issues == [{"kind": "malformed-json", "where": f"{path}:42", "message": report.issues[0]["message"]}]
    assert doc_ids(db_path) == sorted(f"d{i}" for i in range(60) if i != 41)


def test_parquet_with_custom_fields(tmp_path, db_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(30)], "content": [make_text(i) for i in range(30)],
                             "score": list(range(30))}), path, row_group_size=7)
    report = ingest(db_path, [str(path)], IngestOptions(workers=1, text_field="content", id_field="url",
                                                        segment_bytes=2000))
    assert report.documents == 30 and len(report.segments) >= 2
    row = retrodb.open(db_path).sql("SELECT metadata, source FROM documents WHERE doc_id = 'u9'").to_pylist()[0]
    assert json.loads(row["metadata"]) == {"score": 9} and row["source"].endswith("#row10")


def test_parquet_without_text_column_is_reported(tmp_path, db_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(NothingIngested) as caught:  # nothing ingested is an error, naming the columns found
        ingest(db_path, [str(path)], IngestOptions(workers=1))
    report = caught.value.report
    assert report.issue_counts == {"missing-field": 1} and "no 'text' column" in report.issues[0]["message"]
    assert "fields body" in caught.value.hint and "--text-field" in caught.value.hint
    assert not db_path.exists()  # no empty database left behind


def test_stdin_jsonl(jsonl_file, db_path):
    proc = run_retrodb("ingest", db_path, "-", "--format", "json", input=jsonl_file.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["documents"] == 20


def test_bad_input_is_skipped_with_file_and_line(tmp_path, db_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(make_text(1))
    (src / "latin1.txt").write_bytes("caf\xe9 au lait\nsecond line \xff".encode("latin-1"))
    (src / "image.txt").write_bytes(b"\x89PNG\x00\x00\x00binary")
    (src / "empty.md").write_text("  \n\t\n")
    (src / "notes.csv").write_text("a,b\n")
    rows = [
        json.dumps({"id": "a", "text": make_text(2)}),
        "{broken json",
        json.dumps({"id": "b", "body": "no text field"}),
        json.dumps({"id": "c", "text": 42}),
        json.dumps({"id": "d", "text": ""}),
        json.dumps({"id": "a", "text": make_text(3)}),
        json.dumps(["not", "an", "object"]),
    ]
    data = ("\n".join(rows) + "\n").encode() + b'{"id": "e", "text": "bad \xff byte"}\n'
    (src / "records.jsonl").write_bytes(data)
    report = ingest(db_path, [str(src)], IngestOptions(workers=1))
    assert report.documents == 2
    assert report.issue_counts == {"invalid-utf8": 2, "binary": 1, "empty": 2, "unsupported": 1,
                                   "malformed-json": 2, "missing-field": 2, "duplicate-id": 1}
    where = {(i["kind"], i["where"]) for i in report.issues}
    jl = src / "records.jsonl"
    assert ("malformed-json", f"{jl}:2") in where and ("missing-field", f"{jl}:3") in where
    assert ("duplicate-id", f"{jl}:6") in where and ("invalid-utf8", f"{jl}:8") in where
    assert ("invalid-utf8", f"{src / 'latin1.txt'}:1") in where
    assert doc_ids(db_path) == ["a", "good.txt"]


def test_on_error_fail_commits_nothing(tmp_path, corpus, db_path):
    ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "text": make_text(5)}) + "\n{oops\n")
    with pytest.raises(BadInput, match=r"bad.jsonl:2: malformed JSON"):
        ingest(db_path, [str(bad)], IngestOptions(workers=1, on_error="fail"))
    db = retrodb.open(db_path)
    assert db.version == 1 and db.stats()["documents"] == 12
    proc = run_retrodb("ingest", db_path, bad, "--on-error", "fail")
    assert proc.returncode == 1 and b"bad.jsonl:2" in proc.stderr and b"Traceback" not in proc.stderr


def test_duplicates_against_database_and_across_segments(tmp_path, corpus, db_path):
    ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    again = ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    assert again.documents == 0 and again.issue_counts == {"duplicate-id": 12}
    assert again.version == 1  # nothing new: no empty snapshot
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"id": "same", "text": make_text(7)}) + "\n")
    b.write_text(json.dumps({"id": "same", "text": make_text(8)}) + "\n" + json.dumps({"id": "other", "text": make_text(9)}) + "\n")
    r = ingest(db_path, [str(a), str(b)], IngestOptions(workers=2, segment_bytes=10))
    assert r.documents == 2 and r.issue_counts == {"duplicate-id": 1}
    assert retrodb.open(db_path).sql("SELECT text FROM documents WHERE doc_id='same'").column(0)[0].as_py() == make_text(7)
    # chunk ids stay unique across the whole database
    n, distinct = retrodb.open(db_path).sql("SELECT count(*), count(DISTINCT chunk_id) FROM chunks").to_pylist()[0].values()
    assert n == distinct


def test_parallel_ingest_matches_serial(tmp_path, jsonl_file):
    one = ingest(tmp_path / "one", [str(jsonl_file)], IngestOptions(workers=1, segment_bytes=4000))
    two = ingest(tmp_path / "two", [str(jsonl_file)], IngestOptions(workers=2, segment_bytes=4000))
    assert (one.documents, one.chunks, one.tokens, one.segments) == (two.documents, two.chunks, two.tokens, two.segments)
    q = "SELECT chunk_id, doc_id, tokens FROM chunks ORDER BY chunk_id"
    assert retrodb.open(tmp_path / "one").sql(q).equals(retrodb.open(tmp_path / "two").sql(q))


@pytest.mark.parametrize("kill_at", ["ingest.segment_done#2", "ingest.before_marker#3", "commit.before_current",
                                     "commit.before_manifest"])
def test_kill9_mid_ingest_then_rerun(tmp_path, corpus, db_path, kill_at):
    ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    path = tmp_path / "more.jsonl"
    path.write_text("".join(json.dumps({"id": f"m{i}", "text": make_text(200 + i)}) + "\n" for i in range(40)))
    args = ("ingest", db_path, path, "--workers", "1", "--segment-mb", "0.002")
    proc = run_retrodb(*args, env={"RETRODB_KILL_AT": kill_at})
    assert proc.returncode == -9
    db = retrodb.open(db_path)
    assert db.version == 1 and db.stats()["documents"] == 12  # the last commit, nothing partial visible
    proc = run_retrodb(*args, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    if kill_at.startswith("ingest."):
        assert summary["resumed_segments"] >= 1
    db = retrodb.open(db_path)
    assert db.version == 2 and db.stats()["documents"] == 52
    ids = db.sql("SELECT doc_id, count(*) AS n FROM documents GROUP BY 1 HAVING n > 1").num_rows
    assert ids == 0
    assert not list((db_path / "_work").iterdir())
    assert not list(db_path.rglob(".tmp-*"))


def test_second_writer_is_refused(corpus, db_path):
    from retrodb.errors import DatabaseBusy
    from retrodb.lock import WriterLock

    ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    with WriterLock(db_path, "test-holder"):
        with pytest.raises(DatabaseBusy, match=r"database busy: .* pid \d+ .*'test-holder'"):
            ingest(db_path, [str(corpus)], IngestOptions(workers=1))
        proc = run_retrodb("ingest", db_path, corpus)
        assert proc.returncode == 1 and b"database busy" in proc.stderr and b"test-holder" in proc.stderr


def test_stale_lock_of_dead_process_is_taken_over(corpus, db_path):
    ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    (db_path / "LOCK").write_text(json.dumps({"pid": 999999, "command": "ingest (killed)"}))
    report = ingest(db_path, [str(make_dir(corpus))], IngestOptions(workers=1))
    assert report.documents == 1


def make_dir(corpus):
    extra = corpus.parent / "extra"
    extra.mkdir()
    (extra / "new.txt").write_text(make_text(999))
    return extra


def test_stats_and_sql_cli(cli, corpus, db_path):
    r = cli("ingest", db_path, corpus, "--workers", "1")
    assert r.code == 0 and "committed v1: 12 documents" in r.out
    s = cli("stats", db_path, "--format", "json").json_lines()[0]
    assert {"version", "documents", "chunks", "tokens", "segments", "bytes"} <= set(s)
    assert (s["version"], s["documents"], s["segments"]) == (1, 12, 1) and s["bytes"] > 0
    direct = retrodb.open(db_path).sql("SELECT count(*) AS n, sum(num_tokens) AS t FROM chunks").to_pylist()[0]
    assert (s["chunks"], s["tokens"]) == (direct["n"], direct["t"])
    rows = cli("sql", db_path, "SELECT doc_id, num_chunks FROM documents ORDER BY doc_id LIMIT 2", "-f", "json").json_lines()
    assert rows[0]["doc_id"] == "doc01.txt" and isinstance(rows[0]["num_chunks"], int)
    human = cli("sql", db_path, "SELECT count(*) AS n FROM chunks")
    assert human.code == 0 and str(s["chunks"]) in human.out
    bad = cli("sql", db_path, "SELECT nope FROM chunks")
    assert bad.code == 1 and "SQL error" in bad.err
    log = cli("log", db_path, "-f", "json").json_lines()
    assert [e["version"] for e in log] == [0, 1] and log[1]["command"] == "ingest" and log[1]["documents"] == 12


def test_errors_without_traceback(cli, tmp_path):
    r = cli("stats", tmp_path / "missing")
    assert r.code == 1 and "no retrodb database" in r.err and "retrodb init" not in r.err  # a typo: no init on it
    r = cli("ingest", tmp_path / "db", tmp_path / "nothing-here", "--on-error", "fail")
    assert r.code == 1 and "no such file" in r.err
    r = cli("ingest", tmp_path / "db", "x", "--format", "xml")
    assert r.code == 2


def test_help_has_examples_and_does_not_import_torch():
    import subprocess
    import sys

    from tests.conftest import REPO

    code = "import sys; from retrodb.cli.main import run; run(['--help']); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False") and "Examples" in out
    for cmd in ("init", "ingest", "stats", "sql", "log"):
        proc = run_retrodb(cmd, "--help")
        assert proc.returncode == 0 and b"Examples" in proc.stdout, cmd


def test_init_with_other_chunk_size_and_tokenizer_check(cli, tmp_path, corpus):
    from retrodb.tokenizer import default_model_dir

    r = cli("init", tmp_path / "db", "--chunk-size", "16", "-f", "json")
    assert r.code == 0 and r.json_lines()[0]["chunk_size"] == 16
    ingest(tmp_path / "db", [str(corpus)], IngestOptions(workers=1))
    assert retrodb.open(tmp_path / "db").sql("SELECT max(num_tokens) FROM chunks").column(0)[0].as_py() == 16
    other = tmp_path / "tok"
    other.mkdir()
    tj = json.loads((default_model_dir() / "tokenizer.json").read_text())
    tj["normalizer"]["lowercase"] = False
    (other / "tokenizer.json").write_text(json.dumps(tj))
    r = cli("ingest", tmp_path / "db", corpus, "--tokenizer", other)
    assert r.code == 1 and "different tokenizer" in r.err
    assert cli("init", tmp_path / "db").code == 1
