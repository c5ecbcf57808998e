"""Edit benchmark: add one document, delete one document, compact one segment, against a full rebuild.

For each database size (default 100k and 1M chunks) it writes a synthetic
JSONL corpus (documents of ~16 chunks of made-up words), builds the database
with the real pipeline (ingest, embed with the hash embedder, HNSW index)
and times that as the full rebuild. Then, on that database, it times (median
of `--repeats`) the three edits through the library functions the CLI calls:

- add: one new document of ~16 chunks (ingest + embed + index + one commit);
- delete: one document by id (plan + tombstones + one commit);
- compact: one segment with 25% of its documents deleted (rewrite without
  them, keys carried over, index rebuilt for the new segment, one commit).

Segments have the same size at every database size, so an edit that costs
what it touches shows the same time at 100k and 1M chunks.

    python bench/bench_edits.py [--sizes 100000 1000000] [--repeats 5] [--segment-chunks 25000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import retrodb  # noqa: E402
from retrodb.add import add  # noqa: E402
from retrodb.compact import compact  # noqa: E402
from retrodb.delete import delete  # noqa: E402
from retrodb.embed import embed  # noqa: E402
from retrodb.index import index  # noqa: E402
from retrodb.ingest import IngestOptions, ingest  # noqa: E402
from retrodb.verify import verify  # noqa: E402

EMBEDDER = "hash:64"
INDEX_PARAMS = {"M": 16, "ef_construction": 100}
CHUNKS_PER_DOC = 16
SEGMENT_CHUNKS = 25_000  # chunks per segment (default), the same at every size
SYLLABLES = "ka lo mi ne ru ta vo si de po gu fa ze bi ho".split()


def vocabulary(seed: int = 0, size: int = 3000) -> list[str]:
    r = random.Random(seed)
    return sorted({"".join(r.choice(SYLLABLES) for _ in range(r.randint(1, 3))) for _ in range(size * 4)})[:size]


def doc_text(r: random.Random, vocab: list[str], words: int) -> str:
    return " ".join(r.choices(vocab, k=words)) + "."


def calibrate(vocab: list[str]) -> tuple[int, int]:
    """(words per document for ~CHUNKS_PER_DOC chunks, bytes of JSONL per chunk)."""
    from retrodb.tokenizer import chunk_batch, default_model_dir, load_tokenizer

    tok = load_tokenizer(str(default_model_dir()))
    r = random.Random(1)
    sample = [doc_text(r, vocab, 1000) for _ in range(20)]
    tokens_per_word = sum(chunk_batch(tok, sample, 64).doc_token_counts) / 20_000
    words = int(CHUNKS_PER_DOC * 64 / tokens_per_word)
    line = json.dumps({"id": "d0000000", "text": doc_text(r, vocab, words)}) + "\n"
    return words, len(line) // CHUNKS_PER_DOC


def write_corpus(path: Path, chunks: int, vocab: list[str], words: int, seed: int) -> int:
    r = random.Random(seed)
    n_docs = chunks // CHUNKS_PER_DOC
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"d{i:07d}", "text": doc_text(r, vocab, words)}) + "\n")
    return n_docs


def timed(fn, *args, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def build(root: Path, corpus: Path, segment_bytes: int) -> dict:
    """The full rebuild: every stage over the whole corpus, timed."""
    t_ingest, _ = timed(ingest, root, [str(corpus)], IngestOptions(workers=2, segment_bytes=segment_bytes))
    t_embed, _ = timed(embed, root, EMBEDDER)
    t_index, _ = timed(index, root, threads=2, **INDEX_PARAMS)
    s = retrodb.open(root).stats()
    return {"chunks": s["chunks"], "documents": s["documents"], "segments": s["segments"], "bytes": s["bytes"],
            "ingest": t_ingest, "embed": t_embed, "index": t_index, "rebuild": t_ingest + t_embed + t_index}


def time_edits(root: Path, work: Path, vocab: list[str], words: int, repeats: int, seed: int,
               segment_chunks: int) -> dict:
    r = random.Random(seed)
    out: dict[str, list[float]] = {"add": [], "delete": [], "compact": [], "compact_chunks": []}
    for i in range(repeats):
        src = work / f"add-{i}.jsonl"
        src.write_text(json.dumps({"id": f"new-{i}", "text": doc_text(r, vocab, words)}) + "\n")
        t, report = timed(add, root, [str(src)], IngestOptions(workers=1))
        assert report.ingest.documents == 1 and report.indexed_segments == 1
        out["add"].append(t)
    n_docs = retrodb.open(root).stats()["documents"]
    for i in range(repeats):
        t, report = timed(delete, root, doc_ids=[f"d{r.randrange(n_docs - repeats):07d}"])
        assert report.documents == 1
        out["delete"].append(t)
    full = [s for _, s in sorted(retrodb.open(root).snapshot.segments.items()) if s.chunks >= segment_chunks * 0.8]
    for seg in full[:repeats]:  # a different full-size segment each time
        delete(root, where=f"segment = '{seg.name}' AND hash(doc_id) % 4 = 0")  # setup, not timed
        t, report = timed(compact, root, 0.2, 0, workers=1)
        assert len(report.groups) == 1 and report.groups[0].sources == [seg.number]
        out["compact"].append(t)
        out["compact_chunks"].append(report.chunks_rewritten)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--segment-chunks", type=int, default=SEGMENT_CHUNKS)
    ap.add_argument("--keep", action="store_true", help="keep the databases")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="retrodb-bench-edits-"))
    work.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    words, bytes_per_chunk = calibrate(vocab)
    rows = []
    for size in args.sizes:
        root = work / f"db-{size}"
        shutil.rmtree(root, ignore_errors=True)
        corpus = work / f"corpus-{size}.jsonl"
        write_corpus(corpus, size, vocab, words, seed=size)
        built = build(root, corpus, args.segment_chunks * bytes_per_chunk)
        print(f"built {size:,}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in built.items()})}",
              file=sys.stderr, flush=True)
        edits = time_edits(root, work, vocab, words, args.repeats, seed=size, segment_chunks=args.segment_chunks)
        print(f"edits {size:,}: {json.dumps(edits)}", file=sys.stderr, flush=True)
        verified = verify(root, quick=True)
        assert verified.ok, [f.message for f in verified.errors]
        rows.append((built, {k: statistics.median(v) for k, v in edits.items()}))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            corpus.unlink(missing_ok=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared); "
          f"embedder {EMBEDDER}, HNSW M={INDEX_PARAMS['M']} ef_construction={INDEX_PARAMS['ef_construction']}, "
          f"{args.segment_chunks:,} chunks per segment; edit times are medians of {args.repeats} runs.\n")
    print("| database | segments | full rebuild (ingest + embed + index) | add 1 doc | delete 1 doc | "
          "compact 1 segment (chunks) |")
    print("|---|---|---|---|---|---|")
    for built, e in rows:
        print(f"| {built['chunks']:,} chunks | {built['segments']} | {built['rebuild']:.1f} s "
              f"({built['ingest']:.1f} + {built['embed']:.1f} + {built['index']:.1f}) | {e['add']:.3f} s | "
              f"{e['delete']:.3f} s | {e['compact']:.2f} s ({int(e['compact_chunks']):,}) |")
    print("\n| database | add / rebuild | delete / rebuild | compact 1 segment / rebuild |")
    print("|---|---|---|---|")
    for built, e in rows:
        rb = built["rebuild"]
        print(f"| {built['chunks']:,} chunks | {e['add'] / rb:.2e} | {e['delete'] / rb:.2e} | "
              f"{e['compact'] / rb:.2e} |")
    if len(rows) > 1:
        (b0, e0), (b1, e1) = rows[0], rows[-1]
        print(f"\nGrowth from {b0['chunks']:,} to {b1['chunks']:,} chunks ({b1['chunks'] / b0['chunks']:.1f}x data): "
              f"rebuild {b1['rebuild'] / b0['rebuild']:.1f}x, add {e1['add'] / e0['add']:.2f}x, "
              f"delete {e1['delete'] / e0['delete']:.2f}x, compact {e1['compact'] / e0['compact']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
