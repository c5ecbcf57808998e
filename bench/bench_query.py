"""Index and query benchmarks: recall against exact search, latency, build rate, segment scaling.

    python bench/bench_query.py                 # everything (~15-20 min on 2 cores, first run)
    python bench/bench_query.py --sizes 100000  # skip the 1M-chunk database
    python bench/bench_query.py --only real     # one part: real, synthetic, segments

Parts (each prints a Markdown table):
- real: recall@10 of the HNSW index against exact search, and latency, for several ef, on
  real text embedded with the bundled MiniLM: the demo corpus plus the docstrings of the
  Python standard library (built offline from the running interpreter's own sources).
  Queries are chunks of the database with their own document excluded, as RETRO trains.
- synthetic: databases of 100k and 1M chunks (bench/synthetic.py, clustered float16 keys):
  index build rate, recall@10 at default settings, p50/p99 latency for k=10, single queries
  and batches, search alone and with the chunk text read back.
- segments: one 100k-chunk key set split into 1..16 segments: latency against segment
  count, serial (1 thread) and parallel (all cores).

Databases are kept under bench/out/ and reused by later runs (delete it to rebuild).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import retrodb  # noqa: E402
from retrodb.query import searcher_for  # noqa: E402

OUT = ROOT / "bench" / "out"
K = 10
EFS = [10, 16, 32, 64, 128, 256]
SYN_DIM = 128
BATCH = 64


# ------------------------------------------------------------------ helpers

def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def recall(approx: list[list[int]], exact: list[list[int]]) -> float:
    hit = sum(len(set(a) & set(e)) for a, e in zip(approx, exact))
    return hit / max(1, sum(len(e) for e in exact))


def timed(fn, *args, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ real text

def stdlib_docstrings(directory: Path) -> int:
    """One text file per standard-library module: its module, class and function docstrings."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc if isinstance(node, ast.Module) else f"{node.name}: {doc}")
        if parts:
            (directory / (str(rel).replace("/", ".") + ".txt")).write_text("\n\n".join(parts), encoding="utf-8")
            n += 1
    return n


def real_db() -> tuple[Path, dict]:
    """demo corpus + stdlib docstrings, embedded with the bundled MiniLM and indexed (kept in bench/out)."""
    from retrodb.demo_corpus import write_demo_corpus
    from retrodb.embed import embed
    from retrodb.index import index
    from retrodb.ingest import IngestOptions, ingest

    db = OUT / "real-db"
    info = {}
    if (db / "CURRENT").exists() and retrodb.open(db).config.get("index"):
        return db, info
    shutil.rmtree(db, ignore_errors=True)
    corpus = OUT / "real-corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    write_demo_corpus(corpus / "demo")
    info["stdlib_modules"] = stdlib_docstrings(corpus / "stdlib")
    info["ingest_s"], _ = timed(ingest, db, [str(corpus)], IngestOptions(workers=2))
    info["embed_s"], rep = timed(embed, db)
    info["embed_model"] = rep.model
    info["index_s"], _ = timed(index, db)
    return db, info


def held_out_queries(n: int) -> list[str]:
    """Real questions-like texts not in the database: the summary lines of NumPy's function docstrings."""
    import numpy

    seen, out = set(), []
    for name in sorted(dir(numpy)):
        doc = getattr(getattr(numpy, name, None), "__doc__", None)
        line = next((x.strip() for x in (doc or "").strip().splitlines() if x.strip()), "")
        if 20 <= len(line) <= 200 and line.endswith(".") and "(" not in line.split(" ")[0] and line not in seen:
            seen.add(line)
            out.append(line)
    return out[:n]


