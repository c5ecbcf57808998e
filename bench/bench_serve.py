"""`retrodb serve` benchmark: a warm query through the HTTP API against the cold CLI.

    python bench/bench_serve.py                    # demo database and 1M synthetic chunks
    python bench/bench_serve.py --only demo        # one database
    python bench/bench_serve.py --seconds 10 --clients 8

For each database a real server runs in its own process (`retrodb serve DB --port P`), and this
process is the client (urllib, one connection per request, like curl):
- warm: sequential queries with distinct texts (k=4, ef=64), end-to-end latency at the client
  (HTTP, JSON, embedding the text, searching every segment, reading the winners' text);
- cold: the whole `retrodb query DB TEXT` process (imports, embedder load, index load, query);
- client: the whole `retrodb query DB TEXT --server URL` process (its interpreter start included);
- load: N client threads for S seconds: requests, errors, latency percentiles.

Databases: the demo corpus (Python's documentation topics, embedded with the bundled MiniLM), and
1M synthetic chunks in 4 segments (bench/synthetic.py, the database bench_query.py builds; hash keys,
so text queries embed in microseconds and the figure is the search and the read-back). Both are
kept under bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = ROOT / "bench" / "out"
WORDS = ("generator iterator exception class method function module import string list dictionary "
         "loop context manager decorator lambda scope closure coroutine await async file buffer").split()
CLI = [sys.executable, "-m", "retrodb.cli"]


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def queries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=6)) + f" {i}" for i in range(n)]


def demo_db() -> Path:
    path = OUT / "serve-demo"
    if (path / "CURRENT").exists():
        return path
    corpus = OUT / "serve-demo-corpus"
    subprocess.run([sys.executable, "-m", "retrodb.demo_corpus", str(corpus)], check=True, cwd=ROOT)
    for args in (["ingest", str(path), str(corpus)], ["embed", str(path)], ["index", str(path)]):
        subprocess.run(CLI + args + ["--format", "json"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return path


def synthetic_db(chunks: int = 1_000_000, segments: int = 4) -> Path:
    """bench_query.py's 1M-chunk database (4 segments of 250k), reused when it is built."""
    from bench_query import synthetic_db as build

    path, _ = build(chunks, segments)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/api/query", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as res:
        return json.loads(res.read())


class Server:
    def __init__(self, db: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(CLI + ["serve", str(db), "--port", str(self.port)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(self.url + "/api/health", timeout=5).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start: " + self.proc.stderr.read().decode())
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def warm_latency(url: str, n: int) -> dict:
    texts = queries(n + 10, seed=1)
    for t in texts[:10]:
        post(url, {"texts": [t], "k": 4})
    lat, server = [], []
    for t in texts[10:]:
        t0 = time.perf_counter()
        answer = post(url, {"texts": [t], "k": 4})
        lat.append(time.perf_counter() - t0)
        server.append(answer["seconds"])
    return {"p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "server_p50_ms": pct(server, 50) * 1e3}


def process_seconds(args: list[str], runs: int, env: dict | None = None) -> tuple[float, bool]:
    times, torch_loaded = [], False
    probe = ("import sys; "
             "from retrodb.cli.main import run; rc = run(sys.argv[1:]); "
             "print('TORCH' if 'torch' in sys.modules else '', file=sys.stderr); sys.exit(rc)")
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe] + args, cwd=ROOT, capture_output=True,
                              env=dict(os.environ, **(env or {})))
        times.append(time.perf_counter() - t0)
        if proc.returncode:
            raise RuntimeError(proc.stderr.decode())
        torch_loaded |= b"TORCH" in proc.stderr
    return statistics.median(times), torch_loaded


def load(url: str, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = [0]
    stop = time.time() + seconds
    lock = threading.Lock()

    def client(i: int) -> None:
        texts = queries(2000, seed=100 + i)
        j = 0
        while time.time() < stop:
            t0 = time.perf_counter()
            try:
                answer = post(url, {"texts": [texts[j % len(texts)]], "k": 4})
                ok = len(answer["results"][0]["neighbours"]) == 4
            except Exception:
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    errors[0] += 1
            j += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors[0], "qps": len(lat) / wall,
            "p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3, "p99_ms": pct(lat, 99) * 1e3}


def bench(name: str, db: Path, n: int, clients: int, seconds: float, runs: int) -> dict:
    from retrodb import open as open_db

    s = open_db(db).stats()
    row = {"name": name, "chunks": s["chunks"], "segments": s["segments"]}
    text = "how do generators work"
    row["cold_s"], row["cold_torch"] = process_seconds(["query", str(db), text, "-k", "4", "--format", "json"], runs)
    server = Server(db)
    try:
        row.update({f"warm_{k}": v for k, v in warm_latency(server.url, n).items()})
        row["client_s"], row["client_torch"] = process_seconds(
            ["query", str(db), text, "-k", "4", "--format", "json", "--server", server.url], runs)
        row.update({f"load_{k}": v for k, v in load(server.url, clients, seconds).items()})
    finally:
        server.stop()
    return row


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["demo", "synthetic"])
    ap.add_argument("--queries", type=int, default=300, help="sequential warm queries")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3, help="runs of each whole-process timing (median)")
    args = ap.parse_args(argv)
    rows = []
    if args.only in (None, "demo"):
        rows.append(bench("demo (MiniLM keys)", demo_db(), args.queries, args.clients, args.seconds, args.runs))
    if args.only in (None, "synthetic"):
        rows.append(bench("1M synthetic (hash keys)", synthetic_db(), args.queries, args.clients, args.seconds,
                          args.runs))
    print("| database | chunks | warm p50 / p90 / p99 ms (server p50) | cold `query` s | `query --server` s "
          "(torch imported?) | 8 clients x 10 s: requests, errors, q/s, p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['chunks']:,} | {r['warm_p50_ms']:.1f} / {r['warm_p90_ms']:.1f} / "
              f"{r['warm_p99_ms']:.1f} ({r['warm_server_p50_ms']:.1f}) | {r['cold_s']:.2f} | "
              f"{r['client_s']:.2f} ({'yes' if r['client_torch'] else 'no'}) | {r['load_requests']:,}, "
              f"{r['load_errors']}, {r['load_qps']:.0f}, {r['load_p50_ms']:.1f} / {r['load_p99_ms']:.1f} |")
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
