"""Redaction benchmark: redact one document from databases of 100k and 1M chunks, against a full rebuild.

Builds each database with the real pipeline (the edit benchmark's builder: ingest,
hash-embedder keys, HNSW), plants a unique secret in a few documents, then times
(median of `--repeats`):

- redact by id (`--doc-id`): delete, compact the one affected segment, purge old
  snapshots and files, check, audit. Costs what the affected segment holds.
- redact by literal (`--literal`): the same plus the DuckDB scan that finds the
  documents, which reads every segment's text (so it grows with the database).

Afterwards `verify --absent` (a scan of every file) must find nothing.

    python bench/bench_redact.py [--sizes 100000 1000000] [--repeats 3] [--workdir DIR]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench_edits as edits  # noqa: E402

import retrodb  # noqa: E402
from retrodb.absent import scan_absent  # noqa: E402
from retrodb.redact import build_selectors, redact  # noqa: E402


def plant(corpus: Path, secrets: dict[int, str]) -> None:
    """Append a secret to chosen lines of the corpus (documents d<line>)."""
    lines = corpus.read_text().splitlines()
    for i, secret in secrets.items():
        rec = json.loads(lines[i])
        rec["text"] += f" Contact {secret} for access."
        lines[i] = json.dumps(rec)
    corpus.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--segment-chunks", type=int, default=edits.SEGMENT_CHUNKS)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="retrodb-bench-redact-"))
    work.mkdir(parents=True, exist_ok=True)
    vocab = edits.vocabulary()
    words, bytes_per_chunk = edits.calibrate(vocab)
    rows = []
    for size in args.sizes:
        root = work / f"db-{size}"
        shutil.rmtree(root, ignore_errors=True)
        corpus = work / f"corpus-{size}.jsonl"
        n_docs = edits.write_corpus(corpus, size, vocab, words, seed=size)
        r = random.Random(size)
        targets = r.sample(range(n_docs), 2 * args.repeats)
        secrets = {i: f"secret-{size}-{k}@example.org" for k, i in enumerate(targets)}
        plant(corpus, secrets)
        built = edits.build(root, corpus, args.segment_chunks * bytes_per_chunk)
        print(f"built {size:,}: {built}", file=sys.stderr, flush=True)
        by_id, by_literal = [], []
        for k in range(args.repeats):
            t, rep = edits.timed(redact, root, build_selectors(doc_ids=[f"d{targets[k]:07d}"]))
            assert rep.plan["documents"] == 1 and len(rep.compacted_segments) == 1
            by_id.append(t)
        for k in range(args.repeats, 2 * args.repeats):
            t, rep = edits.timed(redact, root, build_selectors(literals=[secrets[targets[k]]]))
            assert rep.plan["documents"] == 1
            by_literal.append(t)
        t_scan, hits = edits.timed(scan_absent, root, list(secrets.values()),
                                   tokenizer_path=retrodb.open(root).config["tokenizer"]["path"])
        assert hits == [], hits[:3]
        rows.append((built, statistics.median(by_id), statistics.median(by_literal), t_scan))
        shutil.rmtree(root, ignore_errors=True)
        corpus.unlink(missing_ok=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared); embedder "
          f"{edits.EMBEDDER}, {args.segment_chunks:,} chunks per segment; medians of {args.repeats} runs.\n")
    print("| database | full rebuild | redact 1 doc by id | by id / rebuild | redact 1 doc by literal (scan) | "
          "verify --absent (every file) |")
    print("|---|---|---|---|---|---|")
    for built, t_id, t_lit, t_scan in rows:
        print(f"| {built['chunks']:,} chunks, {built['segments']} segments | {built['rebuild']:.1f} s | {t_id:.2f} s | "
              f"{t_id / built['rebuild']:.1e} | {t_lit:.2f} s | {t_scan:.1f} s |")
    if len(rows) > 1:
        (b0, i0, l0, s0), (b1, i1, l1, s1) = rows[0], rows[-1]
        print(f"\nGrowth from {b0['chunks']:,} to {b1['chunks']:,} chunks: rebuild {b1['rebuild'] / b0['rebuild']:.1f}x, "
              f"redact by id {i1 / i0:.2f}x, by literal {l1 / l0:.2f}x, verify --absent {s1 / s0:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
