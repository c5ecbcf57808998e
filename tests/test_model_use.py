"""`retrodb eval` and `retrodb generate` on a tiny random model (chunks of 8 tokens) and a hash-keyed
database: the metric, live retrieval, edits that change the output while the weights stay, refusal of
a database built with another tokenizer, and the CLI's JSON shapes."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from conftest import make_text  # noqa: E402
from model_fakes import TINY_MODEL, one_torch_thread  # noqa: E402,F401 (fixture)

import retrodb  # noqa: E402
from retrodb.add import add  # noqa: E402
from retrodb.database import Database  # noqa: E402
from retrodb.delete import delete  # noqa: E402
from retrodb.embed import embed  # noqa: E402
from retrodb.errors import ConfigMismatch  # noqa: E402
from retrodb.index import index  # noqa: E402
from retrodb.ingest import IngestOptions, ingest  # noqa: E402
from retrodb.model.checkpoint import write_model_dir  # noqa: E402
from retrodb.model.config import RetroConfig  # noqa: E402
from retrodb.model.decoder import Retro  # noqa: E402
from retrodb.model.evaluate import windows  # noqa: E402
from retrodb.model.lm import load  # noqa: E402
from retrodb.tokenizer import default_lm_tokenizer_dir, default_model_dir, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
M = 8
NEW_DOC = "new-doc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model with the bundled tokenizer; CCA given weights so retrieval matters."""
    torch.manual_seed(0)
    model = Retro(RetroConfig(vocab_size=8192, chunk_size=M, **TINY_MODEL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cca.attn.out." in name:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("model") / "tiny"
    tok = load_tokenizer(str(default_lm_tokenizer_dir())).to_str()
    write_model_dir(model, path, tok, extra={"seq_len": 64})
    return path


@pytest.fixture(scope="module")
def base_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": make_text(i, 80)}) + "\n" for i in range(12)))
    db = root / "db"
    ingest(db, [str(src)], IngestOptions(workers=1), chunk_size=M)
    embed(db, "hash:16")
    index(db, M=8, ef_construction=40, threads=1)
    return db


@pytest.fixture
def db(base_db, tmp_path):
    import shutil

    shutil.copytree(base_db, tmp_path / "db")
    return tmp_path / "db"



def test_windows_score_every_position_once():
    for n in (0, 1, 2, 9, 32, 33, 100):
        scored = []
        for start, first in windows(n, 32, 16):
            stop = min(start + 32, n - 1)
            assert start <= first < stop and start % 16 == 0
            assert first - start >= (16 if scored else 0)  # context carried over from the previous window
            scored.extend(range(first, stop))
        assert scored == list(range(max(n - 1, 0)))


def test_bpb_without_retrieval_is_the_model_loss_in_bits_per_byte(model_dir, db):
    lm = load(model_dir)
    text = make_text(3, 12)
    ids = lm.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) <= 64  # one window
    x = torch.tensor([ids])
    nats = torch.nn.functional.cross_entropy(lm.model(x)[0, :-1], x[0, 1:], reduction="sum").item()
    n_bytes = len(text.encode()) - len(lm.tokenizer.decode(ids[:1]).encode())
    report = lm.bpb(db, [text])
    assert report.bytes == n_bytes and report.tokens == len(ids) - 1
    assert report.bpb_no_retrieval == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert report.bpb is not None and report.bpb != report.bpb_no_retrieval
    # a long text is read in windows of 64 tokens (32 of context); totals add up
    long = make_text(4, 200)
    r = lm.bpb(db, [long, text], retrieval=False)
    assert r.texts[1].bpb_no_retrieval == pytest.approx(report.bpb_no_retrieval, rel=1e-5)
    assert r.bytes == r.texts[0].bytes + r.texts[1].bytes and r.bpb is None


def test_add_and_delete_change_bpb_and_leave_the_weights(model_dir, db, tmp_path):
    lm = load(model_dir)
    before_sha = lm.weights_sha256()
    text = make_text(99, 120)
    b0 = lm.bpb(db, [text]).bpb
    src = tmp_path / "new.jsonl"
    src.write_text(json.dumps({"id": NEW_DOC, "text": text}) + "\n")
    add(db, [str(src)])
    b1 = lm.bpb(db, [text]).bpb
    assert b1 != pytest.approx(b0, rel=1e-6)  # the model now reads the new document
    assert lm.bpb(db, [text], exclude_doc=[NEW_DOC]).bpb == pytest.approx(b0, rel=1e-9)  # leakage control
    delete(db, doc_ids=[NEW_DOC])
    assert lm.bpb(db, [text]).bpb == pytest.approx(b0, rel=1e-9)
    assert lm.weights_sha256() == before_sha


def test_a_database_with_another_tokenizer_is_refused(model_dir, tmp_path, cli):
    other = tmp_path / "wordpiece-db"
    Database.create(other, tokenizer=default_model_dir(), chunk_size=M)
    lm = load(model_dir)
    with pytest.raises(ConfigMismatch) as err:
        lm.bpb(other, ["some text"])
    message = str(err.value)
    assert str(default_model_dir()) in message and str(model_dir / "tokenizer.json") in message
    assert "retrodb ingest" in message and "retrodb train" in message
    (tmp_path / "t.txt").write_text("some text to score")
    r = cli("eval", other, tmp_path / "t.txt", "--model", model_dir)
    assert r.code == 1 and "tokenizer" in r.err and "hint" in r.err
    r = cli("generate", other, "some text", "--model", model_dir)
    assert r.code == 1 and "tokenizer" in r.err


def test_generate_retrieves_for_each_completed_chunk(model_dir, db):
    lm = load(model_dir)
    prompt = make_text(5, 20)
    n_prompt = len(lm.tokenizer.encode(prompt, add_special_tokens=False).ids)
    g = lm.generate(db, prompt, max_new_tokens=20, temperature=0.9, seed=3)
    assert len(g.tokens) == 20 and g.text == lm.tokenizer.decode(g.tokens)
    # a chunk is retrieved for once it is complete and a token after it is predicted
    assert len(g.chunks) == (n_prompt + 20 - 1) // M
    assert all(len(c.neighbours) == 2 and c.text for c in g.chunks)
    assert lm.generate(db, prompt, max_new_tokens=20, temperature=0.9, seed=3).tokens == g.tokens  # seeded
    plain = lm.generate(db, prompt, max_new_tokens=20, temperature=0, retrieval=False)
    assert plain.chunks == [] and len(plain.tokens) == 20


def test_cli_eval_and_generate_json(model_dir, db, tmp_path, cli):
    src = tmp_path / "two.jsonl"
    src.write_text("".join(json.dumps({"id": f"e{i}", "text": make_text(50 + i, 40)}) + "\n" for i in range(2)))
    r = cli("eval", db, src, "--model", model_dir, "--format", "json")
    assert r.code == 0, r.err
    (obj,) = r.json_lines()
    assert set(obj) == {"bpb", "bpb_no_retrieval", "bytes", "tokens", "files"}
    assert [f["doc_id"] for f in obj["files"]] == ["e0", "e1"]
    assert set(obj["files"][0]) == {"file", "doc_id", "bpb", "bpb_no_retrieval", "bytes", "tokens"}
    assert obj["bytes"] == sum(f["bytes"] for f in obj["files"])
    r = cli("generate", db, make_text(7, 20), "--model", model_dir, "--max-new-tokens", "12", "--format", "json")
    assert r.code == 0, r.err
    (g,) = r.json_lines()
    assert set(g) == {"prompt", "text", "chunks"}
    assert g["chunks"] and set(g["chunks"][0]) == {"text", "neighbours"}
    assert set(g["chunks"][0]["neighbours"][0]) == {"chunk_id", "doc_id", "score"}
    r = cli("generate", db, "[bold]x", "--model", model_dir, "--max-new-tokens", "3", "--show-neighbours")
    assert r.code == 0 and "[bold]x" in r.out  # printed as given, never as markup
    r = cli("eval", db, tmp_path / "missing.txt", "--model", model_dir)
    assert r.code == 1 and "missing.txt" in r.err
    assert retrodb.open(db).stats()["documents"] == 12


def test_fast_retrieval_reads_the_same_tokens_as_the_query_path(db):
    """Eval's retrieval (ids, then stored tokens: no text read) equals the full query path's [N, F]."""
    from retrodb.model.retrieval import database_handle, retrieve

    handle = database_handle(db)
    texts = [make_text(i, 12) for i in range(5)] + ["retrieval database chunk"]
    fast = retrieve(handle, texts, 3, M, exclude_doc=["d1"])
    full = retrieve(handle, texts, 3, M, exclude_doc=["d1"], with_text=True)
    assert fast.tokens.shape == (len(texts), 3, 2 * M)
    assert (fast.tokens == full.tokens).all() and (fast.mask == full.mask).all()
    assert [[cid for cid, _ in row] for row in fast.neighbours] == \
        [[n.chunk_id for n in row] for row in full.neighbours]
    assert all(n.doc_id != "d1" for row in full.neighbours for n in row)
