"""Ingest benchmark: throughput against the bare fast tokenizer, worker scaling, peak RSS at 1x and 10x.

    python bench/bench_ingest.py [--mb 10] [--repeats 3]

Input: JSONL of real English (Python's documentation topics, split into paragraphs-sized
documents, repeated with distinct ids until the size is reached). The bare baseline is
`tokenizers.Tokenizer.encode_batch` over the same texts in the same batch size, single
threaded like one ingest worker, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    from retrodb.demo_corpus import topics

    paras = []
    for name, text in topics().items():
        for i, p in enumerate(text.split("\n\n")):
            if len(p.strip()) > 200:
                paras.append((f"{name}/{i}", p))
    target = int(megabytes * (1 << 20))
    size = docs = 0
    with open(path, "w") as f:
        copy = 0
        while size < target:
            for pid, p in paras:
                line = json.dumps({"id": f"{pid}#{copy}", "text": p}) + "\n"
                f.write(line)
                size += len(line)
                docs += 1
                if size >= target:
                    break
            copy += 1
    return docs, size


def bare_tokenizer_seconds(path: Path) -> tuple[float, int]:
    from retrodb.stages.ingest import BATCH_CHARS, BATCH_DOCS
    from retrodb.tokenizer import default_model_dir, load_tokenizer

    tok = load_tokenizer(str(default_model_dir()))
    texts = [json.loads(line)["text"] for line in open(path)]
    batches, cur, chars = [], [], 0
    for t in texts:  # the same batching rule as the ingest stage
        cur.append(t)
        chars += len(t)
        if chars >= BATCH_CHARS or len(cur) >= BATCH_DOCS:
            batches.append(cur)
            cur, chars = [], 0
    if cur:
        batches.append(cur)
    start = time.perf_counter()
    tokens = 0
    for b in batches:
        tokens += sum(len(e.ids) for e in tok.encode_batch(b, add_special_tokens=False))
    return time.perf_counter() - start, tokens


def ingest_seconds(path: Path, workers: int, tmp: Path) -> tuple[float, int]:
    from retrodb.ingest import IngestOptions, ingest

    db = tmp / f"db-{workers}"
    shutil.rmtree(db, ignore_errors=True)
    from retrodb.database import Database

    Database.create(db)  # creating the database (loading the tokenizer) is not ingest work
    start = time.perf_counter()
    report = ingest(db, [str(path)], IngestOptions(workers=workers, segment_bytes=max(1 << 20, path.stat().st_size // 8)))
    return time.perf_counter() - start, report.tokens


def peak_rss_mb(path: Path, tmp: Path, workers: int, segment_mb: float) -> float:
    import psutil

    db = tmp / "db-rss"
    shutil.rmtree(db, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "retrodb.cli", "ingest", str(db), str(path), "--workers", str(workers),
                             "--segment-mb", str(segment_mb), "--format", "json"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"ingest failed: {proc.stderr.read().decode()}")
    return peak / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=10, help="input size for the throughput runs (1x for RSS)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-only", action="store_true", help="skip the throughput runs")
    ap.add_argument("--rss-workers", type=int, default=2)
    ap.add_argument("--segment-mb", type=float, default=4,
                    help="segment size for the RSS runs: memory is bounded by the segment, so both inputs span several")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="retrodb-bench-ingest-"))
    try:
        small = tmp / "small.jsonl"
        docs, size = make_corpus(small, args.mb)
        bare, ing1, ing2 = [], [], []
        for _ in range(0 if args.rss_only else args.repeats):
            bare.append(bare_tokenizer_seconds(small))
            ing1.append(ingest_seconds(small, 1, tmp))
            ing2.append(ingest_seconds(small, 2, tmp))
        if not args.rss_only:
            print_throughput(bare, ing1, ing2, docs, size, args.repeats)
        large = tmp / "large.jsonl"
        make_corpus(large, args.mb * 10)
        r1 = peak_rss_mb(small, tmp, args.rss_workers, args.segment_mb)
        r10 = peak_rss_mb(large, tmp, args.rss_workers, args.segment_mb)
        print(f"\nPeak RSS of the whole process tree (`retrodb ingest --workers {args.rss_workers} "
              f"--segment-mb {args.segment_mb:g}`):\n")
        print("| input | peak RSS MiB | ratio to 1x |")
        print("|---|---|---|")
        print(f"| 1x ({args.mb:g} MiB) | {r1:.0f} | 1.00 |")
        print(f"| 10x ({args.mb * 10:g} MiB) | {r10:.0f} | {r10 / r1:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_throughput(bare, ing1, ing2, docs: int, size: int, repeats: int) -> None:
    tokens = bare[0][1]
    assert all(t == tokens for _, t in ing1 + ing2), "ingest and bare tokenizer disagree on the token count"
    med = lambda runs: statistics.median(s for s, _ in runs)  # noqa: E731
    rate = lambda runs: tokens / med(runs)  # noqa: E731
    print(f"\nInput: {docs:,} documents, {size / (1 << 20):.1f} MiB JSONL, {tokens:,} tokens; "
          f"median of {repeats} runs\n")
    print("| what | seconds | tokens/s | ratio to bare tokenizer |")
    print("|---|---|---|---|")
    print(f"| bare `encode_batch` (1 thread) | {med(bare):.2f} | {rate(bare):,.0f} | 1.00 |")
    print(f"| retrodb ingest, 1 worker | {med(ing1):.2f} | {rate(ing1):,.0f} | {med(bare) / med(ing1):.2f} |")
    print(f"| retrodb ingest, 2 workers | {med(ing2):.2f} | {rate(ing2):,.0f} | {med(bare) / med(ing2):.2f} |")


if __name__ == "__main__":
    main()
