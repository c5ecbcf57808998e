import unicodedata

import numpy as np
import pyarrow.parquet as pq
import pytest

import retrodb
from retrodb.ingest import IngestOptions, ingest
from retrodb.tokenizer import chunk_batch, default_lm_tokenizer_dir, default_model_dir, load_tokenizer


def _norm(s: str) -> str:
    s = unicodedata.normalize("NFD", s.lower())
    return "".join(c for c in s if not c.isspace() and unicodedata.category(c) != "Mn")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(default_model_dir()))


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunk_batch_boundaries(tok, chunk_size):
    texts = ["Hello world, this is a test of chunking.", "x", "Ünïcödé wörds and emoji-free text " * 9]
    b = chunk_batch(tok, texts, chunk_size)
    for d, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False).ids
        mine = np.where(b.chunk_doc == d)[0]
        assert len(mine) == -(-len(ids) // chunk_size)
        joined = np.concatenate([b.tokens[b.chunk_token_starts[c]: b.chunk_token_starts[c] + b.chunk_token_counts[c]]
                                 for c in mine])
        assert joined.tolist() == ids
        assert all(b.chunk_token_counts[c] == chunk_size for c in mine[:-1])
        assert list(b.chunk_position[mine]) == list(range(len(mine)))
        for c in mine:
            span = text[b.chunk_char_start[c]: b.chunk_char_end[c]]
            piece = b.tokens[b.chunk_token_starts[c]: b.chunk_token_starts[c] + b.chunk_token_counts[c]]
            assert _norm(tok.decode(piece.tolist()).replace("##", "").replace(" ", "")) == _norm(span)


def test_ingested_chunks_decode_to_their_spans_and_concatenate(corpus, db_path):
    tok = load_tokenizer(str(default_lm_tokenizer_dir()))  # a new database's LM tokenizer: the model's BPE
    ingest(db_path, [str(corpus)], IngestOptions(workers=1))
    db = retrodb.open(db_path)
    assert db.config["tokenizer"]["path"] == str(default_lm_tokenizer_dir())
    seg = db.snapshot.segments["seg-000001"]
    docs = pq.read_table(db.snapshot.path(seg.files["documents"])).to_pylist()
    chunks = pq.read_table(db.snapshot.path(seg.files["chunks"])).to_pylist()
    by_doc = {}
    for c in chunks:
        by_doc.setdefault(c["doc_id"], []).append(c)
    assert set(by_doc) == {d["doc_id"] for d in docs}
    for d in docs:
        cs = by_doc[d["doc_id"]]
        assert [c["position"] for c in cs] == list(range(d["num_chunks"]))
        assert cs[0]["chunk_id"] == d["first_chunk_id"]
        full = tok.encode(d["text"], add_special_tokens=False).ids
        assert sum((c["tokens"] for c in cs), []) == full
        for a, b in zip(cs, cs[1:]):
            assert a["continuation_id"] == b["chunk_id"]
            assert a["char_end"] == b["char_start"]  # byte-level: the chunks tile the text
        assert cs[-1]["continuation_id"] is None
        for c in cs:
            assert tok.decode(c["tokens"]) == d["text"][c["char_start"]: c["char_end"]]
    # token ids are stored in the narrowest type that holds the vocabulary (8192 tokens)
    assert str(pq.read_schema(db.snapshot.path(seg.files["chunks"])).field("tokens").type) == "list<element: uint16>"
