"""`retrodb neighbours`: the precomputed training neighbours of every live chunk (RETRO's frozen retrieval).

RETRO trains on neighbours computed once, because its retriever is frozen. For each
live chunk of a segment, the stage searches every live segment of one snapshot (its
HNSW index, or its keys exactly where it has none) and keeps the `margin` (default
2k) best chunks of OTHER documents: the chunk's own document is excluded exactly, by
over-fetching its length from its own segment (a document lives in one segment). The
rows (chunk_id, rank, neighbour_chunk_id, score) go to `neighbours-*.parquet` beside
the segment's other derived files; the snapshot records the file and what it was
computed against (`computed_at`: the version searched; `watermark`: its next segment
number, so every chunk whose id says it was written by segment >= watermark was not
there). The margin lets readers drop deleted chunks (either side) and renumber ranks
without recomputing: the `neighbours` SQL view and `retrodb.data` do so.

Incremental: a run computes only segments without neighbours (those an `add` or a
compaction without carried neighbours brought); older segments keep theirs, and
`stats`/`verify` say how stale they are (segments added since). `refresh` recomputes
all. A run commits once, at its end. Files are named by what they were computed from
(parameters, and the identity of every searched segment's keys, index and tombstones),
and each is published when its segment is done, so a run killed before its commit
leaves them for the rerun, which picks them up instead of recomputing them.

Compaction carries the rows of the kept chunks into the new segment (ranks
renumbered); redaction rewrites every neighbours file that names a removed chunk, on
either side (`purge`), and `verify` checks that no file does (`verify_check`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import faults
from .atomic import file_record, publish, tmp_path_for
from .errors import ConfigMismatch, MissingStage, RetrodbError
from .snapshot import SEGMENTS, Segment, Snapshot, segment_dir, segment_name
from .stages.base import Stage

DEFAULT_K = 2
DEFAULT_EF = 64
BLOCK = 4096  # query chunks searched per batch (hnswlib parallelises over a batch)
FIRST_FETCH = 28  # own-segment results fetched beyond the margin at first (then 4x wider where too few)
ROW_GROUP = 1 << 16  # rows per Parquet row group: readers fetch one group for one chunk's neighbours
PREFIX = "neighbours-"


@dataclass
class NeighboursReport:
    version: int  # snapshot current at the end
    params: dict
    computed_at: int  # the snapshot searched
    segments: list[str] = field(default_factory=list)  # segments whose neighbours this run committed
    chunks: int = 0  # chunks whose neighbours were computed now
    resumed_segments: int = 0  # files found published by an interrupted run
    up_to_date: int = 0  # segments that already had neighbours (not recomputed)
    exact_segments: list[str] = field(default_factory=list)  # searched exactly (no index)
    committed: bool = False  # the run's one commit (none when nothing changed)
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # on Ray: {"neighbours": [per-node figures]}
    retried_units: int = 0  # on Ray: unit attempts lost to a dead worker or node, and run again

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["chunks_per_s"] = round(self.chunks / self.seconds, 1) if self.seconds and self.chunks else None
        return d


def check_params(k: int = DEFAULT_K, margin: int | None = None, ef: int | None = None) -> dict:
    """A complete, validated set of parameters {k, margin, ef}."""
    if k < 1:
        raise RetrodbError(f"--k must be at least 1, not {k}")
    margin = 2 * k if margin is None else int(margin)
    if margin < k:
        raise RetrodbError(f"--margin must be at least k ({k}), not {margin}")
    ef = DEFAULT_EF if ef is None else int(ef)
    if ef < 1:
        raise RetrodbError(f"--ef must be at least 1, not {ef}")
    return {"k": int(k), "margin": margin, "ef": max(ef, margin)}


def file_name(params: dict, tag: str) -> str:
    return f"{PREFIX}k{params['k']}-m{params['margin']}-ef{params['ef']}-{tag}.parquet"


def is_neighbours_file(path: str | Path) -> bool:
    name = Path(path).name
    return name.startswith(PREFIX) and name.endswith(".parquet")


def arrow_schema():
    from .schema import arrow_schema as schema_of

    return schema_of("neighbours")


@contextmanager
def _published(final: Path):
    """A Parquet writer of the neighbours schema on a temporary name, published as `final` when the block ends
    (removed if it raises)."""
    import pyarrow.parquet as pq

    from .segment import _opts

    schema = arrow_schema()
    tmp = tmp_path_for(final)
    writer = pq.ParquetWriter(tmp, schema, **_opts(schema))
    try:
        yield writer
        writer.close()
        publish(tmp, final)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- the stage

_SEARCHERS: dict = {}  # per process: (root, version) -> Searcher, reused by the units of one run


def _searcher(root: Path, version: int, threads: int | None):
    from .query import Searcher
    from .snapshot import read_manifest

    key = (str(root), version)
    if key not in _SEARCHERS:
        _SEARCHERS.clear()
        _SEARCHERS[key] = Searcher(read_manifest(Path(root), version), threads=threads)
    return _SEARCHERS[key]


def search_identity(searcher) -> str:
    """What a run's results depend on besides the queried segment: every searched target (index units, with
    their dead rows, and the segments searched exactly), by the sha256 of their files."""
    parts = [json.dumps(t.unit, sort_keys=True) if t.unit is not None else
             json.dumps([t.name, sorted((k, r["sha256"]) for k, r in t.reader.files.items())])
             for t in searcher.targets()]
    return hashlib.sha256(json.dumps(sorted(parts)).encode()).hexdigest()


class NeighboursStage(Stage):
    """One segment's live chunks -> its neighbours file (published under its final name; the caller commits)."""

    name = "neighbours"

    def __init__(self, root: Path, version: int, params: dict, threads: int | None = None):
        self.root = Path(root)
        self.version = version  # the snapshot searched, the same for every unit of a run
        self.params = params
        self.threads = threads
        self._identity: str | None = None

    def searcher(self):
        return _searcher(self.root, self.version, self.threads)

    def final_path(self, number: int) -> Path:
        if self._identity is None:
            self._identity = search_identity(self.searcher())
        seg = self.searcher().snapshot.segment(number)
        tag = hashlib.sha256(json.dumps([self.params, self._identity, seg.files["keys"]["sha256"]]).encode())
        return segment_dir(self.root, number) / file_name(self.params, tag.hexdigest()[:12])

    def run(self, unit: int) -> dict:
        import pyarrow as pa

        number = int(unit)
        final = self.final_path(number)
        result = {"segment": number, "chunks": 0, "resumed": False}
        searcher = self.searcher()
        own = searcher.reader(number)
        if final.exists():  # published by an earlier run that stopped before its commit (or identical inputs)
            self.report(chunks=own.live)
            return {**result, "record": file_record(self.root, final), "resumed": True}
        ids = own.chunk_ids()
        first, count, *_ = own.doc_table()
        if int(count.sum()) != len(ids):
            from .errors import CorruptDatabase

            raise CorruptDatabase(f"{own.name}: documents list {int(count.sum())} chunks, chunks.parquet has "
                                  f"{len(ids)}", hint="run: retrodb verify DB")
        doc_lo = np.repeat(first, count)  # row i's document covers chunk ids doc_lo[i] .. doc_hi[i] - 1
        doc_hi = doc_lo + np.repeat(count, count)
        rows = np.flatnonzero(~own.deleted(ids))
        schema = arrow_schema()
        with _published(final) as writer:
            keys = own.keys()
            block = max(1, min(BLOCK, ROW_GROUP // self.params["margin"]))  # a chunk's rows never span row groups
            for start in range(0, len(rows), block):
                r = rows[start: start + block]
                q = np.asarray(keys[r], dtype=np.float32)
                nb, sc = self.neighbours_of(searcher, number, q, doc_lo[r], doc_hi[r])
                n_per = (nb >= 0).sum(axis=1)
                keep = nb >= 0
                ranks = np.broadcast_to(np.arange(1, nb.shape[1] + 1, dtype=np.int32), nb.shape)
                writer.write_table(pa.table({
                    "chunk_id": np.repeat(ids[r], n_per),
                    "rank": ranks[keep],
                    "neighbour_chunk_id": nb[keep],
                    "score": sc[keep].astype(np.float32),
                }, schema=schema), row_group_size=ROW_GROUP)
                result["chunks"] += len(r)
                self.report(chunks=len(r))
                faults.point("neighbours.block_done")
        faults.point("neighbours.segment_published")
        return {**result, "record": file_record(self.root, final)}

    def neighbours_of(self, searcher, own_number: int, q: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """The `margin` best chunks of other documents for each query row (chunk ids, -1 where fewer exist, and
        scores), best first, ties broken by chunk id. Rows of `q` are keys of chunks of segment `own_number` whose
        documents cover chunk ids lo .. hi - 1. Every search target is searched (index units and segments without
        an index); the one that holds the own segment over-fetches to pass its document."""
        margin, ef = self.params["margin"], self.params["ef"]
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        parts = []
        for t in searcher.targets():
            if t.live == 0:
                continue
            if t.holds(own_number):
                parts.append(self._own(searcher, t, q, lo, hi))
            else:
                parts.append(searcher.search_target(t, q, min(margin, t.live), ef))
        lab = np.concatenate([p[0] for p in parts], axis=1)
        sc = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
        return _top(lab, sc, margin)

    def _own(self, searcher, t, q: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """The `margin` best chunks of the target holding the query's own segment, outside its own document.

        A chunk's own document is excluded exactly: fetch margin + FIRST_FETCH (or margin + the document's
        length, if smaller: then one pass always suffices), drop the document's chunks, and fetch again, 4x
        wider, for the rows left with fewer than margin (never wider than margin + the document's length,
        which passes the whole document). Most rows finish in the first pass."""
        margin, ef = self.params["margin"], self.params["ef"]
        out_l = np.full((len(q), margin), -1, dtype=np.int64)
        out_s = np.full((len(q), margin), -np.inf, dtype=np.float32)
        rows = np.arange(len(q))
        need = np.minimum(margin + (hi - lo), t.live)  # wide enough to pass the whole document
        m = int(min(need.max(initial=0), margin + FIRST_FETCH))
        while len(rows) and m > 0:
            lab, sc = searcher.search_target(t, q[rows], m, ef)
            sc = np.where((lab >= lo[rows, None]) & (lab < hi[rows, None]), -np.inf, sc)
            done = (np.isfinite(sc).sum(axis=1) >= margin) | (m >= need[rows])
            out_l[rows[done]], out_s[rows[done]] = _top(lab[done], sc[done], margin)
            rows = rows[~done]
            m = min(4 * m, t.live)
        return out_l, out_s


def _top(lab: np.ndarray, sc: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the `width` best (label, score) pairs, best first, ties by label; -1 / -inf where fewer."""
    sc = np.where((lab < 0) | ~np.isfinite(sc), -np.inf, sc).astype(np.float32)
    order = np.lexsort((lab, -sc), axis=1)[:, :width]
    top_l = np.take_along_axis(lab, order, axis=1)
    top_s = np.take_along_axis(sc, order, axis=1)
    out_l = np.full((len(lab), width), -1, dtype=np.int64)
    out_s = np.full((len(lab), width), -np.inf, dtype=np.float32)
    valid = np.isfinite(top_s)
    out_l[:, : top_l.shape[1]] = np.where(valid, top_l, -1)
    out_s[:, : top_s.shape[1]] = np.where(valid, top_s, -np.inf)
    return out_l, out_s


# ---------------------------------------------------------------- the command


def neighbours_is_current(seg: Segment, params: dict) -> bool:
    meta = seg.neighbours or {}
    return "neighbours" in seg.files and {k: meta.get(k) for k in ("k", "margin", "ef")} == params


def compute_neighbours(root: str | Path, k: int = DEFAULT_K, *, ef: int | None = None, margin: int | None = None,
                       refresh: bool = False, workers: int | None = None, threads: int | None = None,
                       executor: str = "local", ray_address: str | None = None, wait: float = 0.0,
                       progress=None) -> NeighboursReport:
    """Compute the neighbours of every segment that has none (every segment with `refresh`), and commit them
    all in ONE snapshot: a reader sees every segment's new neighbours or none.

    `k` neighbours are what training reads; `margin` (default 2k) are stored so that deletions can be
    filtered at read time. `ef` is the HNSW search breadth. `workers` processes (default 1: one process
    whose hnswlib search uses `threads` threads, default all cores), or `executor="ray"`. Each finished
    segment's file is published as it is done, so a killed run's rerun computes only what was left.
    """
    from .database import Database
    from .executor import check_executor, default_workers, make_executor, node_figures

    started = time.perf_counter()
    params = check_params(k, margin, ef)
    check_executor(executor)
    db = Database(root)
    job = "neighbours-" + hashlib.sha256(json.dumps([params, refresh]).encode()).hexdigest()[:12]
    with db.writer("neighbours", wait=wait, keep_job=job) as w:
        base = w.base
        totals = base.totals_summary
        if not totals["segments"]:
            raise MissingStage(f"{w.root} has no segments yet", hint=f"run: retrodb ingest {w.root} SOURCE...")
        if totals["without_keys"] or not base.config.get("embedder"):
            raise MissingStage(f"{w.root}: {totals['without_keys'] or 'all'} segment(s) have no keys yet, so "
                               "neighbours cannot be searched", hint=f"run: retrodb embed {w.root}")
        recorded = base.config.get("neighbours")
        if recorded and recorded != params and not refresh:
            raise ConfigMismatch(
                f"this database's neighbours were computed with k={recorded['k']} margin={recorded['margin']} "
                f"ef={recorded['ef']}; you asked for k={params['k']} margin={params['margin']} ef={params['ef']}",
                hint=f"leave out the options to use the recorded ones, or recompute all with: retrodb neighbours "
                     f"{w.root} --refresh --k {params['k']} --margin {params['margin']} --ef {params['ef']}")
        report = NeighboursReport(base.version, params, base.version)
        todo = [s for s in base.segments_where(lambda g: refresh or g["with_neighbours"] < g["segments"])
                if refresh or not neighbours_is_current(s, params)]
        report.up_to_date = totals["segments"] - len(todo)
        n_workers = workers or 1
        if threads is None:  # locally: the cores shared by the workers; on Ray: one CPU per segment's task
            threads = 1 if executor == "ray" else max(1, default_workers() // n_workers)
        stage = NeighboursStage(w.root, base.version, params, threads)
        report.exact_segments = sorted(t.name for t in stage.searcher().targets() if t.kind == "exact")
        if progress is not None:
            progress({"total": sum(s.live_chunks for s in todo)})
        meta = {**params, "computed_at": base.version, "watermark": base.next_segment}
        w.write_json(w.work_dir(job) / "plan.json", {"base_version": base.version})
        for seg in todo:  # the files this run may publish: removed by the next writer unless committed or resumed
            w.track(stage.final_path(seg.number), job)
        pending: dict[int, dict] = {}

        def on_result(result: dict) -> None:
            seg = w.base.segment(result["segment"])
            if (seg.files.get("neighbours") or {}).get("path") == result["record"]["path"] \
                    and (seg.neighbours or {}).get("watermark") == meta["watermark"]:
                report.up_to_date += 1  # --refresh found the committed file computed from the same inputs
                return
            pending[result["segment"]] = result["record"]
            report.chunks += result["chunks"]
            report.resumed_segments += int(result["resumed"])

        on_progress = (lambda c: progress({**c, "advance": c.get("chunks", 0)})) if progress is not None else None
        runner = make_executor(executor, n_workers, ray_address, cpus_per_task=threads)
        try:
            runner.run(stage, [s.number for s in todo], on_result=on_result, on_progress=on_progress)
        finally:
            if executor == "ray":
                report.nodes = {"neighbours": node_figures(runner)}
                report.retried_units = runner.retried
        if pending or recorded != params:
            edit = w.edit("neighbours")
            edit.config["neighbours"] = params
            for number, record in pending.items():
                edit.set_files(number, {"neighbours": record})
                edit.update(number, neighbours=dict(meta))
            faults.point("neighbours.before_commit")
            w.commit(edit)
            report.segments = [segment_name(n) for n in sorted(pending)]
            report.committed = True
        shutil.rmtree(w.root / "_work" / job, ignore_errors=True)
        report.version = w.base.version
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------- staleness

STATUS_NAMES = 20  # segment names a status lists at most per kind (the counts are exact)


def status(snapshot: Snapshot, names: int = STATUS_NAMES) -> dict:
    """How complete and how fresh the stored neighbours are: which segments have none, the snapshots they were
    computed at, and the segments added since (whose chunks older neighbour files cannot name). Counts come from
    the root's summaries; the lists name at most `names` segments each, read from the groups that hold them."""
    t = snapshot.totals_summary
    params = snapshot.config.get("neighbours")
    watermarks = {int(wm): n for wm, n in t["watermarks"].items()}
    newest = t["origin_max"]
    stale_count = sum(n for wm, n in watermarks.items() if wm <= newest)
    if not t["with_neighbours"]:
        names = 0  # never computed: nothing worth listing (and no group is read)
    missing = _first(snapshot, lambda s: s["neighbours_missing"] > 0,
                     lambda seg: "neighbours" not in seg.files and seg.live_chunks > 0, names)
    stale = _first(snapshot, lambda s: any(int(wm) <= newest for wm in s["watermarks"]),
                   lambda seg: "neighbours" in seg.files and int(seg.neighbours["watermark"]) <= newest, names)
    added, added_chunks, added_count = [], 0, 0
    if watermarks:
        oldest = min(watermarks)
        for i, ref in enumerate(snapshot.group_refs):  # segments numbered from the oldest watermark on: the groups at the end
            if ref.summary["origin_max"] < oldest:
                continue
            for seg in snapshot.group(i).values():
                if seg.origin >= oldest:
                    added_count += 1
                    added_chunks += seg.live_chunks
                    if len(added) < names:
                        added.append(seg.name)
    return {
        "params": params,
        "segments": t["segments"],
        "computed": t["with_neighbours"],
        "missing_count": t["neighbours_missing"],
        "missing": missing,
        "missing_chunks": t["neighbours_missing_chunks"],
        "computed_at": t["computed_at"],
        "stale_count": stale_count,
        "stale": stale,  # segments whose neighbours cannot name chunks of segments added since
        "added_since_count": added_count,
        "added_since": added,
        "added_since_chunks": added_chunks,
    }


def _first(snapshot: Snapshot, group_wanted, wanted, n: int) -> list[str]:
    out = []
    if n <= 0:
        return out
    for seg in snapshot.segments_where(group_wanted):
        if wanted(seg):
            out.append(seg.name)
            if len(out) >= n:
                break
    return out


def describe(st: dict) -> str:
    """One line for people: 'k=2 (margin 4, ef 64) for 5 of 6 segments, computed at v3; ...'."""
    if not st["computed"]:
        return "not computed (run: retrodb neighbours DB)"
    p = st["params"] or {}
    at = ", ".join(f"v{v}" for v in st["computed_at"])
    parts = [f"k={p.get('k')} (margin {p.get('margin')}, ef {p.get('ef')}) for {st['computed']} of {st['segments']} "
             f"segment(s), computed at {at}"]
    if st["missing_count"]:
        parts.append(f"{st['missing_count']} segment(s) ({st['missing_chunks']:,} chunks) have none")
    if st["stale_count"]:
        parts.append(f"{st['stale_count']} segment(s) predate {st['added_since_count']} segment(s) added since "
                     f"({st['added_since_chunks']:,} chunks their neighbours cannot name; --refresh recomputes)")
    return "; ".join(parts)


# ---------------------------------------------------------------- SQL view


def sql_view(con, files: list) -> None:
    """Create the `neighbours(chunk_id, rank, neighbour_chunk_id, score)` view over the neighbours `files` on a
    DuckDB connection that has the `chunks` view: rows whose chunk or neighbour is not live are dropped, ranks
    renumbered."""
    from .sql import _files

    if not files:
        con.execute("CREATE VIEW neighbours AS SELECT NULL::BIGINT AS chunk_id, NULL::INTEGER AS rank, "
                    "NULL::BIGINT AS neighbour_chunk_id, NULL::FLOAT AS score WHERE false")
        return
    con.execute(
        "CREATE VIEW neighbours AS SELECT n.chunk_id, "
        "CAST(row_number() OVER (PARTITION BY n.chunk_id ORDER BY n.rank) AS INTEGER) AS rank, "
        "n.neighbour_chunk_id, n.score "
        f"FROM read_parquet({_files(files)}) n "
        "SEMI JOIN chunks a ON a.chunk_id = n.chunk_id SEMI JOIN chunks b ON b.chunk_id = n.neighbour_chunk_id"
    )


# ---------------------------------------------------------------- compaction and redaction


def _renumber(chunk_ids: np.ndarray) -> np.ndarray:
    """1-based rank of each row within its run of equal chunk ids (rows are sorted by chunk id)."""
    n = len(chunk_ids)
    if not n:
        return np.zeros(0, dtype=np.int32)
    new = np.ones(n, dtype=bool)
    new[1:] = chunk_ids[1:] != chunk_ids[:-1]
    starts = np.flatnonzero(new)
    run_start = np.repeat(starts, np.diff(np.append(starts, n)))
    return (np.arange(n) - run_start + 1).astype(np.int32)


def _rewrite(root: Path, sources: list[Path], final: Path, keep_row) -> dict:
    """Stream the rows of `sources` for which keep_row(table) is true into `final`, ranks renumbered per chunk.
    A chunk's rows are contiguous in a file, and a row group ends only between blocks of whole chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    with _published(final) as writer:
        for path in sources:
            pf = pq.ParquetFile(path)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g)
                t = t.filter(pa.array(keep_row(t)))
                ids = t["chunk_id"].to_numpy()
                t = t.set_column(t.schema.get_field_index("rank"), "rank", pa.array(_renumber(ids), pa.int32()))
                writer.write_table(t.cast(schema), row_group_size=ROW_GROUP)
    return file_record(root, final)


def carry_over(root: Path, sources: list, kept_ids: list[np.ndarray], directory: Path) -> tuple[dict, dict] | None:
    """For compaction: the neighbours of the kept chunks of `sources` ([number, JSON entry] pairs, `kept_ids` their kept
    chunk ids) as one file in `directory`, or None when a source has no neighbours (or other parameters). Rows of
    dropped chunks go, on either side. Returns (file record, the new entry's `neighbours` metadata)."""
    metas = [seg.get("neighbours") for _, seg in sources]
    if not all(m and "neighbours" in seg["files"] for m, (_, seg) in zip(metas, sources)):
        return None
    params = [{k: m[k] for k in ("k", "margin", "ef")} for m in metas]
    if any(p != params[0] for p in params):
        return None
    keep = np.unique(np.concatenate(kept_ids)) if kept_ids else np.zeros(0, np.int64)
    from .stages.index import read_chunk_ids

    dropped = []
    for (_, seg), kept in zip(sources, kept_ids):
        ids = read_chunk_ids(root, seg["files"])
        dropped.append(np.setdiff1d(ids, kept, assume_unique=True))
    dropped = np.unique(np.concatenate(dropped)) if dropped else np.zeros(0, np.int64)

    def keep_row(t):
        return np.isin(t["chunk_id"].to_numpy(), keep) & ~np.isin(t["neighbour_chunk_id"].to_numpy(), dropped)

    tag = hashlib.sha256(json.dumps([seg["files"]["neighbours"]["sha256"] for _, seg in sources]).encode())
    final = directory / file_name(params[0], tag.hexdigest()[:12])
    record = _rewrite(root, [root / seg["files"]["neighbours"]["path"] for _, seg in sources], final, keep_row)
    meta = {**params[0], "computed_at": min(int(m["computed_at"]) for m in metas),
            "watermark": min(int(m["watermark"]) for m in metas)}
    return record, meta


def _in_ranges(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """True where values fall in any [lo, hi) (lo sorted, ranges disjoint)."""
    if not len(lo):
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(lo, values, side="right") - 1
    return (at >= 0) & (values < hi[np.maximum(at, 0)])


def _ranges(chunk_ranges) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted((int(a), int(a) + int(n)) for a, n in chunk_ranges if int(n) > 0)
    lo = np.array([a for a, _ in pairs], dtype=np.int64)
    hi = np.array([b for _, b in pairs], dtype=np.int64)
    return lo, hi


def _names_removed(path: Path, lo: np.ndarray, hi: np.ndarray) -> int:
    """Rows of a neighbours file that name a chunk in the ranges, on either side."""
    import pyarrow.parquet as pq

    n = 0
    pf = pq.ParquetFile(path)
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=["chunk_id", "neighbour_chunk_id"])
        n += int((_in_ranges(t["chunk_id"].to_numpy(), lo, hi)
                  | _in_ranges(t["neighbour_chunk_id"].to_numpy(), lo, hi)).sum())
    return n


def files_naming(root: Path, chunk_ranges) -> set[str]:
    """Relative paths of every neighbours file on disk that names a chunk of `chunk_ranges` ([first, count])."""
    lo, hi = _ranges(chunk_ranges)
    out: set[str] = set()
    if not len(lo):
        return out
    for path in sorted((Path(root) / SEGMENTS).glob(f"seg-*/{PREFIX}*.parquet")):
        if _names_removed(path, lo, hi):
            out.add(path.relative_to(root).as_posix())
    return out


def purge(w, chunk_ranges, command: str = "redact") -> set[str]:
    """Redaction: rewrite every neighbours file of the current snapshot that names a removed chunk (either side)
    without those rows, and commit (no commit when none does). Returns the files on disk that named them (the
    old ones, which the snapshots still holding them keep until they are purged). Idempotent."""
    lo, hi = _ranges(chunk_ranges)
    if not len(lo):
        return set()
    dirty = files_naming(w.root, chunk_ranges)
    touched = [s for s in w.base.segments_where(lambda g: g["with_neighbours"] > 0)
               if "neighbours" in s.files and s.files["neighbours"]["path"] in dirty]
    if not touched:
        return dirty
    edit = w.edit(command)

    def keep_row(t):
        return ~(_in_ranges(t["chunk_id"].to_numpy(), lo, hi) | _in_ranges(t["neighbour_chunk_id"].to_numpy(), lo, hi))

    for seg in touched:
        old = seg.path(w.root, "neighbours")
        stem = old.name.removesuffix(".parquet").split("-v")[0]
        final = w.track(old.with_name(f"{stem}-v{edit.version:08d}.parquet"))
        edit.set_files(seg.number, {"neighbours": _rewrite(w.root, [old], final, keep_row)})
        faults.point("redact.neighbours_rewritten")
    w.commit(edit)
    return dirty


def redacted_ranges(root: Path) -> list[list[int]]:
    """Chunk id ranges [first, count] that redactions removed, from the audit log."""
    from .redact import AUDIT_LOG

    out = []
    try:
        lines = (Path(root) / AUDIT_LOG).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.extend(json.loads(line).get("chunk_ranges") or [])
        except (json.JSONDecodeError, AttributeError):
            continue
    return out


def verify_check(v) -> None:
    """`verify`: the neighbours files of the snapshot hold rows of their own segment's chunks only, ranks 1..n
    per chunk, at most `margin` each; no file on disk names a chunk a redaction removed; and, as information,
    how stale or incomplete the stored neighbours are."""
    import pyarrow.parquet as pq

    from .stages.index import read_chunk_ids

    for seg in v.readable_segments():
        name = seg.name
        rec = seg.files.get("neighbours")
        if not rec:
            continue
        meta = seg.neighbours or {}
        t = pq.read_table(v.root / rec["path"], columns=["chunk_id", "rank"])
        ids = t["chunk_id"].to_numpy()
        own = read_chunk_ids(v.root, seg.files)
        if len(ids) and not np.isin(ids, own).all():
            v.error(f"{name}: neighbours file has rows for chunks of another segment", rec["path"])
        if len(ids) > 1 and (np.diff(ids) < 0).any():
            v.error(f"{name}: neighbours file is not sorted by chunk_id", rec["path"])
        elif not np.array_equal(t["rank"].to_numpy(), _renumber(ids)):
            v.error(f"{name}: neighbour ranks are not 1..n for each chunk", rec["path"])
        if len(ids) and meta.get("margin") and np.unique(ids, return_counts=True)[1].max() > meta["margin"]:
            v.error(f"{name}: a chunk has more than margin={meta['margin']} stored neighbours", rec["path"])
    removed = redacted_ranges(v.root)
    if removed:
        for rel in sorted(files_naming(v.root, removed)):
            v.error("a neighbours file still names chunks that a redaction removed", rel)
    st = status(v.snapshot)
    if st["computed"] and (st["missing_count"] or st["stale_count"]):
        v.info(f"stored neighbours: {describe(st)}")
