"""`retrodb serve`: the JSON API on a real local port, following commits, errors, the CLI client."""

from __future__ import annotations

import json
import os
import urllib.parse
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import retrodb
from retrodb.serve import BadRequest, QueryRequest, Service, check_host, create_app
from tests.conftest import REPO
from tests.edit_helpers import build_db, write_jsonl

uvicorn = pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server on a free local port, in a thread of this process."""

    def __init__(self, root: Path):
        self.service = Service(root, threads=1)
        self.port = free_port()
        config = uvicorn.Config(create_app(self.service), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, dict]:
        return self._send(urllib.request.Request(self.url + path))

    def post(self, path: str, body, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        return self._send(urllib.request.Request(self.url + path, data=data,
                                                 headers={"content-type": "application/json"}))

    @staticmethod
    def _send(req) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(req, timeout=60) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served_db(tmp_path_factory):
    return build_db(tmp_path_factory.mktemp("serve") / "db", n_docs=24, segment_bytes=3000, index=True)


@pytest.fixture
def server(served_db, tmp_path):
    import shutil

    root = tmp_path / "db"
    shutil.copytree(served_db, root)
    running = Running(root)
    yield running
    running.stop()


def test_query_answers_like_the_library(server):
    status, answer = server.post("/api/query", {"texts": ["retrieval chunk neighbour"], "k": 3})
    assert status == 200
    expected = retrodb.open(server.service.root).query(["retrieval chunk neighbour"], 3, overlap=True)[0].to_dict()
    assert answer["results"][0]["neighbours"] == expected["neighbours"]
    assert answer["results"][0]["query"] == "retrieval chunk neighbour"
    assert answer["version"] == retrodb.open(server.service.root).version
    assert answer["path"] == str(server.service.root.resolve())


def test_chunk_neighbours_leave_out_the_own_document(server):
    db = retrodb.open(server.service.root)
    chunk = db.sql("SELECT chunk_id, doc_id FROM chunks ORDER BY chunk_id LIMIT 1").to_pylist()[0]
    status, answer = server.get(f"/api/chunks/{chunk['chunk_id']}/neighbours?k=5")
    assert status == 200
    result = answer["results"][0]
    assert result["chunk_id"] == chunk["chunk_id"]
    assert len(result["neighbours"]) == 5
    assert all(n["doc_id"] != chunk["doc_id"] for n in result["neighbours"])
    status, answer = server.get(f"/api/chunks/{chunk['chunk_id']}/neighbours?k=5&exclude_same_doc=false")
    assert answer["results"][0]["neighbours"][0]["chunk_id"] == chunk["chunk_id"]  # itself, score 1


def test_document_view_returns_text_and_chunk_spans(server):
    status, doc = server.get("/api/document?doc_id=d3")
    assert status == 200
    assert doc["doc_id"] == "d3" and doc["chunks"]
    for ch in doc["chunks"]:
        assert doc["text"][ch["char_start"]:ch["char_end"]].strip()
    assert [c["position"] for c in doc["chunks"]] == list(range(len(doc["chunks"])))
    status, err = server.get("/api/document?doc_id=" + urllib.parse.quote("no such [/bold] doc"))
    assert status == 404 and "no such [/bold] doc" in err["error"]


def test_a_commit_in_another_process_is_seen_without_restart(server, tmp_path):
    from retrodb.add import add

    root = server.service.root
    before = server.get("/api/stats")[1]
    src = write_jsonl(tmp_path / "new.jsonl", ["fresh-doc"], seed=999)
    add(root, [str(src)])
    status, after = server.get("/api/stats")
    assert after["version"] == before["version"] + 1
    assert after["documents"] == before["documents"] + 1
    status, answer = server.get("/api/document?doc_id=fresh-doc")
    assert status == 200
    # and deletion: the deleted document is never returned again
    from retrodb.delete import delete

    delete(root, doc_ids=["fresh-doc"])
    status, _ = server.get("/api/document?doc_id=fresh-doc")
    assert status == 404


def test_a_vacuumed_snapshot_is_never_read(server, tmp_path):
    from retrodb.add import add
    from retrodb.compact import compact
    from retrodb.vacuum import vacuum

    root = server.service.root
    server.post("/api/query", {"texts": ["retrieval"], "k": 2})  # loads the current snapshot's files
    old = server.service.db.version
    add(root, [str(write_jsonl(tmp_path / "more.jsonl", [f"m{i}" for i in range(6)], seed=500))])
    compact(root, min_deleted_ratio=0.0, target_segment_chunks=10**6, workers=1)
    vacuum(root, grace=0)
    assert not (root / "manifests" / f"v-{old:08d}.json").exists()
    status, answer = server.post("/api/query", {"texts": ["retrieval"], "k": 4})
    assert status == 200, answer
    assert answer["version"] == retrodb.open(root).version


def test_errors_are_json_with_the_cli_message(server):
    status, err = server.post("/api/query", {"texts": ["  "], "k": 2})
    assert status == 400 and err["error"].startswith("empty query") and err["hint"]
    status, err = server.post("/api/query", {"texts": ["x"], "chunk_ids": [1]})
    assert status == 400 and "exactly one" in err["error"]
    status, err = server.post("/api/query", {"texts": "not a list"})
    assert status == 400 and "must be a list" in err["error"]
    status, err = server.post("/api/query", {"texts": ["x"], "k": 0})
    assert status == 400 and "k must be" in err["error"]
    status, err = server.post("/api/query", {"texts": ["x"], "drop": "table"})
    assert status == 400 and "unknown field" in err["error"]
    status, err = server.post("/api/query", None, raw=b"{not json")
    assert status == 400 and "not JSON" in err["error"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # refused before the body
        sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 3000000\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"over 1048576 bytes" in answer
    status, err = server.get("/api/chunks/999999999999/neighbours")
    assert status in (400, 404) and "999999999999" in err["error"]


def test_the_server_never_writes(server):
    root = server.service.root

    def listing():
        return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in root.rglob("*") if p.is_file())

    before = listing()
    server.post("/api/query", {"texts": ["a", "b"], "k": 3})
    server.get("/api/stats")
    server.get("/api/document?doc_id=d1")
    assert listing() == before


def test_concurrent_clients_get_answers(server):
    errors, done = [], []

    def client(i: int) -> None:
        for j in range(5):
            status, answer = server.post("/api/query", {"texts": [f"query {i} {j} retrieval"], "k": 2})
            (done if status == 200 and len(answer["results"][0]["neighbours"]) == 2 else errors).append(status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(done) == 40


def test_page_is_served_and_escapes_nothing_into_html(server):
    with urllib.request.urlopen(server.url + "/", timeout=30) as res:
        html = res.read().decode()
    assert "<title>retrodb" in html
    assert "innerHTML" not in html  # data goes in as text nodes only


def test_request_validation_is_strict():
    assert QueryRequest.from_json({"text": "x"}).texts == ["x"]
    assert QueryRequest.from_json({"chunk_id": 5}).chunk_ids == [5]
    for bad in ([], {"texts": [1]}, {"chunk_ids": ["5"]}, {"chunk_ids": [True]}, {"texts": ["x"], "exact": "yes"},
                {"texts": ["x"] * 1000}):
        with pytest.raises(BadRequest):
            QueryRequest.from_json(bad)


def test_binding_beyond_loopback_needs_an_explicit_host():
    assert check_host("127.0.0.1", explicit=False) is None
    assert "no authentication" in check_host("0.0.0.0", explicit=True)
    with pytest.raises(retrodb.RetrodbError):
        check_host("0.0.0.0", explicit=False)


def test_query_cli_through_the_server_prints_what_the_local_command_prints(server, cli):
    root = server.service.root
    local = cli("query", root, "retrieval chunk neighbour", "-k", "3", "--format", "json")
    remote = cli("query", root, "retrieval chunk neighbour", "-k", "3", "--format", "json", "--server", server.url)
    assert local.code == remote.code == 0
    assert remote.json_lines() == local.json_lines()
    local_h = cli("query", root, "retrieval chunk neighbour", "-k", "2")
    remote_h = cli("query", root, "retrieval chunk neighbour", "-k", "2", "--server", server.url)
    assert remote_h.out == local_h.out
    wrong = cli("query", root.parent, "x", "--server", server.url)
    assert wrong.code == 1 and "serves" in wrong.err


def test_query_cli_server_process_does_not_import_torch(server):
    code = ("import sys; from retrodb.cli.main import run; rc = run(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(REPO), RETRODB_SERVER=server.url)
    proc = subprocess.run([sys.executable, "-c", code, "query", str(server.service.root), "retrieval", "-k", "2",
                           "--format", "json"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"NO-TORCH" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["neighbours"]


def test_unreachable_server_is_a_clear_error(cli, served_db):
    res = cli("query", served_db, "x", "--server", f"http://127.0.0.1:{free_port()}")
    assert res.code == 1 and "cannot reach the retrodb server" in res.err


def test_generate_and_eval_read_the_database_live(server):
    from tests.conftest import make_text

    health = server.get("/api/health")[1]
    assert health["model"] == "the bundled RETRO model" and health["model_note"] is None
    prompt = make_text(3, 120)  # well over one 64-token chunk: retrieval happens for its complete chunks
    status, g = server.post("/api/generate", {"prompt": prompt, "max_new_tokens": 6, "temperature": 0, "k": 2})
    assert status == 200, g
    assert g["prompt"] == prompt and isinstance(g["text"], str) and g["chunk_size"] == 64
    assert g["prompt_tokens"] >= 64 and len(g["chunks"]) >= g["prompt_tokens"] // 64
    first = g["chunks"][0]
    assert len(first["neighbours"]) == 2
    assert {"chunk_id", "doc_id", "score", "text", "continuation"} <= set(first["neighbours"][0])
    status, plain = server.post("/api/generate", {"prompt": prompt, "max_new_tokens": 6, "temperature": 0,
                                                   "retrieval": False})
    assert status == 200 and plain["chunks"] == []
    status, e = server.post("/api/eval", {"texts": [prompt], "k": 2})
    assert status == 200, e
    assert e["bpb"] > 0 and e["bpb_no_retrieval"] > 0 and e["tokens"] > 100 and len(e["files"]) == 1
    for bad in ({"prompt": ""}, {"prompt": "x", "max_new_tokens": 0}, {"prompt": "x", "top_p": 2},
                {"prompt": "x", "temperature": "hot"}, {"prompt": "x", "secret": 1}):
        status, err = server.post("/api/generate", bad)
        assert status == 400 and err["error"], bad
    status, err = server.post("/api/eval", {"texts": []})
    assert status == 400


def test_a_model_that_does_not_fit_the_database_is_left_out_and_said(tmp_path):
    from retrodb.ingest import IngestOptions, ingest
    from retrodb.tokenizer import default_model_dir

    root = tmp_path / "other"
    src = write_jsonl(tmp_path / "o.jsonl", ["o1", "o2"])
    ingest(root, [str(src)], IngestOptions(workers=1), tokenizer=default_model_dir())  # MiniLM's tokenizer
    running = Running(root)
    try:
        health = running.get("/api/health")[1]
        assert health["model"] is None and "tokenizer" in health["model_note"]
        status, err = running.post("/api/generate", {"prompt": "hello"})
        assert status == 404 and "no RETRO model" in err["error"] and err["hint"]
    finally:
        running.stop()
    with pytest.raises(retrodb.RetrodbError):  # a model asked for by name must fit
        Service(root, model=REPO / "retrodb" / "model" / "bundled")
