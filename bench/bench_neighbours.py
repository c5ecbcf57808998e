"""Training neighbours and the dataset: recall against exact search, speed against bare hnswlib, scaling, memory.

    python bench/bench_neighbours.py                   # everything (~10 min on 2 busy cores)
    python bench/bench_neighbours.py --only quality    # one part: quality, segments, workers, memory
    python bench/bench_neighbours.py --chunks 100000   # a bigger database for the quality part

Parts (each prints a Markdown table):
- real: the demo corpus (Python's documentation topics) and the standard library's docstrings,
  embedded with the bundled MiniLM: speed against bare knn_query and recall, as below, on real text
  (documents of very different lengths; long ones make the own-document exclusion search deeper).
- quality: a synthetic database (bench/synthetic.py: clustered float16 keys, a document's 16 chunks
  share a cluster, so a chunk's nearest keys are mostly its own document's and the exclusion is
  exercised hard), HNSW indexes at the defaults (M=32, ef_construction=200). `retrodb neighbours`
  end to end (k=2, margin 4) against bare hnswlib `knn_query` of the same keys over the same
  per-segment indexes with the same k (the margin, 4) and ef, in the same run; recall@2 and
  recall@4 of the stored neighbours against exact search over other documents (a neighbour
  counts when it scores as high as the exact k-th: duplicate keys tie); same-document rows.
  Speeds are medians of 3 alternating pairs (bare, then ours) on the same keys: `retrodb
  neighbours` is timed end to end (loading the indexes, searching, writing, committing), bare
  knn_query only its search calls.
- segments: the same keys in 1, 2, 4 and 8 segments (every chunk searches every segment).
- workers: processes x search threads on one database.
- memory: peak RSS of a fresh process iterating 2,000 items of RetroIterableDataset and reading
  2,000 random items of RetroDataset, on databases of growing size.

Databases are kept under bench/out/ and reused by later runs (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import retrodb  # noqa: E402
from retrodb.executor import default_workers  # noqa: E402
from retrodb.neighbours import compute_neighbours  # noqa: E402

OUT = ROOT / "bench" / "out"
K = 2
MARGIN = 4
EF = 64
DIM = 128


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def synthetic_db(name: str, chunks: int, segments: int, dim: int = DIM, index_params: dict | None = None) -> Path:
    from synthetic import build

    db = OUT / name
    if (db / "CURRENT").exists() and retrodb.open(db).config.get("index"):
        return db
    shutil.rmtree(db, ignore_errors=True)
    build(db, chunks, segments=segments, dim=dim, log=lambda *a: None)
    from retrodb.index import index

    index(db, **(index_params or {}))
    return db


def bare_hnswlib(db: Path, k: int, ef: int, threads: int) -> float:
    """Seconds for hnswlib knn_query of every key against every segment's index (k, ef, threads), nothing else."""
    import hnswlib

    from retrodb.stages.index import open_keys

    snap = retrodb.open(db).snapshot
    dim = snap.config["embedder"]["dim"]
    indexes, keys = [], []
    for seg in snap.segments.values():
        idx = hnswlib.Index(space="cosine", dim=dim)
        idx.load_index(str(db / seg.files["index"]["path"]))
        idx.set_ef(ef)
        indexes.append(idx)
        keys.append(np.asarray(open_keys(db, seg.files), dtype=np.float32))
    t = time.perf_counter()
    for q in keys:
        for start in range(0, len(q), 4096):
            for idx in indexes:
                idx.knn_query(q[start: start + 4096], k=min(k, idx.get_current_count()), num_threads=threads)
    return time.perf_counter() - t


def ours(db: Path, k: int = K, ef: int = EF, workers: int = 1, threads: int | None = None) -> tuple[float, int, Path]:
    """`retrodb neighbours` end to end (load, search, write, commit) on a fresh copy of `db` (timed: the run only);
    returns (seconds, chunks, the copy)."""
    run = OUT / f"{db.name}-run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(db, run)
    t = time.perf_counter()
    report = compute_neighbours(run, k, ef=ef, workers=workers, threads=threads)
    return time.perf_counter() - t, report.chunks, run


def paired(db: Path, ef: int, threads: int, reps: int = 3) -> tuple[float, float, Path]:
    """Median chunks/s of `retrodb neighbours` (end to end) and of bare knn_query, measured alternately `reps`
    times (a busy machine's load moves between runs; the median of pairs is what we compare)."""
    import statistics

    ours_rate, bare_rate = [], []
    for _ in range(reps):
        bare = bare_hnswlib(db, MARGIN, max(ef, MARGIN), threads)
        mine, n, run = ours(db, K, ef, threads=threads)
        bare_rate.append(n / bare)
        ours_rate.append(n / mine)
    return statistics.median(ours_rate), statistics.median(bare_rate), run


