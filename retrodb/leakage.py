"""`retrodb leakage`: how much of an evaluation text the database already holds (RETRO paper, section 2.6).

Each evaluation text is cut into chunks of the database's chunk size with the database's
LM tokenizer (the same cut as ingest), each chunk's `k` (default 10) nearest database
chunks are retrieved with the database's embedder and index, and r(C), the longest
token run C shares with any retrieved [N, F] over the tokens in C, is computed
(retrodb/overlap.py). The report gives, per file and overall, the chunks in each r
bucket, the share of evaluation bytes in chunks with r > 0.5, and the most leaked
chunks with the database documents they leak from. `retrodb eval` (the model) reads the
per-chunk r to report bits-per-byte restricted to chunks with r <= alpha.

With `dedup`, the paper's near-duplicate rule is applied as well: database documents
whose 13-gram (LM token) sets have Jaccard similarity >= 0.8 with an evaluation text,
found with MinHash LSH (datasketch, 128 permutations) and confirmed exactly, are listed
and can be written one id per line for `retrodb delete --ids-file`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import overlap
from .errors import RetrodbError

DEFAULT_K = 10
QUERY_BATCH = 256  # evaluation chunks embedded and searched per call
SHINGLE = 13  # tokens per n-gram for the near-duplicate rule
JACCARD = 0.8
NUM_PERM = 128
TOP = 10  # most leaked chunks listed


@dataclass
class ChunkLeak:
    """r(C) of one evaluation chunk."""

    file: str  # the evaluation text: its file (file:line for JSONL, file#row for Parquet)
    position: int  # chunk index within the text
    r: float
    doc_id: str | None  # the database document of the neighbour with the longest run (None: no run)
    chunk_id: int | None  # that neighbour's chunk id
    run: int  # the run's length in tokens
    tokens: int  # tokens in the chunk
    char_start: int  # the chunk's character span in the evaluation text
    char_end: int
    bytes: int  # UTF-8 bytes of the chunk's span

    def to_dict(self) -> dict:
        return {"file": self.file, "position": self.position, "r": round(self.r, 6), "doc_id": self.doc_id,
                "chunk_id": self.chunk_id, "run": self.run, "tokens": self.tokens}


@dataclass
class Duplicate:
    doc_id: str  # database document
    file: str  # the evaluation text it nearly duplicates
    jaccard: float  # exact Jaccard similarity of their 13-gram sets

    def to_dict(self) -> dict:
        return {"doc_id": self.doc_id, "file": self.file, "jaccard": round(self.jaccard, 4)}


@dataclass
class LeakageReport:
    version: int
    k: int
    chunks: list[ChunkLeak] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict, repr=False)  # file -> text (for showing snippets)
    duplicates: list[Duplicate] | None = None
    issues: list[str] = field(default_factory=list)  # evaluation inputs skipped (bad input)
    seconds: float = 0.0

    def summary(self, top: int = TOP) -> dict:
        files = {}
        for c in self.chunks:
            files.setdefault(c.file, []).append(c)
        out = {"version": self.version, "k": self.k, "overall": _stats(self.chunks),
               "files": {f: _stats(cs) for f, cs in files.items()},
               "most_leaked": [c.to_dict() for c in self.most_leaked(top)],
               "issues": self.issues, "seconds": round(self.seconds, 3)}
        if self.duplicates is not None:
            out["duplicates"] = [d.to_dict() for d in self.duplicates]
        return out

    def most_leaked(self, top: int = TOP) -> list[ChunkLeak]:
        leaked = [c for c in self.chunks if c.run > 0]
        return sorted(leaked, key=lambda c: (-c.r, -c.run, c.file, c.position))[:top]


def _stats(chunks: list[ChunkLeak]) -> dict:
    buckets = {label: 0 for _, label in overlap.BUCKETS}
    for c in chunks:
        buckets[overlap.bucket(c.r)] += 1
    total = sum(c.bytes for c in chunks)
    leaked = sum(c.bytes for c in chunks if c.r > 0.5)
    return {"chunks": len(chunks), "buckets": buckets, "bytes": total,
            "bytes_r_above_half": leaked, "share_bytes_r_above_half": round(leaked / total, 6) if total else 0.0,
            "mean_r": round(float(np.mean([c.r for c in chunks])), 6) if chunks else 0.0}


def read_texts(sources: list[str], text_field: str = "text") -> tuple[list[tuple[str, str]], list[str]]:
    """(label, text) of every evaluation text in `sources` (files/folders of .txt/.md, JSONL, Parquet), and the
    inputs skipped, as 'where: why'."""
    from .readers import Document, ReadOptions, plan_pieces, read_unit, unit

    if not sources:
        raise RetrodbError("no evaluation text given", hint="retrodb leakage DB FILE...")
    pieces, issues = plan_pieces(sources, "auto", 1 << 30, ReadOptions(text_field=text_field))
    texts, skipped = [], [f"{i.where}: {i.message}" for i in issues]
    for item in read_unit(unit(0, pieces), ReadOptions(text_field=text_field)):
        if isinstance(item, Document):
            texts.append((item.source, item.text))
        else:
            skipped.append(f"{item.where}: {item.message}")
    if not texts:
        raise RetrodbError("no evaluation text could be read" + (f" ({skipped[0]})" if skipped else ""))
    return texts, skipped


def chunked(db, text: str):
    """One text cut as ingest cuts it: the database's LM tokenizer, its chunk size (a ChunkedBatch)."""
    from .tokenizer import chunk_batch, load_tokenizer

    return chunk_batch(load_tokenizer(db.config["tokenizer"]["path"]), [text], db.config["chunk_size"])


