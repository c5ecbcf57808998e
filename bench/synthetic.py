"""Big synthetic databases, fast: segments written directly, with clustered float16 keys.

Tokenising and embedding a million chunks takes hours on a laptop; benchmarks of
everything after them (index, query, delete, compact) need only the files. This
writes documents and chunks Parquet through `retrodb.segment.SegmentWriter` (the
same writer ingest uses, so the tables are real: random LM token ids, text made
of words, character spans that slice the text), plus a keys file of unit
vectors drawn around `clusters` random centres (a document's chunks share a
centre, as a real document's chunks share a topic), and commits every segment
in one snapshot through a Writer. The embedder recorded is `hash:DIM`, so text
queries work too (their neighbours are meaningless; use `query_vectors`).

    python bench/synthetic.py DB --chunks 1000000 --segments 8 --dim 128 [--index]

From Python: `build(root, chunks, segments=..., dim=...)`, `query_vectors(n, dim, ...)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrodb.atomic import file_record, publish, tmp_path_for  # noqa: E402
from retrodb.database import Database  # noqa: E402
from retrodb.embedder import HashEmbedder  # noqa: E402
from retrodb.readers import Document  # noqa: E402
from retrodb.segment import SegmentWriter  # noqa: E402
from retrodb.snapshot import Segment, segment_name  # noqa: E402
from retrodb.tokenizer import ChunkedBatch  # noqa: E402

CHUNK_TOKENS = 64
WORDS_PER_CHUNK = 12  # chunk text length (~80 characters); tokens are random ids, not this text's
DOCS_PER_BATCH = 256  # one Parquet row group per batch, ~4k chunks: about what ingest writes
NOISE = 1.0  # norm of a key's offset from its centre, before normalising (1.0 = the centre's norm)


def centres(dim: int, clusters: int, seed: int) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, centre_rows: np.ndarray, noise: float = NOISE) -> np.ndarray:
    """Unit vectors around the given centres (one row each)."""
    n, dim = centre_rows.shape
    x = centre_rows + rng.standard_normal((n, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def query_vectors(n: int, dim: int, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """Queries from the same distribution as the keys of `build(..., seed=seed)`, but not in it."""
    c = centres(dim, clusters, seed)
    rng = np.random.default_rng(seed + 10_000)
    return clustered(rng, c[rng.integers(0, clusters, n)])


def _vocabulary(rng: np.random.Generator, size: int = 4096) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, size)
    return np.array(["".join(rng.choice(letters, n)) for n in lengths], dtype=object)


def _segment(root: Path, number: int, chunks: int, chunks_per_doc: int, dim: int, token_type: str,
             cent: np.ndarray, vocab: np.ndarray, rng: np.random.Generator) -> dict:
    directory = root / "segments" / segment_name(number)
    writer = SegmentWriter(root, directory, number, token_type)
    keys_final = directory / f"keys-synthetic-{dim}.npy"
    keys_tmp = tmp_path_for(keys_final)
    small = chunks * dim * 2 <= 32 << 20  # a small segment's keys are built in memory (no msync per segment)
    keys = np.empty((chunks, dim), np.float16) if small else \
        np.lib.format.open_memmap(keys_tmp, mode="w+", dtype=np.float16, shape=(chunks, dim))
    done = 0
    doc_no = 0
    while done < chunks:
        sizes = []
        while len(sizes) < DOCS_PER_BATCH and done + sum(sizes) < chunks:
            sizes.append(min(chunks_per_doc, chunks - done - sum(sizes)))
        m = sum(sizes)
        words = vocab[rng.integers(0, len(vocab), (m, WORDS_PER_CHUNK))]
        chunk_texts = [" ".join(row) for row in words]
        docs, starts, ends = [], np.empty(m, np.int64), np.empty(m, np.int64)
        c = 0
        for n in sizes:
            pos = 0
            for j in range(n):
                starts[c + j] = pos
                pos += len(chunk_texts[c + j])
                ends[c + j] = pos
                pos += 1  # the space between chunks
            docs.append(Document(f"syn-{number}-{doc_no}", " ".join(chunk_texts[c: c + n]),
                                 f"synthetic:{number}:{doc_no}"))
            doc_no += 1
            c += n
        sizes_a = np.array(sizes, dtype=np.int64)
        batch = ChunkedBatch(
            tokens=rng.integers(1000, 30000, m * CHUNK_TOKENS).astype(np.uint32),
            doc_token_counts=sizes_a * CHUNK_TOKENS,
            chunk_token_starts=np.arange(m, dtype=np.int64) * CHUNK_TOKENS,
            chunk_token_counts=np.full(m, CHUNK_TOKENS, dtype=np.int64),
            chunk_doc=np.repeat(np.arange(len(sizes)), sizes_a),
            chunk_position=np.concatenate([np.arange(n) for n in sizes]),
            chunk_char_start=starts, chunk_char_end=ends,
        )
        writer.write(docs, batch)
        doc_cluster = rng.integers(0, len(cent), len(sizes))
        keys[done: done + m] = clustered(rng, cent[np.repeat(doc_cluster, sizes_a)]).astype(np.float16)
        done += m
    if small:
        with open(keys_tmp, "wb") as f:
            np.save(f, keys)
    else:
        keys.flush()
    del keys
    files = writer.close()
    publish(keys_tmp, keys_final)
    files["keys"] = file_record(root, keys_final)
    return {"documents": writer.documents, "chunks": writer.chunks, "tokens": writer.tokens, "files": files}


def build(root: str | Path, chunks: int, *, segments: int = 1, dim: int = 128, clusters: int = 1000,
          chunks_per_doc: int = 16, seed: int = 0, index: bool = False, threads: int | None = None,
          log=print, fsync: bool = True) -> dict:
    """Create a database at `root` with `chunks` chunks in `segments` equal segments; returns timings (s).
    `fsync=False` skips the fsyncs of the writes (a throwaway benchmark database of 10^5 tiny segments is
    built in minutes instead of an hour; nothing it measures is written that way)."""
    if not fsync:
        from unittest import mock

        import retrodb.atomic as atomic

        with mock.patch.object(atomic, "fsync_file", lambda p: None), mock.patch.object(atomic, "fsync_dir",
                                                                                          lambda p: None):
            return build(root, chunks, segments=segments, dim=dim, clusters=clusters, chunks_per_doc=chunks_per_doc,
                         seed=seed, index=index, threads=threads, log=log)
    root = Path(root)
    t0 = time.perf_counter()
    db = Database.create(root)
    rng = np.random.default_rng(seed + 1)
    cent = centres(dim, clusters, seed)
    vocab = _vocabulary(rng)
    per = [chunks // segments + (i < chunks % segments) for i in range(segments)]
    with db.writer("synthetic") as w:
        edit = w.edit("synthetic")
        edit.config["embedder"] = HashEmbedder(dim).identity()
        first = edit.next_segment
        for i, n in enumerate(per):
            edit.put(Segment.from_json(first + i, _segment(
                root, first + i, n, chunks_per_doc, dim, edit.config["tokenizer"]["token_type"], cent, vocab, rng)))
            log(f"  segment {i + 1}/{segments}: {n:,} chunks ({time.perf_counter() - t0:.0f}s)")
        w.commit(edit)
    timings = {"write_s": time.perf_counter() - t0}
    if index:
        from retrodb.index import index as run_index

        t1 = time.perf_counter()
        report = run_index(root, threads=threads)
        timings["index_s"] = time.perf_counter() - t1
        timings["keys_per_s"] = report.chunks / timings["index_s"]
    return timings


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("db", type=Path)
    p.add_argument("--chunks", type=int, required=True)
    p.add_argument("--segments", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--chunks-per-doc", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", action="store_true", help="also build the HNSW indexes (retrodb index)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    timings = build(a.db, a.chunks, segments=a.segments, dim=a.dim, clusters=a.clusters,
                    chunks_per_doc=a.chunks_per_doc, seed=a.seed, index=a.index, threads=a.threads)
    print({k: round(v, 1) for k, v in timings.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