def exact_recall(db: Path, sample: int = 2000, seed: int = 0) -> dict:
    """recall@K and recall@MARGIN of the stored neighbours against exact search over other documents."""
    import pyarrow.parquet as pq

    handle = retrodb.open(db)
    ids, docs, keys = [], [], []
    for name, seg in sorted(handle.snapshot.segments.items()):
        t = pq.read_table(db / seg.files["chunks"]["path"], columns=["chunk_id", "doc_id"])
        ids.append(t["chunk_id"].to_numpy())
        docs.append(np.asarray(t["doc_id"].to_pylist(), dtype=object))
        keys.append(np.load(db / seg.files["keys"]["path"]).astype(np.float32))
    ids, docs, keys = np.concatenate(ids), np.concatenate(docs), np.concatenate(keys)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    row_of = {int(c): i for i, c in enumerate(ids)}
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ids), size=min(sample, len(ids)), replace=False)
    stored = {}
    want = ",".join(str(int(ids[i])) for i in pick)
    for r in handle.sql(f"SELECT chunk_id, rank, neighbour_chunk_id FROM neighbours WHERE chunk_id IN ({want}) "
                        "ORDER BY chunk_id, rank").to_pylist():
        stored.setdefault(r["chunk_id"], []).append(r["neighbour_chunk_id"])
    hits = {K: 0, MARGIN: 0}
    for i in pick:
        s = keys @ keys[i]
        s[docs == docs[i]] = -np.inf
        top = np.sort(s)[::-1]
        got = stored.get(int(ids[i]), [])
        for k in (K, MARGIN):
            kth = top[k - 1]
            hits[k] += sum(1 for n in got[:k] if s[row_of[n]] >= kth - 1e-6)
    same = handle.sql("SELECT count(*) FROM neighbours n JOIN chunks a USING (chunk_id) JOIN chunks b "
                      "ON b.chunk_id = n.neighbour_chunk_id WHERE a.doc_id = b.doc_id").column(0)[0].as_py()
    return {"recall@2": hits[K] / (K * len(pick)), "recall@4": hits[MARGIN] / (MARGIN * len(pick)),
            "same_doc_rows": same, "sampled": len(pick)}


def bench_quality(chunks: int) -> str:
    threads = default_workers()
    db = synthetic_db(f"nb-quality-{chunks}", chunks, 4)
    rows = []
    for ef in (32, 64, 128):
        mine, bare, run = paired(db, ef, threads)
        q = exact_recall(run)
        rows.append([ef, f"{mine:,.0f}", f"{bare:,.0f}", f"{mine / bare:.2f}", f"{q['recall@2']:.4f}",
                     f"{q['recall@4']:.4f}", q["same_doc_rows"]])
    return (f"### Quality and speed: {chunks:,} chunks, 4 segments, dim {DIM}, {threads} threads\n\n"
            + table(["ef", "neighbours chunks/s", "bare knn_query chunks/s", "ratio", "recall@2", "recall@4",
                     "same-doc rows"], rows))


def bench_real() -> str:
    """Recall on real text: the demo corpus (Python's documentation topics) and the standard library's
    docstrings (as bench_query.py builds them), with the bundled MiniLM keys."""
    from bench_query import stdlib_docstrings

    from retrodb.demo_corpus import write_demo_corpus
    from retrodb.embed import embed
    from retrodb.index import index
    from retrodb.ingest import IngestOptions, ingest

    db = OUT / "nb-real-stdlib"
    if not ((db / "CURRENT").exists() and retrodb.open(db).config.get("index")):
        shutil.rmtree(db, ignore_errors=True)
        corpus = OUT / "nb-real-corpus"
        shutil.rmtree(corpus, ignore_errors=True)
        write_demo_corpus(corpus / "demo")
        stdlib_docstrings(corpus / "stdlib")
        ingest(db, [str(corpus)], IngestOptions(workers=2, segment_bytes=1_000_000))
        embed(db)
        index(db)
    threads = default_workers()
    rows = []
    for ef in (16, 32, 64):
        mine, bare, run = paired(db, ef, threads)
        q = exact_recall(run, sample=2000)
        rows.append([ef, f"{mine:,.0f}", f"{bare:,.0f}", f"{mine / bare:.2f}", f"{q['recall@2']:.4f}",
                     f"{q['recall@4']:.4f}", q["same_doc_rows"]])
    snap = retrodb.open(db).snapshot
    return (f"### Real text: demo corpus + stdlib docstrings, {snap.totals()['chunks']:,} chunks in "
            f"{len(snap.segments)} segments, "
            f"MiniLM keys (dim 384), {threads} threads\n\n"
            + table(["ef", "neighbours chunks/s", "bare knn_query chunks/s", "ratio", "recall@2", "recall@4",
                     "same-doc rows"], rows))


