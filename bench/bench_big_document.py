"""One huge one-line JSONL document: peak memory and time of ingest, window by window against whole.

    python bench/bench_big_document.py [--mb 50] [--whole-mb 8]

The document is English-like text of `--mb` megabytes on one JSONL line. Each run is a fresh process
(`retrodb.ingest.ingest`, 1 worker) whose peak is its VmHWM (the resident high-water mark of the
process itself; getrusage's ru_maxrss would carry over the launching process's RSS across exec).
"window" is the shipped code; "whole" sets `tokenizer.WINDOW_CHARS` above the document's length,
so the document is tokenised in one `encode` call, as before windowing (run at `--whole-mb`: at
50 MB it needs about 6 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBE = r"""
import json, re, sys, time
import retrodb.tokenizer as tk
from retrodb.ingest import ingest, IngestOptions
if sys.argv[3] == "whole":
    tk.WINDOW_CHARS = 1 << 40
t = time.perf_counter()
report = ingest(sys.argv[1], [sys.argv[2]], IngestOptions(workers=1))
hwm = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"chunks": report.chunks, "tokens": report.tokens, "seconds": time.perf_counter() - t,
                  "peak_mb": hwm / 1024}))
"""


def make_document(path: Path, megabytes: float) -> int:
    from tests.conftest import make_text

    target = int(megabytes * (1 << 20))
    parts, size, i = [], 0, 0
    while size < target:
        parts.append(make_text(i, 200))
        size += len(parts[-1]) + 1
        i += 1
    text = " ".join(parts)[:target]
    path.write_text(json.dumps({"id": "big", "text": text}) + "\n")
    return len(text)


def run(path: Path, db: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(db), str(path), mode], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50, help="document size for the windowed run")
    ap.add_argument("--whole-mb", type=float, default=8, help="document size for the whole-document baseline")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [("window", args.whole_mb), ("whole", args.whole_mb)]
        if args.mb != args.whole_mb:
            runs.append(("window", args.mb))
        for mode, mb in runs:
            doc = tmp / f"doc-{mb}.jsonl"
            if not doc.exists():
                make_document(doc, mb)
            r = run(doc, tmp / f"db-{mode}-{mb}", mode)
            rows.append((mode, mb, r))
            print(f"{mode:6} {mb:>5} MB: {r['peak_mb']:,.0f} MB peak, {r['seconds']:.1f}s, {r['chunks']:,} chunks",
                  file=sys.stderr, flush=True)
    print("\n| document | tokenised | peak RSS (MB) | seconds | chunks |\n|---|---|---|---|---|")
    for mode, mb, r in rows:
        print(f"| {mb:g} MB, one line | {'window by window' if mode == 'window' else 'whole (before)'} | "
              f"{r['peak_mb']:,.0f} | {r['seconds']:.1f} | {r['chunks']:,} |")


if __name__ == "__main__":
    main()
