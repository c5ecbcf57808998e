"""retrodb.data: the training dataset's tensors against the stored tokens, document boundaries, read-time filters."""

import shutil

import numpy as np
import pytest
import torch

import retrodb
from retrodb.data import IGNORE_INDEX, PAD_ID, RetroDataset, RetroIterableDataset, collate, neighbour_tokens, split_of
from retrodb.errors import MissingStage, RetrodbError
from retrodb.neighbours import compute_neighbours
from tests.conftest import make_text
from tests.edit_helpers import build_db

SEQ = 128  # two 64-token chunks per item


@pytest.fixture(scope="module")
def base_db(tmp_path_factory):
    """24 documents of 1 to 6 chunks in several segments, hash keys, indexes and neighbours."""
    import json

    from retrodb.embed import embed
    from retrodb.index import index
    from retrodb.ingest import IngestOptions, ingest

    tmp = tmp_path_factory.mktemp("data")
    src = tmp / "src.jsonl"
    with open(src, "w") as f:
        for i in range(24):
            f.write(json.dumps({"id": f"d{i}", "text": make_text(i, 20 + (i * 37) % 260)}) + "\n")
    root = tmp / "db"
    ingest(root, [str(src)], IngestOptions(workers=1, segment_bytes=3000))
    embed(root, "hash:16")
    index(root, M=8, ef_construction=40, threads=1)
    compute_neighbours(root, 2)
    return root


