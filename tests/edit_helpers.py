"""Small databases for the edit, verify and crash tests (hash embedder, several segments)."""

from __future__ import annotations

import json
from pathlib import Path

import retrodb
from retrodb.ingest import IngestOptions, ingest
from tests.conftest import make_text


def write_jsonl(path: Path, ids, seed: int = 0, n_words: int = 60) -> Path:
    with open(path, "w") as f:
        for k, i in enumerate(ids):
            f.write(json.dumps({"id": i, "text": make_text(seed + k, n_words)}) + "\n")
    return path


def build_db(root: Path, n_docs: int = 30, segment_bytes: int = 2000, embed: str | None = "hash:16",
             index: bool = False) -> Path:
    """`n_docs` documents d0.. in segments of about `segment_bytes` input bytes, embedded unless embed=None,
    and indexed (small HNSW parameters) if `index`."""
    src = write_jsonl(root.parent / f"{root.name}-src.jsonl", [f"d{i}" for i in range(n_docs)])
    ingest(root, [str(src)], IngestOptions(workers=1, segment_bytes=segment_bytes))
    if embed:
        from retrodb.embed import embed as run_embed

        run_embed(root, embed)
    if index:
        from retrodb.index import index as run_index

        run_index(root, M=8, ef_construction=40, threads=1)
    return root


def top_doc_ids(root: Path, text: str, k: int = 5) -> list[str]:
    """Document ids of the query's k nearest chunks (HNSW), best first."""
    db = retrodb.open(root)
    return [n.doc_id for n in db.query(text, k=k, ef=200)[0].neighbours]


def content(root: Path, at: int | None = None) -> dict:
    """Everything a reader sees: documents (id -> text) and chunks (id -> doc, position, tokens, continuation)."""
    db = retrodb.open(root, at=at)
    docs = {r["doc_id"]: r["text"] for r in db.sql("SELECT doc_id, text FROM documents").to_pylist()}
    chunks = {r["chunk_id"]: (r["doc_id"], r["position"], tuple(r["tokens"]), r["continuation_id"])
              for r in db.sql("SELECT chunk_id, doc_id, position, tokens, continuation_id FROM chunks").to_pylist()}
    return {"documents": docs, "chunks": chunks}


def keys_by_chunk(root: Path) -> dict[int, bytes]:
    """chunk id -> its key's bytes, over the current snapshot's live rows."""
    import numpy as np
    import pyarrow.parquet as pq

    from retrodb import tombstones

    db = retrodb.open(root)
    out = {}
    for seg in db.snapshot.segments.values():
        ids = pq.read_table(seg.path(db.root, "chunks"), columns=["chunk_id"])["chunk_id"].to_numpy()
        keys = np.load(seg.path(db.root, "keys"))
        dead = tombstones.deleted_chunk_mask(db.root, seg.files, ids)
        out.update({int(c): keys[i].tobytes() for i, c in enumerate(ids) if not dead[i]})
    return out
