"""Figures for the capacity plan (docs/capacity.md): what the coordinator's single writer costs per commit as the
manifest grows, what an HNSW build and search cost per core at MiniLM's and bert-base's dimensions, and what the
Ray executor costs per unit on a local cluster.

    python bench/bench_cluster.py                       # all parts (about 5 minutes on 2 cores)
    python bench/bench_cluster.py --only commit,index,search,ray --segments 1000,10000,60000

- commit: the coordinator's commit as embed does it (`derive` = deep copy of the manifest, add the new keys
  files of 64 segments, write the manifest with fsync, move CURRENT) on manifests of N segments, each entry
  shaped like a real one (documents, chunks, keys, index and neighbours file records); then reading it back
  (what every reader's open costs).
- index: `hnswlib` build rate with ONE thread (keys/s per core), M=32, ef_construction=200 (retrodb's
  defaults), clustered unit keys (bench/synthetic.py's distribution) of dim 384 and 768.
- search: single-thread `knn_query` latency at ef=64, k=4 on those indexes (one segment's search cost).
- ray: units/s through the Ray executor for units that do nothing (the coordinator's own cost per unit:
  placing, waiting, progress, results) on a local 2-node cluster; skipped without the ray extra.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HNSWLIB_NO_NATIVE", "1")


def entry(n: int) -> dict:
    """A manifest entry like a real segment's during the embed stage (ingested, keys being added: no index yet;
    a fresh segment's own index is listed in the root until `index --merge` packs it into a shard)."""
    name = f"seg-{n:06d}"

    def rec(file: str, size: int) -> dict:
        return {"path": f"segments/{name}/{file}", "bytes": size, "sha256": f"{n:016x}" * 4}

    return {"documents": 4096, "chunks": 250_000, "tokens": 15_000_000, "origin_max": n,
            "files": {"documents": rec("documents.parquet", 40 << 20), "chunks": rec("chunks.parquet", 60 << 20),
                      "keys": rec("keys-0123456789ab-128.npy", 192 << 20)}}


def bench_commit(sizes: list[int], rounds: int, log) -> list[dict]:
    """A coordinator's commit (64 segments' keys recorded) and a reader's open, against the number of segments
    the snapshot holds: the snapshot tree (retrodb/snapshot.py) writes the groups a commit changes, a new
    group list and a root; `manifest_bytes` is what one such commit writes."""
    from retrodb.database import Database
    from retrodb.snapshot import Segment

    rows = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="bench-commit-")) / "db"
        db = Database.create(root)
        # set-up: the entries describe files that are not there, so the id index (which reads new segments'
        # documents) is not written for them; the commits timed below add no segment and do not need it
        with mock.patch("retrodb.ids.record_new_segments", lambda *a, **k: None), db.writer("bench") as w:
            edit = w.edit("bench")
            for i in range(1, n + 1):
                edit.put(Segment.from_json(i, entry(i)))
            w.commit(edit)
        times, reads, sizes_written = [], [], []
        for r in range(rounds):
            before = {p.name for p in (root / "manifests").rglob("*.json")}
            started = time.perf_counter()
            with db.writer("embed") as w:
                edit = w.edit("embed")
                for i in range(1 + 64 * r, 65 + 64 * r):  # one commit's worth of finished segments
                    edit.set_files(i, {"keys": copy.deepcopy(entry(i)["files"]["keys"])})
                w.commit(edit)
            times.append(time.perf_counter() - started)
            sizes_written.append(sum(p.stat().st_size for p in (root / "manifests").rglob("*.json")
                                     if p.name not in before))
            started = time.perf_counter()
            Database(root).stats()
            reads.append(time.perf_counter() - started)
        rows.append({"segments": n, "manifest_bytes": statistics.median(sizes_written),
                     "commit_s": statistics.median(times), "open_s": statistics.median(reads)})
        log(f"  {n:,} segments: a commit writes {rows[-1]['manifest_bytes'] / 2**20:.2f} MiB of metadata, "
            f"commit {rows[-1]['commit_s']:.3f} s, open + stats {rows[-1]['open_s']:.4f} s")
        shutil.rmtree(root.parent, ignore_errors=True)
    return rows


