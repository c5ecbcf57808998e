"""Scale: what routine operations cost on 10^3, 10^4 and 10^5 segments, and the ratios 10^5 / 10^3 (issue 13).

    python bench/bench_scale.py                          # 1,000 / 10,000 / 100,000 segments (~1 h on 2 busy cores)
    python bench/bench_scale.py --sizes 1000 10000       # a quick run
    python bench/bench_scale.py --rounds 9 --keep        # more rounds; keep the databases in bench/out/

Each database is synthetic (bench/synthetic.py: written directly, no tokenizer or model), with
tiny segments of CHUNKS chunks (two documents each) and clustered float16 keys of DIM dims,
indexed with `index --merge` (the keys go straight into shards in size tiers). On each, in this
order, in this process, the median over --rounds of:

Every timed edit starts with this process's caches of parsed group manifests and id-run footers
cleared, as a fresh `retrodb` command would (otherwise the one group of 10^3 segments stays parsed
from one edit to the next, and 10^5 segments' random groups do not).

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
- query: after the edits and `index --merge`, single queries (k=10, ef=128, the same on every size) as vectors, with the
  winners' text, continuations and tokens read back; p50 and p99, and recall@10 against exact
  search (`exact=True`: every key of every segment).

The machine is shared: figures are medians of rounds, and the databases take turns within each round
(add on 10^3, on 10^4, on 10^5, then the next round), so that a change of load affects every size
alike; ratios are between databases measured in the same run.
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
from retrodb.snapshot import clear_caches  # noqa: E402

OUT = ROOT / "bench" / "out"
CHUNKS = 10  # chunks per segment
PER_DOC = 5  # chunks per document: two documents a segment
DIM = 32
M, EFC = 16, 100
K, EF = 10, 128  # ef 128: recall@10 >= 0.95 on the 1M-vector shard of 10^5 segments (0.923 at ef 64)


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
    clear_caches()  # as a fresh `retrodb` process: no group manifest or id-run footer parsed yet
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def one_doc(path: Path, doc_id: str) -> Path:
    path.write_text(json.dumps({"id": doc_id, "text": f"a small new document {doc_id} about retrieval and "
                                                      "databases, added in one commit"}) + "\n")
    return path


class Subject:
    """One database under measurement: its copy, scratch folder and the ids its edits use."""

    def __init__(self, n_segments: int, db: Path, work: Path, rounds: int):
        self.n, self.db, self.work = n_segments, db, work
        rng = np.random.default_rng(n_segments)
        self.first = sorted(rng.choice(np.arange(1, n_segments + 1), size=3 * rounds, replace=False).tolist())
        self.out: dict = {"segments": n_segments}
        self.samples: dict[str, list] = {}

    def add_sample(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


def measure(subjects: list[Subject], rounds: int) -> None:
    """Each measurement round by round, the databases taking turns within a round (so that a change in the
    machine's load affects every size alike), then medians into `subject.out`."""
    def each_round(fn) -> None:
        for i in range(rounds):
            for s in subjects:
                fn(s, i)

    for s in subjects:
        retrodb.open(s.db).stats()  # warm: the imports
    for _ in range(31):  # open + stats
        for s in subjects:
            s.add_sample("open_stats_ms", 1000 * timed(lambda: retrodb.open(s.db).stats()))

    def add_one(s: Subject, i: int) -> None:  # one small document
        before = retrodb.open(s.db).snapshot
        s.add_sample("add_ms", 1000 * timed(add, s.db, [str(one_doc(s.work / f"add-{i}.jsonl",
                                                                      f"scale-add-{s.n}-{i}"))],
                                             IngestOptions(workers=1)))
        s.add_sample("add_bytes", written(before, retrodb.open(s.db).snapshot))
    each_round(add_one)

    def delete_one(s: Subject, i: int) -> None:  # one document by id
        before = retrodb.open(s.db).snapshot
        s.add_sample("delete_ms", 1000 * timed(delete, s.db, doc_ids=[f"syn-{s.first[i]}-0"]))
        s.add_sample("delete_bytes", written(before, retrodb.open(s.db).snapshot))
    each_round(delete_one)
    for s in subjects:
        compact(s.db, 0.2, 0, merge_indexes=False)  # the segments the deletes made dirty: out of the way

    def compact_one(s: Subject, i: int) -> None:  # one small segment, made dirty just before (untimed)
        delete(s.db, doc_ids=[f"syn-{s.first[rounds + i]}-1"])
        before = retrodb.open(s.db).snapshot
        clear_caches()
        report = compact(s.db, 0.2, 0, merge_indexes=False)
        assert len(report.groups) == 1, report.groups
        s.add_sample("compact_ms", 1000 * report.seconds)
        s.add_sample("compact_bytes", written(before, retrodb.open(s.db).snapshot))
    each_round(compact_one)

    env = dict(os.environ, PYTHONPATH=str(ROOT), RETRODB_KILL_AT="add.indexed")

    def crash_then_start(s: Subject, i: int) -> None:  # an add killed before its commit, then a writer starts
        src = one_doc(s.work / f"crash-{i}.jsonl", f"scale-crash-{s.n}-{i}")
        proc = subprocess.run([sys.executable, "-m", "retrodb.cli", "add", str(s.db), str(src)], env=env, cwd=ROOT,
                              capture_output=True)
        assert proc.returncode == -9, proc.stderr
        handle = retrodb.open(s.db)
        clear_caches()
        t = time.perf_counter()
        with handle.writer("bench"):
            s.add_sample("writer_start_ms", 1000 * (time.perf_counter() - t))
    each_round(crash_then_start)

    q = synthetic.query_vectors(400, DIM)
    handles = {}
    for s in subjects:  # query: after the edits and a merge of full tiers
        index(s.db, merge=True)
        handles[s.n] = handle = retrodb.open(s.db)
        units = handle.snapshot.index_units
        s.out["index_units"] = len(units)
        s.out["shards"] = sorted(int(u["vectors"]) for u in units if u["kind"] == "shard")
        for v in q[:20]:  # warm: indexes loaded, the winners' groups read once
            handle.query(vectors=v[None], k=K, ef=EF)
    for v in q[20:]:
        for s in subjects:
            t = time.perf_counter()
            handles[s.n].query(vectors=v[None], k=K, ef=EF)
            s.add_sample("query_ms", time.perf_counter() - t)
    for s in subjects:
        handle = handles[s.n]
        got = [[n.chunk_id for n in r.neighbours] for r in handle.query(vectors=q[:100], k=K, ef=EF)]
        want = [[n.chunk_id for n in r.neighbours] for r in handle.query(vectors=q[:100], k=K, exact=True)]
        s.out["recall10"] = sum(len(set(a) & set(b)) for a, b in zip(got, want)) / max(1, sum(len(b) for b in want))
        lat = s.samples.pop("query_ms")
        s.out["query_p50_ms"] = 1000 * float(np.percentile(lat, 50))
        s.out["query_p99_ms"] = 1000 * float(np.percentile(lat, 99))
        for key, values in s.samples.items():
            s.out[key] = statistics.median(values)


ROWS = [("open + stats", "open_stats_ms", "ms", 2.0), ("add one small document", "add_ms", "ms", 1.5),
        ("delete --doc-id (one id)", "delete_ms", "ms", 1.5), ("compact one small segment", "compact_ms", "ms", 1.5),
        ("writer start after a crash", "writer_start_ms", "ms", None),
        ("bytes written: add", "add_bytes", "B", None), ("bytes written: delete", "delete_bytes", "B", None),
        ("bytes written: compact", "compact_bytes", "B", None),
        ("query p50 (k=10, ef=128, text included)", "query_p50_ms", "ms", 2.0),
        ("query p99", "query_p99_ms", "ms", None)]


def table(results: list[dict]) -> str:
    first, last = results[0], results[-1]
    mid = results[-2] if len(results) > 2 else None
    head = ["", *[f"{r['segments']:,} segments" for r in results], f"ratio {last['segments']:,} / {first['segments']:,}",
            *([f"ratio {last['segments']:,} / {mid['segments']:,}"] if mid else []), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, key, unit, target in ROWS:
        cells = [f"{r[key]:,.1f} {unit}" if unit == "ms" else f"{r[key]:,.0f} {unit}" for r in results]
        ratios = [last[key] / r[key] if r[key] else float("nan") for r in ([first, mid] if mid else [first])]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(f"{x:.2f}x" for x in ratios) + " | "
                     + (f"<= {target}x" if target else "flat") + " |")
    blank = " | " + "| " * (2 if mid else 1)
    lines.append("| recall@10 vs exact | " + " | ".join(f"{r['recall10']:.4f}" for r in results) + blank + ">= 0.95 |")
    lines.append("| index units searched | " + " | ".join(str(r["index_units"]) for r in results) + blank + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--fresh", action="store_true", help="rebuild the databases even if bench/out has them")
    p.add_argument("--keep", action="store_true", help="keep the databases (default: the edited ones are removed)")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    subjects = []
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
        subjects.append(Subject(n, scratch, work, a.rounds))
    measure(subjects, a.rounds)
    results = [s.out for s in subjects]
    for s in subjects:
        print(json.dumps(s.out), flush=True)
        if not a.keep:
            shutil.rmtree(s.db, ignore_errors=True)
        shutil.rmtree(s.work, ignore_errors=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