def text_leakage(db, label: str, text: str, k: int = DEFAULT_K, ef: int = 64, progress=None,
                 batch=None) -> list[ChunkLeak]:
    """r(C) of every chunk of one evaluation text against the database `db` (a `retrodb.Database`);
    `batch`: the text's `chunked(db, text)`, if already made."""
    b = batch if batch is not None else chunked(db, text)
    out: list[ChunkLeak] = []
    n = len(b.chunk_position)
    for start in range(0, n, QUERY_BATCH):
        idx = list(range(start, min(n, start + QUERY_BATCH)))
        spans = [(int(b.chunk_char_start[i]), int(b.chunk_char_end[i])) for i in idx]
        results = db.query([text[a:e] for a, e in spans], k, ef=ef)  # a chunk span always holds a token
        for i, (a, e), res in zip(idx, spans, results):
            toks = b.tokens[b.chunk_token_starts[i]: b.chunk_token_starts[i] + b.chunk_token_counts[i]]
            retrieved = [list(nb.tokens) + list(nb.continuation_tokens) for nb in res.neighbours]
            r, which, run = overlap.ratio(toks, retrieved)
            best = res.neighbours[which] if which >= 0 else None
            out.append(ChunkLeak(label, int(b.chunk_position[i]), r, best.doc_id if best else None,
                                 best.chunk_id if best else None, run.length, len(toks), a, e,
                                 len(text[a:e].encode("utf-8"))))
        if progress is not None:
            progress({"chunks": len(idx), "advance": len(idx)})
    return out


def leakage(root, sources: list[str], *, k: int = DEFAULT_K, ef: int = 64, dedup: bool = False,
            at: int | None = None, text_field: str = "text", progress=None) -> LeakageReport:
    """The leakage report of the evaluation texts in `sources` against the database at `root` (read-only)."""
    from .database import open as open_db

    if k < 1:
        raise RetrodbError(f"--k must be at least 1, not {k}")
    started = time.perf_counter()
    db = open_db(root, at)
    texts, skipped = read_texts(sources, text_field)
    report = LeakageReport(db.version, k, issues=skipped)
    batches = [chunked(db, text) for _, text in texts]
    if progress is not None:
        progress({"total": sum(len(b.chunk_position) for b in batches)})
    for (label, text), b in zip(texts, batches):
        report.texts[label] = text
        report.chunks.extend(text_leakage(db, label, text, k, ef, progress, batch=b))
    if dedup:
        report.duplicates = near_duplicates(db, texts)
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------- near-duplicate documents


def shingles(tokens: np.ndarray, n: int = SHINGLE) -> set[bytes]:
    """The set of n-grams of a token sequence, as bytes (a sequence shorter than n is one shingle)."""
    t = np.ascontiguousarray(np.asarray(tokens, dtype=np.uint32))
    if len(t) <= n:
        return {t.tobytes()} if len(t) else set()
    view = np.lib.stride_tricks.sliding_window_view(t, n)
    return set(map(bytes, view))


def _minhash(shingle_set: set[bytes]):
    from datasketch import MinHash

    mh = MinHash(num_perm=NUM_PERM, seed=1)
    mh.update_batch(list(shingle_set))
    return mh


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _documents_tokens(db):
    """(doc_id, token array) of every live document of the snapshot, streamed segment by segment."""
    import pyarrow.parquet as pq

    from . import tombstones

    for name, seg in sorted(db.snapshot.segments.items()):
        gone = tombstones.deleted_doc_ids(db.root, seg)
        pf = pq.ParquetFile(db.root / seg["files"]["chunks"]["path"])
        current, parts = None, []
        for batch in pf.iter_batches(batch_size=1 << 14, columns=["doc_id", "tokens"]):
            ids = batch.column(0).to_pylist()
            col = batch.column(1)
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy()
            for i, d in enumerate(ids):
                if d != current:
                    if current is not None and current not in gone:
                        yield current, np.concatenate(parts)
                    current, parts = d, []
                parts.append(values[offsets[i]: offsets[i + 1]])
        if current is not None and current not in gone:
            yield current, np.concatenate(parts)


def near_duplicates(db, texts: list[tuple[str, str]], threshold: float = JACCARD) -> list[Duplicate]:
    """Database documents whose 13-gram Jaccard similarity with an evaluation text is >= threshold (MinHash LSH
    for candidates, then exact Jaccard), best first."""
    from datasketch import MinHashLSH

    from .tokenizer import load_tokenizer

    tok = load_tokenizer(db.config["tokenizer"]["path"])
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    evals = {}
    for i, (label, text) in enumerate(texts):
        s = shingles(np.asarray(tok.encode(text, add_special_tokens=False).ids))
        if s:
            evals[str(i)] = (label, s)
            lsh.insert(str(i), _minhash(s))
    out = []
    for doc_id, tokens in _documents_tokens(db):
        s = shingles(tokens)
        if not s:
            continue
        for key in lsh.query(_minhash(s)):
            label, es = evals[key]
            j = jaccard(s, es)
            if j >= threshold:
                out.append(Duplicate(doc_id, label, j))
    return sorted(out, key=lambda d: (-d.jaccard, d.doc_id, d.file))


def write_ids(path: str | Path, duplicates: list[Duplicate]) -> int:
    """Write the duplicates' document ids, one per line, atomically (for `retrodb delete --ids-file`)."""
    from .atomic import atomic_write_bytes

    ids = sorted({d.doc_id for d in duplicates})
    if any("\n" in i or "\r" in i for i in ids):
        raise RetrodbError("a document id holds a line break, so it cannot be written one per line",
                           hint="delete it with: retrodb delete DB --where \"doc_id = '...'\"")
    atomic_write_bytes(Path(path), "".join(i + "\n" for i in ids).encode("utf-8"))
    return len(ids)