def bench_real(n_queries: int = 300) -> str:
    db_path, info = real_db()
    db = retrodb.open(db_path)
    st = db.stats()
    searcher = searcher_for(db)
    texts = held_out_queries(n_queries)
    embed_s, tq = timed(searcher._embed, texts)
    rng = np.random.default_rng(0)
    all_ids = db.sql("SELECT chunk_id FROM chunks").column(0).to_numpy()
    asked = rng.choice(all_ids, size=min(n_queries, len(all_ids)), replace=False).tolist()
    cq, own, _ = searcher._chunk_keys(asked)
    exact_t = [[c for c, _, _ in row] for row in searcher.search(tq, K, exact=True)]
    exact_c = [[c for c, _, _ in row] for row in searcher.search(cq, K, exact=True, exclusions=own)]
    rows = []
    for ef in EFS:
        got_t = [[c for c, _, _ in row] for row in searcher.search(tq, K, ef=ef)]
        got_c = [[c for c, _, _ in row] for row in searcher.search(cq, K, ef=ef, exclusions=own)]
        search_ms = [timed(searcher.search, tq[i: i + 1], K, ef=ef)[0] * 1e3 for i in range(len(tq))]
        e2e_ms = [timed(db.query, vectors=tq[i: i + 1], k=K, ef=ef)[0] * 1e3 for i in range(min(100, len(tq)))]
        rows.append([ef, f"{recall(got_t, exact_t):.4f}", f"{recall(got_c, exact_c):.4f}",
                     f"{pct(search_ms, 50):.3f} / {pct(search_ms, 99):.3f}", f"{pct(e2e_ms, 50):.2f}"])
    text_ms = [timed(db.query, t, k=K)[0] * 1e3 for t in texts[:50]]
    head = (f"Real text: {st['documents']:,} documents, {st['chunks']:,} chunks in {st['segments']} segment(s) "
            f"(demo corpus + stdlib docstrings), keys from the bundled all-MiniLM-L6-v2 "
            f"(dim {db.config['embedder']['dim']}); index M={db.config['index']['M']}, "
            f"ef_construction={db.config['index']['ef_construction']}, {db.config['index']['space']}; k={K}. "
            f"Text queries: {len(texts)} summary lines of NumPy docstrings (not in the database). "
            f"Chunk queries: {len(asked)} random chunks of the database, own document excluded (RETRO's "
            f"training view; the exclusion over-fetches, so ef matters less there).")
    if info:
        head += (f" Built in this run: ingest {info['ingest_s']:.1f}s, embed {info['embed_s']:.0f}s "
                 f"({st['chunks'] / info['embed_s']:.0f} chunks/s), index {info['index_s']:.1f}s.")
    return (head + "\n\n" + table(["ef", "recall@10 text queries", "recall@10 chunk queries",
                                     "search p50 / p99 ms", "query p50 ms (with text)"], rows)
            + f"\n\nText query end to end, embedding with MiniLM on CPU included: p50 {pct(text_ms, 50):.1f} ms "
              f"(embedding {len(texts)} queries as one batch: {embed_s:.1f}s).")


# ------------------------------------------------------------------ synthetic

def synthetic_db(chunks: int, segments: int, dim: int = SYN_DIM, tag: str = "") -> tuple[Path, dict]:
    from synthetic import build

    path = OUT / f"syn-{chunks}-{segments}-{dim}{tag}"
    if (path / "CURRENT").exists() and retrodb.open(path).config.get("index"):
        return path, {}
    shutil.rmtree(path, ignore_errors=True)
    return path, build(path, chunks, segments=segments, dim=dim, index=True, log=lambda m: None)


def latency_round(db, q: np.ndarray, ef: int = 64, end_to_end: bool = True) -> dict:
    """One pass over the queries: single-query p50/p99, median batch time; optionally with text read back."""
    searcher = searcher_for(db)
    searcher.search(q[:1], K, ef=ef)  # load the indexes
    single = [timed(searcher.search, q[i: i + 1], K, ef=ef)[0] * 1e3 for i in range(len(q))]
    out = {"single_p50": pct(single, 50), "single_p99": pct(single, 99)}
    batches = [timed(searcher.search, q[i: i + BATCH], K, ef=ef)[0] * 1e3 for i in range(0, len(q) - BATCH + 1, BATCH)]
    out["batch_ms"] = statistics.median(batches)
    if end_to_end:
        e2e = [timed(db.query, vectors=q[i: i + 1], k=K, ef=ef)[0] * 1e3 for i in range(min(len(q), 200))]
        out["e2e_p50"], out["e2e_p99"] = pct(e2e, 50), pct(e2e, 99)
        eb = [timed(db.query, vectors=q[i: i + BATCH], k=K, ef=ef)[0] * 1e3 for i in range(0, 4 * BATCH, BATCH)]
        out["e2e_batch_ms"] = statistics.median(eb)
    return out


