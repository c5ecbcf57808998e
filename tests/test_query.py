import shutil

import numpy as np
import pyarrow as pa
import pytest

import retrodb
from retrodb.embedder import HashEmbedder
from retrodb.errors import MissingStage, RetrodbError
from retrodb.index import index
from retrodb.query import Neighbour, QueryResult
from retrodb.schema import arrow_schema
from retrodb.segment import write_table_file
from tests.test_index import embedded_db, topic_corpus

QUERIES = ["how does the with statement call __enter__ and __exit__", "raise an exception from a function",
           "string methods like split and join", "for loop over a sequence with break and continue",
           "lambda expressions", "global and nonlocal names", "formatted string literals"]
FIELDS = ["rank", "score", "chunk_id", "doc_id", "position", "text", "continuation", "tokens", "continuation_tokens",
          "r", "overlap"]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """Several segments of real text with hash:64 keys and an index."""
    path = embedded_db(tmp_path_factory.mktemp("query"))
    index(path)
    return path


@pytest.fixture
def own_db(db, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(db, path)
    return path


def brute_force(db_path, q: np.ndarray, k: int, skip=lambda cid, doc: False) -> list[list[int]]:
    """Reference top k by cosine over every live key, computed here from the files."""
    snap = retrodb.open(db_path).snapshot
    keys, ids, docs = [], [], []
    live = {r["chunk_id"] for r in retrodb.open(db_path).sql("SELECT chunk_id FROM chunks").to_pylist()}
    for name, seg in sorted(snap.segments.items()):
        rows = retrodb.open(db_path).sql(f"SELECT chunk_id, doc_id FROM chunks WHERE segment = '{name}'").to_pylist()
        import pyarrow.parquet as pq

        all_ids = pq.read_table(db_path / seg.files["chunks"]["path"], columns=["chunk_id", "doc_id"])
        keys.append(np.load(db_path / seg.files["keys"]["path"]).astype(np.float32))
        ids += all_ids["chunk_id"].to_pylist()
        docs += all_ids["doc_id"].to_pylist()
        assert {r["chunk_id"] for r in rows} <= set(all_ids["chunk_id"].to_pylist())
    keys = np.concatenate(keys)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ keys.T
    out = []
    for row in scores:
        order = [i for i in np.argsort(-row, kind="stable") if ids[i] in live and not skip(ids[i], docs[i])]
        out.append([ids[i] for i in order[:k]])
    return out


def ids_of(results: list[QueryResult]) -> list[list[int]]:
    return [[n.chunk_id for n in r.neighbours] for r in results]


def test_merge_across_segments_equals_exact_search(db):
    handle = retrodb.open(db)
    assert len(handle.snapshot.segments) >= 4
    q = HashEmbedder(64).embed(QUERIES)
    want = brute_force(db, q, 8)
    assert len({cid >> 32 for row in want for cid in row}) >= 3  # the top k really spans segments
    exact = handle.query(QUERIES, k=8, exact=True)
    hnsw = handle.query(QUERIES, k=8, ef=200)
    assert ids_of(exact) == want
    assert ids_of(hnsw) == want
    for r in hnsw:
        scores = [n.score for n in r.neighbours]
        assert scores == sorted(scores, reverse=True) and [n.rank for n in r.neighbours] == list(range(1, 9))
    for e, h in zip(exact, hnsw):
        np.testing.assert_allclose([n.score for n in e.neighbours], [n.score for n in h.neighbours], atol=1e-4)


def test_exact_search_keeps_no_keys_file_open(db):
    """Exact search reads every segment's keys: it must not keep one memmap (an open file) per segment in the
    searcher's cache, or 10^5 segments exhaust the process's file descriptors."""
    from retrodb.query import searcher_for

    searcher = searcher_for(retrodb.open(db))
    searcher.query(QUERIES[:2], k=4, exact=True)
    assert not [key for key in searcher.cache if key[0] == "keys"]


def test_parallel_and_serial_search_agree(db):
    serial = retrodb.open(db).query(QUERIES, k=5, threads=1)
    parallel = retrodb.open(db).query(QUERIES, k=5, threads=4)
    assert ids_of(serial) == ids_of(parallel)


def test_neighbour_payload_is_the_chunk_and_its_continuation(db):
    handle = retrodb.open(db)
    [result] = handle.query("the with statement", k=6)
    assert isinstance(result.neighbours[0], Neighbour)
    for n in result.neighbours:
        row = handle.sql(f"SELECT c.position, c.tokens, c.continuation_id, substr(d.text, c.char_start + 1, "
                         f"c.char_end - c.char_start) AS text FROM chunks c JOIN documents d USING (doc_id) "
                         f"WHERE c.chunk_id = {n.chunk_id}").to_pylist()[0]
        assert (n.text, n.position, n.tokens) == (row["text"], row["position"], row["tokens"])
        if row["continuation_id"] is None:
            assert n.continuation is None and n.continuation_tokens == []
        else:
            nxt = handle.sql(f"SELECT c.tokens, substr(d.text, c.char_start + 1, c.char_end - c.char_start) AS text "
                             f"FROM chunks c JOIN documents d USING (doc_id) WHERE c.chunk_id = "
                             f"{row['continuation_id']}").to_pylist()[0]
            assert (n.continuation, n.continuation_tokens) == (nxt["text"], nxt["tokens"])


def test_last_chunk_has_no_continuation(db):
    handle = retrodb.open(db)
    last = handle.sql("SELECT chunk_id FROM chunks WHERE continuation_id IS NULL ORDER BY chunk_id LIMIT 1")
    cid = last.column(0)[0].as_py()
    [r] = handle.query(chunk_ids=[cid], k=1, exclude_same_doc=False)
    assert r.neighbours[0].chunk_id == cid and r.neighbours[0].continuation is None
    assert r.neighbours[0].score == pytest.approx(1.0, abs=1e-3)


def tombstone(db_path, doc_id: str) -> None:
    """Delete one document the way `retrodb delete` will: a tombstones file and a new snapshot."""
    handle = retrodb.open(db_path)
    row = handle.sql(f"SELECT segment, first_chunk_id, num_chunks, num_tokens FROM documents "
                     f"WHERE doc_id = '{doc_id}'").to_pylist()[0]
    with handle.writer("delete") as w:
        edit = w.edit("delete")
        seg = w.base.segments[row["segment"]]
        table = pa.table({"doc_id": [doc_id], "first_chunk_id": [row["first_chunk_id"]],
                          "num_chunks": pa.array([row["num_chunks"]], pa.int32()), "version": [edit.version]},
                         schema=arrow_schema("tombstones"))
        path = w.segment_dir(seg.number) / f"tombstones-v{edit.version}.parquet"
        edit.put(seg.with_files({"tombstones": write_table_file(w.root, path, table)}).changed(
            deleted_documents=1, deleted_chunks=row["num_chunks"], deleted_tokens=row["num_tokens"]))
        w.commit(edit)


def test_tombstoned_chunks_are_never_returned(own_db):
    handle = retrodb.open(own_db)
    text = handle.sql("SELECT text FROM documents WHERE doc_id = 'lambda.txt'").column(0)[0].as_py()[:400]
    before = handle.query(text, k=5)[0]
    assert before.neighbours[0].doc_id == "lambda.txt"  # it would be found
    dead = set(handle.sql("SELECT chunk_id FROM chunks WHERE doc_id = 'lambda.txt'").column(0).to_pylist())
    tombstone(own_db, "lambda.txt")
    handle = retrodb.open(own_db)
    q = HashEmbedder(64).embed([text] + QUERIES)
    want = brute_force(own_db, q, 10)
    assert not dead & {c for row in want for c in row}
    for exact in (False, True):
        got = handle.query([text] + QUERIES, k=10, ef=200, exact=exact)
        assert ids_of(got) == want
    # the old snapshot still sees the document
    assert retrodb.open(own_db, at=handle.version - 1).query(text, k=1)[0].neighbours[0].doc_id == "lambda.txt"


def test_exclude_doc(db):
    handle = retrodb.open(db)
    [top] = handle.query("the with statement and context managers", k=5)
    doc = top.neighbours[0].doc_id
    [r] = handle.query("the with statement and context managers", k=5, exclude_doc=doc)
    q = HashEmbedder(64).embed(["the with statement and context managers"])
    assert ids_of([r]) == brute_force(db, q, 5, skip=lambda cid, d: d == doc)
    warned = []
    handle.query("with", k=2, exclude_doc="no-such-doc", on_warning=warned.append)
    assert warned and "no-such-doc" in warned[0]


def test_chunk_id_query_excludes_its_own_document_by_default(db):
    handle = retrodb.open(db)
    row = handle.sql("SELECT chunk_id, doc_id FROM chunks WHERE doc_id = 'try.txt' AND position = 1").to_pylist()[0]
    [same] = handle.query(chunk_ids=[row["chunk_id"]], k=4, exclude_same_doc=False)
    assert same.neighbours[0].chunk_id == row["chunk_id"] and same.chunk_id == row["chunk_id"]
    assert same.query == same.neighbours[0].text
    [other] = handle.query(chunk_ids=[row["chunk_id"]], k=4)
    assert all(n.doc_id != "try.txt" for n in other.neighbours) and len(other.neighbours) == 4
    key = handle.query(chunk_ids=[row["chunk_id"]], k=4, exact=True)
    assert ids_of(key) == ids_of([other])


def test_results_json_schema(cli, db):
    r = cli("query", db, "raise an exception", "lambda", "-k", "3", "--format", "json")
    assert r.code == 0, r.err
    lines = r.json_lines()
    assert [o["query"] for o in lines] == ["raise an exception", "lambda"]
    for obj in lines:
        assert list(obj) == ["query", "neighbours"] and len(obj["neighbours"]) == 3
        for rank, n in enumerate(obj["neighbours"], 1):
            assert list(n) == FIELDS and n["rank"] == rank
            assert isinstance(n["score"], float) and isinstance(n["chunk_id"], int) and isinstance(n["doc_id"], str)
            assert isinstance(n["position"], int) and isinstance(n["text"], str) and n["text"]
            assert n["continuation"] is None or isinstance(n["continuation"], str)
            assert all(isinstance(t, int) for t in n["tokens"] + n["continuation_tokens"])
            assert 0 <= n["r"] <= 1 and set(n["overlap"]) == {"tokens", "query_start", "start", "text_span",
                                                               "continuation_span"}
    lib = retrodb.open(db).query(["raise an exception", "lambda"], k=3, overlap=True)
    assert [x.to_dict() for x in lib] == lines
    assert retrodb.open(db).query("lambda", k=1)[0].neighbours[0].r is None  # computed only when asked


def test_cli_human_file_and_stdin(cli, db, tmp_path, monkeypatch):
    import io

    r = cli("query", db, "string methods", "-k", "2")
    assert r.code == 0 and "#1  " in r.out and "#2  " in r.out and "query: string methods" in r.out
    f = tmp_path / "q.txt"
    f.write_text("string methods\n\n  lambda  \n")
    r = cli("query", db, "--file", f, "--format", "json")
    assert [o["query"] for o in r.json_lines()] == ["string methods", "lambda"]
    monkeypatch.setattr("sys.stdin", io.StringIO("for loops\nwhile loops\n"))
    r = cli("query", db, "-", "-k", "1", "--format", "json")
    assert [o["query"] for o in r.json_lines()] == ["for loops", "while loops"]
    cid = retrodb.open(db).sql("SELECT min(chunk_id) FROM chunks").column(0)[0].as_py()
    r = cli("query", db, "--chunk-id", cid, "--include-same-doc", "-k", "1", "--format", "json")
    assert r.json_lines()[0]["neighbours"][0]["chunk_id"] == cid


def test_error_cases(cli, db, tmp_path):
    for args in [("",), ("   ",), ()]:
        r = cli("query", db, *args)
        assert r.code == 2 and "empty query" in r.err and "Traceback" not in r.err  # usage errors exit 2
    (tmp_path / "empty.txt").write_text("\n \n")
    r = cli("query", db, "--file", tmp_path / "empty.txt")
    assert r.code == 1 and "empty query" in r.err
    r = cli("query", db, "--chunk-id", "12345")
    assert r.code == 1 and "chunk 12345 is not in" in r.err
    r = cli("query", db, "x", "--chunk-id", "1")
    assert r.code == 2 and "not both" in r.err
    r = cli("query", db, "x", "-k", "0")
    assert r.code == 2
    with pytest.raises(RetrodbError, match="k must be at least 1"):
        retrodb.open(db).query("x", k=0)
    r = cli("query", tmp_path / "missing", "x")
    assert r.code == 1 and "no retrodb database" in r.err


def test_no_keys_yet(cli, tmp_path):
    from retrodb.ingest import IngestOptions, ingest

    path = tmp_path / "db"
    ingest(path, [str(topic_corpus(tmp_path / "c", ["pass", "del"]))], IngestOptions(workers=1))
    r = cli("query", path, "anything")
    assert r.code == 1 and "no keys yet" in r.err and "retrodb embed" in r.err
    with pytest.raises(MissingStage):
        retrodb.open(path).query("anything")
    empty = tmp_path / "empty"
    assert cli("init", empty).code == 0
    r = cli("query", empty, "anything")
    assert r.code == 1 and "has no documents" in r.err and "retrodb ingest" in r.err


def test_no_index_falls_back_to_exact_with_a_warning(tmp_path, cli):
    path = embedded_db(tmp_path, names=["with", "try", "for", "while"], segment_bytes=5_000)
    warned = []
    got = retrodb.open(path).query(QUERIES, k=4, on_warning=warned.append)
    assert warned and "no index" in warned[0] and "retrodb index" in warned[0]
    assert ids_of(got) == brute_force(path, HashEmbedder(64).embed(QUERIES), 4)
    r = cli("query", path, "with", "--format", "json")
    assert r.code == 0 and "retrodb index" in r.err and len(r.json_lines()[0]["neighbours"]) == 4


def test_older_snapshot_and_index_cache(own_db, tmp_path):
    handle = retrodb.open(own_db)
    handle.query("with", k=1)
    cache = handle._query_cache
    loaded = {k: v for k, v in cache.items() if k[0] == "index"}
    assert len(loaded) == len(handle.snapshot.segments)
    handle.query("try", k=1)
    assert all(cache[k] is v for k, v in loaded.items())  # not reloaded
    from retrodb.embed import embed
    from retrodb.ingest import IngestOptions, ingest

    old = handle.version
    ingest(own_db, [str(topic_corpus(tmp_path / "more", ["nonlocal"]))], IngestOptions(workers=1))
    embed(own_db, "hash:64")
    index(own_db)
    text = retrodb.open(own_db).sql("SELECT text FROM documents WHERE doc_id = 'nonlocal.txt'").column(0)[0].as_py()
    assert retrodb.open(own_db).query(text[:300], k=1)[0].neighbours[0].doc_id == "nonlocal.txt"
    assert retrodb.open(own_db, at=old).query(text[:300], k=1)[0].neighbours[0].doc_id != "nonlocal.txt"
    handle.snapshot = retrodb.open(own_db).snapshot  # the handle moves on: old indexes are kept, one is new
    handle.query("with", k=1)
    assert all(cache[k] is v for k, v in loaded.items()) and sum(k[0] == "index" for k in cache) == len(loaded) + 1


def test_exclusion_over_fetches_within_a_segment(tmp_path):
    """One segment: the excluded document's own chunks fill the segment's top k, so k more must be fetched."""
    path = embedded_db(tmp_path, names=["string-methods", "sequence-types", "for", "lambda"], segment_bytes=1 << 30)
    index(path)
    handle = retrodb.open(path)
    assert len(handle.snapshot.segments) == 1
    cid = handle.sql("SELECT chunk_id FROM chunks WHERE doc_id = 'string-methods.txt' AND position = 3"
                     ).column(0)[0].as_py()
    [same] = handle.query(chunk_ids=[cid], k=6, exclude_same_doc=False)
    assert all(n.doc_id == "string-methods.txt" for n in same.neighbours)  # what exclusion has to skip
    keys = np.load(handle.snapshot.segments[1].path(path, "keys")).astype(np.float32)
    q = keys[[cid & 0xFFFFFFFF]]
    want = brute_force(path, q, 6, skip=lambda c, d: d == "string-methods.txt")
    for exact in (False, True):
        [r] = handle.query(chunk_ids=[cid], k=6, exact=exact, ef=200)
        assert ids_of([r]) == want


@pytest.mark.slow
def test_real_minilm_end_to_end(tmp_path):
    """ingest -> embed (bundled MiniLM) -> index -> query finds the topic that answers the question."""
    from retrodb.embed import embed
    from retrodb.ingest import IngestOptions, ingest

    names = ["lambda", "pass", "while", "shifting", "imaginary", "del", "yield", "continue"]
    path = tmp_path / "db"
    ingest(path, [str(topic_corpus(tmp_path / "c", names))], IngestOptions(workers=1, segment_bytes=2000))
    embed(path, device="cpu", dtype="fp32")
    index(path)
    handle = retrodb.open(path)
    assert len(handle.snapshot.segments) >= 2
    got = handle.query(["small anonymous functions created with lambda expressions",
                        "shift an integer left or right by a number of bits"], k=3)
    assert [r.neighbours[0].doc_id for r in got] == ["lambda.txt", "shifting.txt"]
    assert ids_of(got) == ids_of(handle.query(["small anonymous functions created with lambda expressions",
                                               "shift an integer left or right by a number of bits"], k=3,
                                              exact=True))


def test_overlap_spans_point_at_the_shared_run(db):
    handle = retrodb.open(db)
    row = handle.sql("SELECT chunk_id, doc_id FROM chunks WHERE position = 1 LIMIT 1").to_pylist()[0]
    [res] = handle.query(chunk_ids=[row["chunk_id"]], k=1, exclude_same_doc=False, overlap=True)
    n = res.neighbours[0]
    assert n.chunk_id == row["chunk_id"] and n.r == 1.0  # the chunk itself: the whole chunk is the run
    assert n.overlap["tokens"] == len(n.tokens) and n.overlap["text_span"] == [0, len(n.text)]
    text = "the with statement calls __enter__ and __exit__ of the context manager"
    from retrodb.tokenizer import load_tokenizer

    q = load_tokenizer(handle.config["tokenizer"]["path"]).encode(text, add_special_tokens=False).ids
    for nb in handle.query(text, k=4, overlap=True)[0].neighbours:
        o = nb.overlap
        value = list(nb.tokens) + list(nb.continuation_tokens)
        assert value[o["start"]: o["start"] + o["tokens"]] == q[o["query_start"]: o["query_start"] + o["tokens"]]
        assert nb.r == pytest.approx(o["tokens"] / len(q), abs=1e-6)
        if o["text_span"]:
            a, b = o["text_span"]
            assert nb.text[a:b].strip()


def test_human_view_fits_80_columns_and_prints_data_literally(cli, tmp_path):
    import json as _json

    from retrodb.embed import embed
    from retrodb.ingest import IngestOptions, ingest

    src = tmp_path / "d.jsonl"
    rows = [{"id": "[red]markup[/red]", "text": "Look: [bold]not bold[/bold] and [link=x]y[/link] " * 20},
            {"id": "plain", "text": "ordinary words about retrieval and databases " * 20}]
    src.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "db"
    ingest(root, [str(src)], IngestOptions(workers=1))
    embed(root, "hash:16")
    r = cli("query", root, "[bold]not bold[/bold]", "-k", "2")
    assert r.code == 0, r.err
    assert "[red]markup[/red]" in r.out and "[bold]not bold[/bold]" in r.out
    assert max(len(line) for line in r.out.splitlines()) <= 80
    assert "run " in r.out and " tok, r " in r.out
