"""Scale: what routine operations cost on 10^3, 10^4 and 10^5 segments, and the ratios 10^5 / 10^3 (issue 13).

    python bench/bench_scale.py                          # 1,000 / 10,000 / 100,000 segments (~1 h on 2 busy cores)
    python bench/bench_scale.py --sizes 1000 10000       # a quick run
    python bench/bench_scale.py --rounds 9 --keep        # more rounds; keep the databases in bench/out/

Each database is synthetic (bench/synthetic.py: written directly, no tokenizer or model), with
tiny segments of CHUNKS chunks (two documents each) and clustered float16 keys of DIM dims,
indexed with `index --merge` (the keys go straight into shards in size tiers). On each, in this
order, in this process, the median over --rounds of:

- open + stats: `retrodb.open(db).stats()` (the root alone);
- add: `add` of one small document (a new segment: ingested, embedded with the hash embedder,
  indexed), commit included;
- delete: `delete --doc-id` of one document;
- compact: `compact` of one segment made dirty just before (one of its two documents deleted,
  untimed), `--target-segment-chunks 0`, no index merge;
- bytes written per commit, for each of those three: the new root, group list, group manifests, id
  runs and shard files the commit references that its parent did not, and the new segment files;
- writer start after a crash: an `add` is killed (kill -9 at `add.indexed`: its segment, keys and
  index written, nothing committed), then the time to take the writer lock and clean up;
- query: after the edits and `index --merge`, single queries (k=10, ef=64) as vectors, with the
  winners' text, continuations and tokens read back; p50 and p99, and recall@10 against exact
  search (`exact=True`: every key of every segment).

The machine is shared: figures are medians of rounds and ratios are computed between databases
measured in the same run, one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import retrodb  # noqa: E402
from retrodb.add import add  # noqa: E402
from retrodb.compact import compact  # noqa: E402
from retrodb.delete import delete  # noqa: E402
from retrodb.index import index  # noqa: E402
from retrodb.ingest import IngestOptions  # noqa: E402

import synthetic  # noqa: E402

OUT = ROOT / "bench" / "out"
CHUNKS = 10  # chunks per segment
PER_DOC = 5  # chunks per document: two documents a segment
DIM = 32
M, EFC = 16, 100
K, EF = 10, 64


def build(n_segments: int, fresh: bool) -> tuple[Path, dict]:
    db = OUT / f"scale-{n_segments}"
    info = {}
    if fresh or not (db / "READY").exists():
        shutil.rmtree(db, ignore_errors=True)
        t = time.perf_counter()
        synthetic.build(db, n_segments * CHUNKS, segments=n_segments, dim=DIM, chunks_per_doc=PER_DOC,
                        log=lambda *a: None, fsync=False)
        info["write_s"] = time.perf_counter() - t
        t = time.perf_counter()
        index(db, M=M, ef_construction=EFC, merge=True)
        info["index_s"] = time.perf_counter() - t
        (db / "READY").write_text(json.dumps(info))
    else:
        info = json.loads((db / "READY").read_text())
    return db, info


def written(before, after) -> int:
    """Bytes of the files `after` references that `before` did not: its root, metadata and new segment files."""
    old = {r["path"] for r in before.metadata_records()}
    total = (after.root / "manifests" / f"v-{after.version:08d}.json").stat().st_size
    total += sum(int(r["bytes"]) for r in after.metadata_records() if r["path"] not in old)
    old_groups = {r.path for r in before.group_refs}
    for i, ref in enumerate(after.group_refs):
        if ref.path in old_groups:
            continue
        for seg in after.group(i).values():
            prev = before.segment(seg.number)
            have = {r["path"] for r in prev.files.values()} if prev is not None else set()
            total += sum(int(r["bytes"]) for r in seg.files.values() if r["path"] not in have)
    return total


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def one_doc(path: Path, doc_id: str) -> Path:
    path.write_text(json.dumps({"id": doc_id, "text": f"a small new document {doc_id} about retrieval and "
                                                      "databases, added in one commit"}) + "\n")
    return path


def measure(db: Path, rounds: int, n_segments: int, work: Path) -> dict:
    rng = np.random.default_rng(n_segments)
    first = sorted(rng.choice(np.arange(1, n_segments + 1), size=3 * rounds, replace=False).tolist())
    out: dict = {"segments": n_segments}
    # open + stats
    retrodb.open(db).stats()
    out["open_stats_ms"] = 1000 * statistics.median(timed(lambda: retrodb.open(db).stats()) for _ in range(31))
    # add one small document
    times, sizes = [], []
    for i in range(rounds):
        before = retrodb.open(db).snapshot
        times.append(timed(add, db, [str(one_doc(work / f"add-{i}.jsonl", f"scale-add-{n_segments}-{i}"))],
                           IngestOptions(workers=1)))
        sizes.append(written(before, retrodb.open(db).snapshot))
    out["add_ms"], out["add_bytes"] = 1000 * statistics.median(times), statistics.median(sizes)
    # delete one document by id
    times, sizes = [], []
    for i in range(rounds):
        before = retrodb.open(db).snapshot
        times.append(timed(delete, db, doc_ids=[f"syn-{first[i]}-0"]))
        sizes.append(written(before, retrodb.open(db).snapshot))
    out["delete_ms"], out["delete_bytes"] = 1000 * statistics.median(times), statistics.median(sizes)
    compact(db, 0.2, 0, merge_indexes=False)  # the segments the deletes made dirty: out of the way
    # compact one small segment
    times, sizes = [], []
    for i in range(rounds):
        delete(db, doc_ids=[f"syn-{first[rounds + i]}-1"])
        before = retrodb.open(db).snapshot
        report = compact(db, 0.2, 0, merge_indexes=False)
        assert len(report.groups) == 1, report.groups
        times.append(report.seconds)
        sizes.append(written(before, retrodb.open(db).snapshot))
    out["compact_ms"], out["compact_bytes"] = 1000 * statistics.median(times), statistics.median(sizes)
    # writer start after a crash
    times = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), RETRODB_KILL_AT="add.indexed")
    for i in range(rounds):
        src = one_doc(work / f"crash-{i}.jsonl", f"scale-crash-{n_segments}-{i}")
        proc = subprocess.run([sys.executable, "-m", "retrodb.cli", "add", str(db), str(src)], env=env, cwd=ROOT,
                              capture_output=True)
        assert proc.returncode == -9, proc.stderr
        handle = retrodb.open(db)
        t = time.perf_counter()
        with handle.writer("bench"):
            times.append(time.perf_counter() - t)
    out["writer_start_ms"] = 1000 * statistics.median(times)
    # query
    index(db, merge=True)
    handle = retrodb.open(db)
    units = handle.snapshot.index_units
    out["index_units"] = len(units)
    out["shards"] = sorted(int(u["vectors"]) for u in units if u["kind"] == "shard")
    q = synthetic.query_vectors(400, DIM)
    for v in q[:20]:  # warm: indexes loaded, the winners' groups read once
        handle.query(vectors=v[None], k=K, ef=EF)
    lat = []
    for v in q[20:]:
        t = time.perf_counter()
        handle.query(vectors=v[None], k=K, ef=EF)
        lat.append(time.perf_counter() - t)
    out["query_p50_ms"] = 1000 * float(np.percentile(lat, 50))
    out["query_p99_ms"] = 1000 * float(np.percentile(lat, 99))
    got = [[n.chunk_id for n in r.neighbours] for r in handle.query(vectors=q[:100], k=K, ef=EF)]
    want = [[n.chunk_id for n in r.neighbours] for r in handle.query(vectors=q[:100], k=K, exact=True)]
    out["recall10"] = sum(len(set(a) & set(b)) for a, b in zip(got, want)) / max(1, sum(len(b) for b in want))
    return out


ROWS = [("open + stats", "open_stats_ms", "ms", 2.0), ("add one small document", "add_ms", "ms", 1.5),
        ("delete --doc-id (one id)", "delete_ms", "ms", 1.5), ("compact one small segment", "compact_ms", "ms", 1.5),
        ("writer start after a crash", "writer_start_ms", "ms", None),
        ("bytes written: add", "add_bytes", "B", None), ("bytes written: delete", "delete_bytes", "B", None),
        ("bytes written: compact", "compact_bytes", "B", None),
        ("query p50 (k=10, ef=64, text included)", "query_p50_ms", "ms", 2.0),
        ("query p99", "query_p99_ms", "ms", None)]


def table(results: list[dict]) -> str:
    first, last = results[0], results[-1]
    head = ["", *[f"{r['segments']:,} segments" for r in results], f"ratio {last['segments']:,} / {first['segments']:,}",
            "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, key, unit, target in ROWS:
        cells = [f"{r[key]:,.1f} {unit}" if unit == "ms" else f"{r[key]:,.0f} {unit}" for r in results]
        ratio = last[key] / first[key] if first[key] else float("nan")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f}x | "
                     + (f"<= {target}x" if target else "flat") + " |")
    lines.append("| recall@10 vs exact | " + " | ".join(f"{r['recall10']:.4f}" for r in results) + " | | >= 0.95 |")
    lines.append("| index units searched | " + " | ".join(str(r["index_units"]) for r in results) + " | | |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--fresh", action="store_true", help="rebuild the databases even if bench/out has them")
    p.add_argument("--keep", action="store_true", help="keep the databases (default: the edited ones are removed)")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for n in a.sizes:
        db, info = build(n, a.fresh)
        print(f"{n:,} segments: built in {info.get('write_s', 0):.0f} s, indexed in {info.get('index_s', 0):.0f} s",
              flush=True)
        work = OUT / f"scale-{n}-work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        scratch = OUT / f"scale-{n}-edited"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(db, scratch)  # the edits go to a copy: the built database is reused by the next run
        results.append(measure(scratch, a.rounds, n, work))
        print(json.dumps(results[-1]), flush=True)
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