def median_of(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def latency(db, q: np.ndarray, ef: int = 64, end_to_end: bool = True, rounds: int = 3) -> dict:
    """Median over `rounds` passes of each figure (the machine is shared: one pass can be unlucky)."""
    return median_of([latency_round(db, q, ef, end_to_end) for _ in range(rounds)])


def bench_synthetic(sizes: list[int], n_queries: int = 640) -> str:
    from synthetic import query_vectors

    rows = []
    for chunks in sizes:
        segments = max(1, chunks // 250_000)
        path, t = synthetic_db(chunks, segments)
        db = retrodb.open(path)
        q = query_vectors(n_queries, SYN_DIM)
        exact = [[c for c, _, _ in row] for row in searcher_for(db).search(q[:200], K, exact=True)]
        approx = [[c for c, _, _ in row] for row in searcher_for(db).search(q[:200], K, ef=64)]
        lat = latency(db, q)
        rows.append([f"{chunks:,}", segments, f"{t['write_s']:.0f}" if t else "(kept)",
                     f"{t['index_s']:.0f}" if t else "(kept)", f"{t['keys_per_s']:,.0f}" if t else "(kept)",
                     f"{recall(approx, exact):.4f}", f"{lat['single_p50']:.3f} / {lat['single_p99']:.3f}",
                     f"{lat['batch_ms']:.1f} ({lat['batch_ms'] / BATCH:.3f}/q)",
                     f"{lat['e2e_p50']:.2f} / {lat['e2e_p99']:.2f}",
                     f"{lat['e2e_batch_ms']:.0f} ({lat['e2e_batch_ms'] / BATCH:.2f}/q)"])
    return (f"Synthetic clustered keys, dim {SYN_DIM}, 1000 clusters, M=32, ef_construction=200, ef=64, k={K}, "
            f"segments of 250k chunks; {n_queries} query vectors from the same distribution (not in the database); "
            f"recall@10 against exact search over 200 of them; batches of {BATCH}.\n\n"
            + table(["chunks", "segments", "write s", "index s", "build keys/s", "recall@10",
                     "search p50 / p99 ms", f"search batch of {BATCH} ms", "query p50 / p99 ms (with text)",
                     f"query batch of {BATCH} ms (with text)"], rows))


def bench_segments(chunks: int = 100_000, counts=(1, 2, 4, 8, 16), n_queries: int = 384, rounds: int = 5) -> str:
    from retrodb.executor import default_workers
    from synthetic import query_vectors

    q = query_vectors(n_queries, SYN_DIM)
    rows = []
    cores = default_workers()
    for n in counts:
        path, _ = synthetic_db(chunks, n)
        serial_db, parallel_db = retrodb.open(path), retrodb.open(path)
        searcher_for(serial_db, threads=1)
        searcher_for(parallel_db, threads=cores)
        serial, parallel = [], []
        for _ in range(rounds):  # alternate, so both see the same share of the machine
            serial.append(latency_round(serial_db, q, end_to_end=False))
            parallel.append(latency_round(parallel_db, q, end_to_end=False))
        s, p = median_of(serial), median_of(parallel)
        gains = [a["batch_ms"] / b["batch_ms"] for a, b in zip(serial, parallel)]
        rows.append([n, f"{chunks // n:,}", f"{s['single_p50']:.3f}", f"{p['single_p50']:.3f}",
                     f"{s['single_p50'] / p['single_p50']:.2f}x", f"{s['batch_ms']:.1f}", f"{p['batch_ms']:.1f}",
                     f"{statistics.median(gains):.2f}x ({min(gains):.2f}-{max(gains):.2f})"])
    return (f"{chunks:,} synthetic keys (dim {SYN_DIM}) split into N segments; search only (no text), k={K}, ef=64; "
            f"serial = 1 thread, parallel = {cores} threads (segments searched at once); medians of {rounds} "
            f"alternating rounds of {n_queries} queries.\n\n"
            + table(["segments", "chunks each", "single p50 ms serial", "single p50 ms parallel", "gain",
                     f"batch of {BATCH} ms serial", f"batch of {BATCH} ms parallel", "batch gain (range)"], rows))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--only", choices=["real", "synthetic", "segments"], default=None)
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs (shared), python {sys.version.split()[0]}\n", flush=True)
    if a.only in (None, "real"):
        print("### Recall and latency against ef (real text)\n\n" + bench_real() + "\n", flush=True)
    if a.only in (None, "synthetic"):
        sizes = [int(s) for s in a.sizes.split(",") if s]
        print("### Latency and build rate at scale (synthetic)\n\n" + bench_synthetic(sizes) + "\n", flush=True)
    if a.only in (None, "segments"):
        print("### Latency against segment count\n\n" + bench_segments() + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