def bench_index(dims: list[int], n: int, queries: int, log) -> list[dict]:
    import hnswlib

    from synthetic import centres, clustered

    rows = []
    for dim in dims:
        rng = np.random.default_rng(dim)
        c = centres(dim, 1000, dim)
        keys = clustered(rng, c[np.repeat(rng.integers(0, 1000, n // 16 + 1), 16)[:n]]).astype(np.float16)
        index = hnswlib.Index(space="cosine", dim=dim)
        index.init_index(max_elements=n, ef_construction=200, M=32, random_seed=100)
        started = time.perf_counter()
        for a in range(0, n, 8192):
            index.add_items(np.asarray(keys[a:a + 8192], dtype=np.float32), np.arange(a, min(n, a + 8192)),
                            num_threads=1)
        build = time.perf_counter() - started
        index.set_ef(64)
        q = clustered(rng, c[rng.integers(0, 1000, queries)])
        lat = []
        for row in q:
            t = time.perf_counter()
            index.knn_query(row[None, :], k=4, num_threads=1)
            lat.append(time.perf_counter() - t)
        rows.append({"dim": dim, "keys": n, "build_s": build, "keys_per_s_per_core": n / build,
                     "search_ms_p50": 1000 * statistics.median(lat),
                     "search_ms_p99": 1000 * float(np.percentile(lat, 99)),
                     "bytes_per_key": (dim * 4 + 2 * 32 * 4 + 8 + 4) })
        log(f"  dim {dim}: build {n / build:,.0f} keys/s on one thread, search p50 {rows[-1]['search_ms_p50']:.3f} ms")
    return rows


class _Nothing:
    """A stage whose units do nothing: what remains is the executor's own cost per unit."""

    name = "nothing"
    root = None

    def set_reporter(self, reporter) -> None:
        self._reporter = reporter

    def run(self, unit: dict) -> dict:
        if self._reporter is not None:
            self._reporter({"chunks": 1})
        return {"segment": unit["segment"], "entry": {}, "resumed": False}


def bench_ray(units: int, log) -> dict | None:
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        log("  ray is not installed: skipped (pip install 'retrodb[ray]')")
        return None
    from retrodb.cluster import RayExecutor

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ex = RayExecutor()
        ex.run(_Nothing(), [{"segment": i} for i in range(8)])  # warm-up: workers started
        started = time.perf_counter()
        ex.run(_Nothing(), [{"segment": i} for i in range(units)], on_progress=lambda c: None)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = {"units": units, "seconds": seconds, "units_per_s": units / seconds, "ms_per_unit": 1000 * seconds / units}
    log(f"  {units} empty units in {seconds:.1f} s: {out['units_per_s']:.0f} units/s through the coordinator")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="commit,index,search,ray")
    ap.add_argument("--segments", default="1000,10000,60000", help="manifest sizes for the commit part")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=20000, help="keys per index for the index/search parts")
    ap.add_argument("--units", type=int, default=400, help="units for the ray part")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    from bench_embed import machine

    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start\n")
    if "commit" in parts:
        log("== commit")
        rows = bench_commit([int(x) for x in args.segments.split(",")], args.rounds, log)
        print("| segments in the snapshot | metadata MiB written per commit | commit s (64 segments' keys) | "
              "open + stats s |\n|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['segments']:,} | {r['manifest_bytes'] / 2**20:.2f} | {r['commit_s']:.3f} | {r['open_s']:.4f} |")
        print()
    if parts & {"index", "search"}:
        log("== index and search")
        rows = bench_index([384, 768], args.keys, 500, log)
        print("| dim | keys | build keys/s, 1 thread | search p50 / p99 ms (ef 64, k 4, 1 thread) | index bytes/key |\n"
              "|---:|---:|---:|---|---:|")
        for r in rows:
            print(f"| {r['dim']} | {r['keys']:,} | {r['keys_per_s_per_core']:,.0f} | {r['search_ms_p50']:.3f} / "
                  f"{r['search_ms_p99']:.3f} | {r['bytes_per_key']:,} |")
        print()
    if "ray" in parts:
        log("== ray")
        r = bench_ray(args.units, log)
        if r:
            print(f"Ray executor, empty units on a local 2-node cluster: {r['units_per_s']:.0f} units/s "
                  f"({r['ms_per_unit']:.1f} ms per unit).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