@pytest.fixture
def db(base_db, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(base_db, path)
    return path


def stored(root):
    """chunk_id -> (doc_id, position, tokens, continuation_id) and doc_id -> its chunk ids, from SQL."""
    rows = retrodb.open(root).sql(
        "SELECT chunk_id, doc_id, position, tokens, continuation_id FROM chunks ORDER BY chunk_id").to_pylist()
    chunks = {r["chunk_id"]: r for r in rows}
    docs: dict[str, list[int]] = {}
    for r in rows:
        docs.setdefault(r["doc_id"], []).append(r["chunk_id"])
    return chunks, docs


def view_top(root, k):
    rows = retrodb.open(root).sql(f"SELECT chunk_id, neighbour_chunk_id FROM neighbours WHERE rank <= {k} "
                                  "ORDER BY chunk_id, rank").to_pylist()
    out: dict[int, list[int]] = {}
    for r in rows:
        out.setdefault(r["chunk_id"], []).append(r["neighbour_chunk_id"])
    return out


def check_items(root, items, k=2, split=None):
    """Every tensor of every item against the stored tables."""
    chunks, docs = stored(root)
    m = retrodb.open(root).config["chunk_size"]
    top = view_top(root, k)
    C = SEQ // m
    seen: dict[str, list[int]] = {}
    for it in items:
        doc = it["doc_id"]
        ids = [c for c in it["chunk_ids"].tolist() if c >= 0]
        assert ids and all(chunks[c]["doc_id"] == doc for c in ids)  # never crosses documents
        seen.setdefault(doc, []).extend(ids)
        toks = [t for c in ids for t in chunks[c]["tokens"]]
        assert it["input_ids"].dtype == torch.int64 and it["input_ids"].shape == (SEQ,)
        assert it["input_ids"][: len(toks)].tolist() == toks
        assert (it["input_ids"][len(toks):] == PAD_ID).all()
        nxt = chunks[ids[-1]]["continuation_id"]
        stream = toks + (chunks[nxt]["tokens"][:1] if nxt is not None else [])
        assert it["targets"][: len(stream) - 1].tolist() == stream[1:]
        assert (it["targets"][len(stream) - 1:] == IGNORE_INDEX).all()
        assert it["neighbours"].shape == (C, k, 2 * m) and it["neighbour_mask"].dtype == torch.bool
        for u in range(C):
            cid = int(it["chunk_ids"][u])
            nb = it["neighbour_ids"][u].tolist()
            if cid < 0:
                assert nb == [-1] * k and not it["neighbour_mask"][u].any()
                continue
            if split is None:
                assert [n for n in nb if n >= 0] == top.get(cid, [])[:k]  # the view's live top k, in order
            for j, n in enumerate(nb):
                if n < 0:
                    assert not it["neighbour_mask"][u, j].any()
                    continue
                assert chunks[n]["doc_id"] != doc  # never the item's own document
                if split == "train":
                    assert split_of(chunks[n]["doc_id"]) == "train"
                cont = chunks[n]["continuation_id"]
                want = chunks[n]["tokens"] + [None] * (m - len(chunks[n]["tokens"])) \
                    + (chunks[cont]["tokens"] if cont is not None else [])
                want += [None] * (2 * m - len(want))
                got = it["neighbours"][u, j].tolist()
                mask = it["neighbour_mask"][u, j].tolist()
                assert [g if ok else None for g, ok in zip(got, mask)] == want
                assert all(g == PAD_ID for g, ok in zip(got, mask) if not ok)
    return seen, docs, C


def test_items_match_the_stored_tokens_and_respect_documents(db):
    ds = RetroDataset(db, seq_len=SEQ, k=2)
    items = [ds[i] for i in range(len(ds))]
    seen, docs, C = check_items(db, items)
    assert seen == docs  # every chunk of every document exactly once, in order
    assert len(ds) == sum(-(-len(v) // C) for v in docs.values())
    assert any(-1 in it["chunk_ids"].tolist() for it in items)  # a document's short last window is padded
    assert ds[-1]["doc_id"] == items[-1]["doc_id"]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_iterable_yields_the_same_items_and_collate_stacks(db):
    ds = RetroDataset(db, seq_len=SEQ, k=2)
    it = list(RetroIterableDataset(db, seq_len=SEQ, k=2))
    assert len(it) == len(ds)
    for a, b in zip(it, (ds[i] for i in range(len(ds)))):
        assert a["doc_id"] == b["doc_id"] and all(torch.equal(a[x], b[x]) for x in a if x != "doc_id")
    batch = collate(it[:3])
    assert batch["neighbours"].shape == (3, 2, 2, 128) and batch["doc_id"] == [x["doc_id"] for x in it[:3]]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    assert next(iter(loader))["input_ids"].shape == (4, SEQ)


def test_deleted_and_compacted_neighbours_are_dropped_and_ranks_move_up(db):
    from retrodb.compact import compact
    from retrodb.delete import delete
    from retrodb.vacuum import vacuum

    top = view_top(db, 1)
    victims = sorted({retrodb.open(db).sql(f"SELECT doc_id FROM chunks WHERE chunk_id = {n[0]}").column(0)[0].as_py()
                      for n in list(top.values())[:6]})
    chunks, _ = stored(db)
    gone = {c for c, r in chunks.items() if r["doc_id"] in victims}
    delete(db, doc_ids=victims)
    items = [x for x in RetroDataset(db, seq_len=SEQ, k=2)]
    check_items(db, items)
    assert not {n for x in items for n in x["neighbour_ids"].flatten().tolist()} & gone
    assert not {x["doc_id"] for x in items} & set(victims)
    compact(db, 0.1, 60, workers=1)
    vacuum(db, grace=0)
    after = [x for x in RetroDataset(db, seq_len=SEQ, k=2)]
    assert len(after) == len(items)
    for a, b in zip(after, items):  # compaction moves rows, never what a reader gets
        assert a["doc_id"] == b["doc_id"] and all(torch.equal(a[x], b[x]) for x in a if x != "doc_id")


def test_split_is_deterministic_and_train_never_retrieves_validation_text(db):
    assert split_of("d1") == split_of("d1")
    ids = [f"doc-{i}" for i in range(2000)]
    val = [d for d in ids if split_of(d, 0.1) == "val"]
    assert 120 < len(val) < 280  # about 10%
    assert split_of("anything", 0.0) == "train" and split_of("anything", 1.0) == "val"
    with pytest.raises(RetrodbError):
        split_of("x", 1.5)
    train = list(RetroDataset(db, seq_len=SEQ, split="train", val_fraction=0.3))
    val_items = list(RetroDataset(db, seq_len=SEQ, split="val", val_fraction=0.3))
    assert train and val_items
    assert all(split_of(x["doc_id"], 0.3) == "train" for x in train)
    assert all(split_of(x["doc_id"], 0.3) == "val" for x in val_items)
    chunks, _ = stored(db)
    for x in train:
        for n in x["neighbour_ids"].flatten().tolist():
            assert n < 0 or split_of(chunks[n]["doc_id"], 0.3) == "train"
    excluded = list(RetroDataset(db, seq_len=SEQ, exclude_docs=["d3", "d5"]))
    assert not {x["doc_id"] for x in excluded} & {"d3", "d5"}
    assert not {chunks[n]["doc_id"] for x in excluded for n in x["neighbour_ids"].flatten().tolist() if n >= 0} \
        & {"d3", "d5"}


def test_neighbour_tokens(db):
    chunks, _ = stored(db)
    a, b = sorted(chunks)[:2]
    toks, mask = neighbour_tokens(db, np.array([[a, -1], [b, 123]]), 64)
    assert toks.shape == (2, 2, 128) and mask.shape == (2, 2, 128)
    n = len(chunks[a]["tokens"])
    assert toks[0, 0, :n].tolist() == chunks[a]["tokens"] and mask[0, 0, :n].all()
    assert not mask[0, 1].any() and not mask[1, 1].any() and (toks[1, 1] == PAD_ID).all()
    cont = chunks[b]["continuation_id"]
    if cont is not None:
        assert toks[1, 0, 64: 64 + len(chunks[cont]["tokens"])].tolist() == chunks[cont]["tokens"]


def test_errors(db, tmp_path):
    with pytest.raises(RetrodbError, match="multiple of the chunk size"):
        RetroDataset(db, seq_len=100)
    with pytest.raises(RetrodbError, match="--refresh --k 3"):
        RetroDataset(db, seq_len=SEQ, k=3)
    bare = build_db(tmp_path / "bare", n_docs=4)
    with pytest.raises(MissingStage, match="retrodb neighbours"):
        RetroDataset(bare)


def test_an_older_snapshot_reads_its_own_neighbours(db, tmp_path):
    from retrodb.delete import delete

    v = retrodb.open(db).version
    before = [x["neighbour_ids"] for x in RetroDataset(db, seq_len=SEQ)]
    delete(db, doc_ids=["d2", "d7"])
    at = [x["neighbour_ids"] for x in RetroDataset(db, seq_len=SEQ, at=v)]
    assert all(torch.equal(a, b) for a, b in zip(before, at)) and len(at) == len(before)


def test_datasets_pickle_for_dataloader_workers(db):
    import pickle

    ds = RetroDataset(db, seq_len=SEQ)
    first = ds[3]
    again = pickle.loads(pickle.dumps(ds))[3]
    assert all(torch.equal(first[x], again[x]) for x in first if x != "doc_id")
    it = pickle.loads(pickle.dumps(RetroIterableDataset(db, seq_len=SEQ)))
    assert next(iter(it))["doc_id"] == ds[0]["doc_id"]