def bench_segments(chunks: int) -> str:
    threads = default_workers()
    rows = []
    for segments in (1, 2, 4, 8):
        db = synthetic_db(f"nb-seg-{chunks}-{segments}", chunks, segments)
        mine, bare, _ = paired(db, EF, threads)
        rows.append([segments, f"{mine:,.0f}", f"{bare:,.0f}", f"{mine / bare:.2f}"])
    return (f"### Segments: {chunks:,} chunks, ef {EF}, {threads} threads\n\n"
            + table(["segments", "neighbours chunks/s", "bare knn_query chunks/s", "ratio"], rows))


def bench_workers(chunks: int) -> str:
    db = synthetic_db(f"nb-seg-{chunks}-8", chunks, 8)
    import statistics

    cores = default_workers()
    configs = sorted({(1, 1), (1, cores), (cores, 1), (2, max(1, cores // 2))})
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(3):  # alternating, so that the machine's load moves over every configuration alike
        for workers, threads in configs:
            mine, n, _ = ours(db, K, EF, workers=workers, threads=threads)
            rates[(workers, threads)].append(n / mine)
    rows = [[w, t, f"{statistics.median(rates[(w, t)]):,.0f}"] for w, t in configs]
    return (f"### Workers: {chunks:,} chunks in 8 segments, ef {EF} ({cores} cores), medians of 3\n\n"
            + table(["processes", "threads each", "chunks/s"], rows))


MEMORY = r"""
import json, resource, sys, time
import numpy as np
from retrodb.data import RetroDataset, RetroIterableDataset
db, mode, cache = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "iterable":
    n = 0
    for item in RetroIterableDataset(db, seq_len=512, k=2, cache_groups=cache):
        n += 1
        if n == 2000:
            break
else:
    ds = RetroDataset(db, seq_len=512, k=2, cache_groups=cache)
    for i in np.random.default_rng(0).integers(0, len(ds), 2000):
        ds[int(i)]
    n = 2000
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "import_mb": base / 1024, "items_per_s": n / (time.perf_counter() - t)}))
"""


def bench_memory(sizes: list[int]) -> str:
    rows = []
    for chunks in sizes:
        db = synthetic_db(f"nb-mem-{chunks}", chunks, max(1, chunks // 50_000), dim=32,
                          index_params={"M": 16, "ef_construction": 100})
        if not retrodb.open(db).config.get("neighbours"):
            compute_neighbours(db, 2, ef=32)
        for cache in (16, 128):
            row = [f"{chunks:,}", len(retrodb.open(db).snapshot.segments), cache]
            for mode in ("iterable", "map"):
                out = subprocess.run([sys.executable, "-c", MEMORY, str(db), mode, str(cache)], capture_output=True,
                                     text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                     check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                row += [f"{r['peak_mb']:.0f}", f"{r['items_per_s']:,.0f}"]
            rows.append(row)
    return ("### Dataset memory: peak RSS of a fresh process reading 2,000 items (seq_len 512, k 2), by the\n"
            "number of decoded row groups cached (`cache_groups`; 128 is the default)\n\n"
            + table(["chunks", "segments", "cache groups", "iterable peak MB", "iterable items/s",
                     "map-style peak MB", "map-style items/s"], rows))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["real", "quality", "segments", "workers", "memory"], action="append")
    p.add_argument("--chunks", type=int, default=50_000)
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[25_000, 100_000, 400_000])
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    parts = a.only or ["real", "quality", "segments", "workers", "memory"]
    load = os.getloadavg()[0]
    print(f"machine: {default_workers()} cores, load average {load:.1f} at start"
          + (" (busy: figures provisional)" if load > default_workers() / 2 else ""))
    for part in parts:
        t = time.perf_counter()
        if part == "real":
            print(bench_real())
        elif part == "quality":
            print(bench_quality(a.chunks))
        elif part == "segments":
            print(bench_segments(a.chunks))
        elif part == "workers":
            print(bench_workers(a.chunks))
        else:
            print(bench_memory(a.memory_sizes))
        print(f"\n({part}: {time.perf_counter() - t:.0f}s, load average {os.getloadavg()[0]:.1f})\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
