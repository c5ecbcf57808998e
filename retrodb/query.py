"""Nearest-neighbour queries over one snapshot: search every index unit, merge, read only the winners.

A query searches the snapshot's index units (listed in its root: fresh
segments' own HNSW indexes and shards merged from many segments, in size
tiers: retrodb/shards.py), plus, by brute force over their memory-mapped
keys, the segments not indexed yet; all at once on a thread pool (hnswlib and
NumPy release the GIL). `exact` searches every segment's keys instead. Dead
chunks (tombstoned, or moved out of a shard by compaction) are marked deleted
in the loaded index, so the graph search skips them without losing
neighbours; chunks excluded for one query (its own document) are over-fetched
for and dropped. The candidates are merged into the global top k, and the
winners' rows are read for them alone: from each segment's chunk store
(retrodb/store.py: memory-mapped, so a winner costs microseconds), or, for a
segment written before chunk stores, from the Parquet row groups whose
chunk_id statistics contain them. No group manifest is read but those of the
winners' segments.

A `Searcher` keeps what it loaded (indexes, key memmaps, stores, Parquet
metadata) for the next query; `Database.query` keeps one per database handle.
Cache keys name the files an entry was built from, and an entry goes as soon
as one of them is no longer in the handle's snapshot (an index loaded with
one tombstones file is not kept once a delete has replaced that file).

A segment file that cannot be decoded is a CorruptDatabase naming the file
and pointing to `retrodb verify`, never a bare pyarrow error.
"""

from __future__ import annotations

import functools
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import CorruptDatabase, MissingStage, RetrodbError, UsageError, require
from .snapshot import Segment, Snapshot, segment_name
from .stages.index import DEFAULT_PARAMS, open_keys, params_of, read_chunk_ids

FEW_QUERIES = 8  # query texts embedded on one CPU thread (see Searcher._embed)
BATCH_QUERIES = 64  # from this many query texts on, the embedder's dtype is chosen as `retrodb embed` does
EXACT_BLOCK = 1 << 23  # key-by-query scores computed per block in exact search (floats)
CHUNK_COLUMNS = ["chunk_id", "doc_id", "position", "char_start", "char_end", "tokens", "continuation_id"]


class QueryWarning(UserWarning):
    """Something a query worked around (a segment without an index or keys, an unknown document)."""


@dataclass(frozen=True)
class Neighbour:
    """One retrieved chunk: RETRO's [N, F] pair (the chunk and its continuation) and where it comes from."""

    rank: int  # 1-based
    score: float  # cosine similarity (inner product for space=ip) of the query and the chunk's key
    chunk_id: int
    doc_id: str
    position: int  # chunk index within its document
    text: str  # the chunk's text: its document's text over the chunk's character span
    continuation: str | None  # the next chunk's text, None for a document's last chunk
    tokens: list[int]  # LM token ids of the chunk
    continuation_tokens: list[int]  # LM token ids of the continuation ([] if none)
    # with query(..., overlap=True): the longest token run the query shares with [N, F] (retrodb/overlap.py)
    r: float | None = None  # that run's length / the query's tokens (RETRO's r(C) for a chunk query)
    overlap: dict | None = None  # {"tokens", "query_start", "start" (in tokens + continuation_tokens),
    #                               "text_span" [a, b) in text or None, "continuation_span" [a, b) or None}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QueryResult:
    """The neighbours of one query, best first."""

    query: str  # the query text (for a chunk-id query: the chunk's text)
    neighbours: list[Neighbour]
    chunk_id: int | None = None  # the chunk asked about, for chunk-id queries

    def to_dict(self) -> dict:
        """The JSON form: {"query": ..., ["chunk_id": the chunk asked about, for chunk-id queries,]
        "neighbours": [{rank, score, chunk_id, doc_id, position, text, continuation, tokens,
        continuation_tokens}]}."""
        out = {"query": self.query}
        if self.chunk_id is not None:
            out["chunk_id"] = self.chunk_id
        out["neighbours"] = [n.to_dict() for n in self.neighbours]
        return out


@contextmanager
def reading(root: Path, path: Path):
    """Turn a failure to decode a database file into a CorruptDatabase that names it."""
    import pyarrow as pa

    try:
        yield
    except (OSError, ValueError, pa.ArrowException) as exc:
        rel = Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else str(path)
        if not Path(path).exists():
            raise CorruptDatabase(f"{rel} is gone (vacuumed while this snapshot was being read?)",
                                  hint=f"reopen the database; run: retrodb verify {root}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptDatabase(f"cannot read {rel}: {first}", hint=f"run: retrodb verify {root}") from None


def _reads(attr: str):
    """Method decorator: failures while reading the file at `self.<attr>` become CorruptDatabase."""
    def wrap(fn):
        @functools.wraps(fn)
        def guarded(self, *args, **kwargs):
            with reading(self.root, getattr(self, attr)):
                return fn(self, *args, **kwargs)
        return guarded
    return wrap


@dataclass(frozen=True)
class _Exclusion:
    lo: int  # chunk ids lo .. hi-1 are excluded
    hi: int
    segment: int  # the segment those chunks live in (over-fetch is needed where it is searched only)


class _Reader:
    """What queries read of one segment (keys, chunk ids, rows of the winners), loaded lazily and kept."""

    def __init__(self, root: Path, seg: Segment, cache: dict):
        self.root = root
        self.seg = seg
        self.number = seg.number
        self.name = seg.name
        self.files = seg.files
        self.cache = cache
        self.lock = threading.Lock()
        self.chunk_path = root / self.files["chunks"]["path"]
        self.doc_path = root / self.files["documents"]["path"]
        self.live = seg.live_chunks
        self._md: tuple | None = None
        self._tomb: tuple | None = None
        self._ids: np.ndarray | None = None
        self._docs: tuple | None = None

    # -- read when first needed (a winner read from the chunk store needs neither)
    def _metadata(self) -> tuple:
        """(Parquet metadata of chunks.parquet, row-group chunk_id minima, maxima, first rows)."""
        if self._md is None:
            import pyarrow.parquet as pq

            key = ("chunk_md", self.files["chunks"]["path"])
            if key not in self.cache:
                with reading(self.root, self.chunk_path):
                    md = pq.read_metadata(self.chunk_path)
                self.cache[key] = (md, *_row_group_ranges(md, "chunk_id"))
            self._md = self.cache[key]
        return self._md

    chunk_md = property(lambda self: self._metadata()[0])
    rg_min = property(lambda self: self._metadata()[1])
    rg_max = property(lambda self: self._metadata()[2])
    rg_start = property(lambda self: self._metadata()[3])

    def _tombstones(self) -> tuple[np.ndarray, np.ndarray]:
        if self._tomb is None:
            rec = self.files.get("tombstones")
            if not rec:
                self._tomb = (np.empty(0, np.int64), np.empty(0, np.int64))
            else:
                key = ("tombstones", rec["path"])
                if key not in self.cache:
                    from .tombstones import deleted_ranges

                    with reading(self.root, self.root / rec["path"]):
                        self.cache[key] = deleted_ranges(self.root, self.files)
                self._tomb = self.cache[key]
        return self._tomb

    tomb_lo = property(lambda self: self._tombstones()[0])
    tomb_hi = property(lambda self: self._tombstones()[1])

    def deleted(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `ids` are tombstoned in this snapshot."""
        return _in(ids, self.tomb_lo, self.tomb_hi)

    # -- keys and ids
    def keys(self, keep: bool = True) -> np.ndarray:
        """The segment's keys (a memmap); `keep=False`: not kept open for later calls (an exact search over
        every segment would otherwise hold one open file per segment)."""
        key = ("keys", self.files["keys"]["path"])
        if key in self.cache:
            return self.cache[key]
        keys = open_keys(self.root, self.files)
        if keep:
            self.cache[key] = keys
        return keys

    @_reads("chunk_path")
    def chunk_ids(self) -> np.ndarray:
        if self._ids is None:
            key = ("chunk_ids", self.files["chunks"]["path"])
            if key not in self.cache:
                self.cache[key] = read_chunk_ids(self.root, self.files)
            self._ids = self.cache[key]
        return self._ids

    @_reads("chunk_path")
    def row_of(self, chunk_id: int) -> int | None:
        """Row of `chunk_id` in this segment (row i = key i), read from the one row group that can hold it."""
        import pyarrow.parquet as pq

        for rg in np.flatnonzero((self.rg_min <= chunk_id) & (self.rg_max >= chunk_id)):
            col = pq.ParquetFile(self.chunk_path, metadata=self.chunk_md).read_row_group(
                int(rg), columns=["chunk_id"]).column(0).to_numpy()
            hit = np.flatnonzero(col == chunk_id)
            if len(hit):
                return int(self.rg_start[rg] + hit[0])
        return None

    # -- documents
    @_reads("doc_path")
    def doc_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, object]:
        """(first_chunk_id, num_chunks, argsort of first_chunk_id, row-group starts, metadata) of the documents."""
        if self._docs is None:
            import pyarrow.parquet as pq

            key = ("docs", self.files["documents"]["path"])
            if key not in self.cache:
                md = pq.read_metadata(self.doc_path)
                t = pq.read_table(self.doc_path, columns=["first_chunk_id", "num_chunks"])
                first = t["first_chunk_id"].to_numpy().astype(np.int64)
                starts = np.concatenate([[0], np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)])])
                self.cache[key] = (first, t["num_chunks"].to_numpy().astype(np.int64),
                                   np.argsort(first, kind="stable"), starts, md)
            self._docs = self.cache[key]
        return self._docs

    def doc_range_of_chunk(self, chunk_id: int) -> tuple[int, int] | None:
        first, count, order, _, _ = self.doc_table()
        at = np.searchsorted(first[order], chunk_id, side="right") - 1
        if at < 0:
            return None
        row = order[at]
        return (int(first[row]), int(first[row] + count[row])) if chunk_id < first[row] + count[row] else None

    # -- the winners' rows
    def store(self):
        from .store import ChunkStore

        rec = self.files["store"]
        key = ("store", rec["path"])
        if key not in self.cache:
            with reading(self.root, self.root / rec["path"]):
                self.cache[key] = ChunkStore(self.root / rec["path"])
        return self.cache[key]

    def read(self, ids: list[int]) -> dict[int, dict]:
        """{chunk_id: {doc_id, position, text, tokens, continuation, continuation_tokens}} of live chunks of
        this segment: from its chunk store (memory-mapped, a few microseconds a chunk), or, for a segment
        written before chunk stores, from the Parquet row groups that hold them."""
        if "store" in self.files:
            with reading(self.root, self.root / self.files["store"]["path"]):
                out = self.store().read(ids)
            missing = [c for c in ids if c not in out]
            if missing:
                raise CorruptDatabase(f"chunk {missing[0]} of {self.name} is in the index but not in its tables",
                                      hint=f"run: retrodb verify {self.root}")
            return out
        return self._read_parquet(ids)

    @_reads("doc_path")
    def doc_texts(self, first_chunk_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """{first_chunk_id: (doc_id, text)} for documents of this segment, reading only their row groups."""
        import pyarrow.parquet as pq

        first, _, order, starts, md = self.doc_table()
        want = np.array(sorted(set(first_chunk_ids)), dtype=np.int64)
        pos = np.searchsorted(first[order], want)
        rows = order[np.minimum(pos, len(order) - 1)]
        found = first[rows] == want
        by_rg: dict[int, list[tuple[int, int]]] = {}
        for f, r in zip(want[found].tolist(), rows[found].tolist()):
            rg = int(np.searchsorted(starts, r, side="right") - 1)
            by_rg.setdefault(rg, []).append((f, r - int(starts[rg])))
        out = {}
        pf = pq.ParquetFile(self.doc_path, metadata=md)
        for rg, items in by_rg.items():
            t = pf.read_row_group(rg, columns=["doc_id", "text"])
            locals_ = [i for _, i in items]
            ids = t.column("doc_id").take(locals_).to_pylist()
            texts = t.column("text").take(locals_).to_pylist()
            for (f, _), d, x in zip(items, ids, texts):
                out[f] = (d, x)
        return out

    @_reads("chunk_path")
    def chunk_rows(self, ids: Iterable[int]) -> dict[int, dict]:
        """{chunk_id: row} for chunks of this segment, reading only the row groups whose statistics hold them."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        ids = np.array(sorted(set(ids)), dtype=np.int64)
        if not len(ids):
            return {}
        hit = (self.rg_min[None, :] <= ids[:, None]) & (self.rg_max[None, :] >= ids[:, None])
        rgs = np.flatnonzero(hit.any(axis=0)).tolist()
        if not rgs:
            return {}
        t = pq.ParquetFile(self.chunk_path, metadata=self.chunk_md).read_row_groups(rgs, columns=CHUNK_COLUMNS)
        t = t.filter(pc.is_in(t["chunk_id"], value_set=pa.array(ids)))
        return {r["chunk_id"]: r for r in t.to_pylist()}

    def _read_parquet(self, ids: list[int]) -> dict[int, dict]:
        rows = self.chunk_rows(ids + [c + 1 for c in ids])  # continuations are (almost always) the next id
        missing = [r["continuation_id"] for c in ids if (r := rows.get(c)) and r["continuation_id"] is not None
                   and r["continuation_id"] not in rows]
        rows.update(self.chunk_rows(missing))
        firsts = {c: c - rows[c]["position"] for c in ids if c in rows}
        docs = self.doc_texts(firsts.values())
        out = {}
        for c in ids:
            r = rows.get(c)
            doc = docs.get(firsts.get(c)) if r else None
            if r is None or doc is None or doc[0] != r["doc_id"]:
                raise CorruptDatabase(f"chunk {c} of {self.name} is in the index but not in its tables",
                                      hint=f"run: retrodb verify {self.root}")
            text = doc[1]
            cont = rows.get(r["continuation_id"]) if r["continuation_id"] is not None else None
            out[c] = {
                "doc_id": r["doc_id"], "position": r["position"], "text": text[r["char_start"]: r["char_end"]],
                "tokens": r["tokens"],
                "continuation": text[cont["char_start"]: cont["char_end"]] if cont else None,
                "continuation_tokens": cont["tokens"] if cont else [],
            }
        return out


class _Target:
    """One thing a query searches: an index unit (a segment's own HNSW index, or a shard of many segments), or
    a segment's keys searched exactly (no index yet, or `exact`)."""

    def __init__(self, root: Path, cache: dict, *, unit: dict | None = None, reader: _Reader | None = None):
        self.root = root
        self.cache = cache
        self.unit = unit
        self.reader = reader
        self.lock = threading.Lock()
        if unit is not None:
            self.name = unit["name"]
            self.kind = unit["kind"]
            self.live = int(unit["live"])
            self.dead_lo, self.dead_hi = self._dead()
            self.segment = unit.get("segment")
        else:
            self.name, self.kind, self.live = reader.name, "exact", reader.live
            self.dead_lo, self.dead_hi = reader.tomb_lo, reader.tomb_hi
            self.segment = reader.number
        self._ranges: np.ndarray | None = None

    def _dead(self) -> tuple[np.ndarray, np.ndarray]:
        rec = self.unit["files"].get("tombstones" if self.kind == "segment" else "dead")
        if not rec:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        key = ("dead", rec["path"])
        if key not in self.cache:
            from .shards import read_dead

            with reading(self.root, self.root / rec["path"]):
                r = read_dead(self.root, self.unit)
            self.cache[key] = (r[:, 0].copy(), r[:, 1].copy())
        return self.cache[key]

    def deleted(self, ids: np.ndarray) -> np.ndarray:
        return _in(ids, self.dead_lo, self.dead_hi)

    def ranges(self) -> np.ndarray:
        """[lo, hi, segment] rows of a shard (sorted by lo)."""
        if self._ranges is None:
            rec = self.unit["files"]["ranges"]
            key = ("ranges", rec["path"])
            if key not in self.cache:
                from .shards import read_ranges

                with reading(self.root, self.root / rec["path"]):
                    self.cache[key] = read_ranges(self.root, self.unit)
            self._ranges = self.cache[key]
        return self._ranges

    def store(self):
        """A shard's chunk store (the rows of the chunks it was built from), or None."""
        rec = (self.unit or {}).get("files", {}).get("store") if self.kind == "shard" else None
        if rec is None:
            return None
        key = ("store", rec["path"])
        if key not in self.cache:
            from .store import ChunkStore

            with reading(self.root, self.root / rec["path"]):
                self.cache[key] = ChunkStore(self.root / rec["path"])
        return self.cache[key]

    def holds(self, segment: int) -> bool:
        if self.kind != "shard":
            return self.segment == segment
        key = ("members", self.unit["files"]["ranges"]["path"])
        if key not in self.cache:
            self.cache[key] = frozenset(np.unique(self.ranges()[:, 2]).tolist())
        return segment in self.cache[key]

    def segments_of(self, labels: np.ndarray) -> np.ndarray:
        """The segment number of each chunk id (-1 where this target does not hold it)."""
        if self.kind != "shard":
            return np.full(labels.shape, self.segment, dtype=np.int64)
        r = self.ranges()
        at = np.searchsorted(r[:, 0], labels, side="right") - 1
        ok = (at >= 0) & (labels < r[np.maximum(at, 0), 1])
        return np.where(ok, r[np.maximum(at, 0), 2], -1)

    def index(self, dim: int, default_space: str):
        rec = self.unit["files"]["index"]
        dead = (self.unit["files"].get("tombstones" if self.kind == "segment" else "dead") or {}).get("path")
        key = ("index", rec["path"], dead)
        with self.lock:
            if key not in self.cache:
                hnswlib = require("hnswlib", "index")
                space = (params_of(rec["path"]) or {}).get("space", default_space)
                idx = hnswlib.Index(space=space, dim=dim)
                try:
                    idx.load_index(str(self.root / rec["path"]))
                except RuntimeError as exc:
                    raise CorruptDatabase(f"cannot load index {rec['path']}: {exc}",
                                          hint=f"run: retrodb verify {self.root}; rebuild it: retrodb index "
                                               f"{self.root} --rebuild") from None
                for lo, hi in zip(self.dead_lo.tolist(), self.dead_hi.tolist()):
                    for label in range(lo, hi):
                        try:
                            idx.mark_deleted(label)
                        except RuntimeError:  # not in this index (already gone)
                            pass
                self.cache[key] = idx
            return self.cache[key]

    def space(self, default_space: str) -> str:
        if self.unit is not None:
            p = params_of(self.unit["files"]["index"]["path"])
            if p:
                return p["space"]
        return default_space


def _in(ids: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """True where ids fall in any [lo, hi) (lo sorted, ranges disjoint)."""
    if not len(lo):
        return np.zeros(np.shape(ids), dtype=bool)
    at = np.searchsorted(lo, ids, side="right") - 1
    return (at >= 0) & (ids < hi[np.maximum(at, 0)])


def _row_group_ranges(md, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row group: min and max of `column` (from statistics; unknown: the widest range) and first row."""
    j = md.schema.to_arrow_schema().get_field_index(column)
    n = md.num_row_groups
    lo = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    hi = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        rg = md.row_group(i)
        starts[i + 1] = starts[i] + rg.num_rows
        st = rg.column(j).statistics
        if st is not None and st.has_min_max:
            lo[i], hi[i] = st.min, st.max
    return lo, hi, starts


class Searcher:
    """Searches one snapshot. Thread-safe; concurrent queries on one Searcher run one after another."""

    def __init__(self, snapshot: Snapshot, cache: dict | None = None, threads: int | None = None,
                 device: str = "auto"):
        from .executor import default_workers

        self.snapshot = snapshot
        self.root = Path(snapshot.root)
        self.cache = {} if cache is None else cache
        self.threads = threads or default_workers()
        self.device = device
        self.config = snapshot.config
        self._readers: dict[int, _Reader] = {}
        self._targets: list[_Target] | None = None
        self._last_from: dict[int, _Target] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._reader_lock = threading.Lock()

    # ------------------------------------------------------------ public

    def query(self, texts: str | list[str] | None = None, k: int = 4, *, ef: int = 64, exact: bool = False,
              exclude_doc: str | Iterable[str] | None = None, chunk_ids: Iterable[int] | None = None,
              exclude_same_doc: bool = True, vectors: np.ndarray | None = None,
              on_warning: Callable[[str], None] | None = None, overlap: bool = False) -> list[QueryResult]:
        """Neighbours of each query text (or chunk, or vector), best first. See `Database.query`."""
        with self._lock:
            hits, labels, asked, homes = self._hits(texts, chunk_ids, vectors, k, ef, exact, exclude_doc,
                                                    exclude_same_doc, on_warning)
            where = {cid: seg for row in hits for cid, _, seg in row}
            if labels is None:
                where.update(zip(asked, homes))
            payload = self._read_chunks(where)
            if labels is None:
                labels = [payload[cid]["text"] for cid in asked]
            out = []
            for i, row in enumerate(hits):
                neighbours = [_neighbour(r + 1, cid, score, payload[cid]) for r, (cid, score, _) in enumerate(row)]
                if overlap and vectors is None:
                    q_tokens = payload[asked[i]]["tokens"] if asked[i] is not None else self._tokens(labels[i])
                    neighbours = [with_overlap(n, q_tokens, self._tokenizer()) for n in neighbours]
                out.append(QueryResult(labels[i], neighbours, asked[i]))
            return out

    def nearest(self, texts: str | list[str], k: int = 4, *, ef: int = 64, exact: bool = False,
                exclude_doc: str | Iterable[str] | None = None,
                on_warning: Callable[[str], None] | None = None) -> list[list[tuple[int, float, str]]]:
        """Like `query` with texts, but only the neighbours' (chunk_id, score, segment), best first: no chunk
        or document text is read (for callers that want ids or stored tokens, as the model's live retrieval)."""
        with self._lock:
            return self._hits(texts, None, None, k, ef, exact, exclude_doc, True, on_warning)[0]

    def _hits(self, texts, chunk_ids, vectors, k: int, ef: int, exact: bool, exclude_doc, exclude_same_doc: bool,
              on_warning) -> tuple[list[list[tuple[int, float, str]]], list[str] | None, list, list]:
        """(hits, labels, asked chunk ids, their segments) of one query call; the caller holds the lock."""
        warn = on_warning or (lambda m: warnings.warn(m, QueryWarning, stacklevel=4))
        if k < 1:
            raise UsageError(f"k must be at least 1, not {k}")
        if ef < 1:
            raise UsageError(f"ef must be at least 1, not {ef}")
        modes = sum(x is not None for x in (texts, chunk_ids, vectors))
        if modes != 1:
            raise UsageError("give exactly one of: query texts, chunk ids, or vectors")
        self._check_searchable(warn)
        exclude = [exclude_doc] if isinstance(exclude_doc, str) else list(exclude_doc or [])
        common = self._doc_exclusions(exclude, warn)
        homes: list = []
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            if not texts or any(not t.strip() for t in texts):
                raise UsageError("empty query: every query needs some text",
                                 hint='retrodb query DB "some text" (or --file FILE, or --chunk-id N)')
            q = self._embed(texts)
            labels = texts
            exclusions = [common] * len(texts)
            asked = [None] * len(texts)
        elif vectors is not None:
            q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
            labels = [f"vector {i}" for i in range(len(q))]
            exclusions = [common] * len(q)
            asked = [None] * len(q)
        else:
            asked = [int(c) for c in chunk_ids]
            if not asked:
                raise UsageError("empty query: no chunk ids given", hint="retrodb query DB --chunk-id N")
            q, own, homes = self._chunk_keys(asked)
            exclusions = [common + (own[i] if exclude_same_doc else []) for i in range(len(asked))]
            labels = None
        dim = int(self.config["embedder"]["dim"])
        if q.ndim != 2 or q.shape[1] != dim:
            raise RetrodbError(f"query vectors have shape {q.shape}; this database's keys have dim {dim}")
        return self.search(q, k, ef=ef, exact=exact, exclusions=exclusions, warn=warn), labels, asked, homes

    def search(self, q: np.ndarray, k: int, *, ef: int = 64, exact: bool = False,
               exclusions: list[list[_Exclusion]] | None = None, warn=None) -> list[list[tuple[int, float, int]]]:
        """The global top k of each query row as (chunk_id, score, segment number), reading no chunk text."""
        warn = warn or (lambda m: warnings.warn(m, QueryWarning, stacklevel=3))
        q = np.ascontiguousarray(q, dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        exclusions = exclusions or [[] for _ in range(len(q))]
        targets = [t for t in (self.exact_targets() if exact else self.targets()) if t.live > 0]
        if not exact:
            missing = [t for t in targets if t.kind == "exact"]
            if missing:
                n = sum(t.live for t in missing)
                warn(f"{len(missing)} segment(s) ({n:,} chunks) have no index yet and were searched exactly "
                     f"(brute force); build them with: retrodb index {self.root}")
        threads_each = max(1, self.threads // max(1, len(targets)))

        def one(t: _Target):
            extra = max((sum(e.hi - e.lo for e in ex if t.holds(e.segment)) for ex in exclusions), default=0)
            m = min(k + extra, t.live)
            labels, scores = self.search_target(t, q, m, ef, threads_each)
            return t, labels, scores

        if len(targets) > 1 and self.threads > 1:
            results = list(self._executor().map(one, targets))
        else:
            results = [one(t) for t in targets]
        merged = self._merge(results, k, exclusions)
        self._last_from = {cid: t for row in merged for cid, _, _, t in row}  # which target found each winner
        return [[(cid, score, seg) for cid, score, seg, _ in row] for row in merged]

    def search_target(self, t: _Target, q: np.ndarray, m: int, ef: int, threads: int | None = None):
        """(chunk ids, scores) [n, m] of one target, best first; deleted chunks have score -inf."""
        threads = threads or self.threads
        if t.kind == "exact":
            labels, scores = self._exact(t.reader, q, m)
        else:
            labels, scores = self._hnsw(t, q, m, ef, threads)
        labels = np.asarray(labels, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32).copy()
        scores[t.deleted(labels.ravel()).reshape(labels.shape)] = -np.inf
        return labels, scores

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # ------------------------------------------------------------ parts

    def _tokenizer(self):
        from .tokenizer import load_tokenizer

        return load_tokenizer(self.config["tokenizer"]["path"])

    def _tokens(self, text: str) -> list[int]:
        return self._tokenizer().encode(text, add_special_tokens=False).ids

    def reader(self, number: int) -> _Reader | None:
        """The reader of a live segment (its group manifest is read the first time, then cached)."""
        with self._reader_lock:
            if number not in self._readers:
                seg = self.snapshot.segment(number)
                if seg is None:
                    return None
                self._readers[number] = _Reader(self.root, seg, self.cache)
            return self._readers[number]

    def targets(self) -> list[_Target]:
        """What a query searches: the snapshot's index units (from its root) and, exactly, the segments that have
        keys but no index yet (from the groups whose summary counts one)."""
        if self._targets is None:
            out = [_Target(self.root, self.cache, unit=u) for u in self.snapshot.index_units]
            for seg in self.snapshot.segments_where(lambda s: s["unindexed"] > 0):
                if "keys" in seg.files and not seg.indexed:
                    out.append(_Target(self.root, self.cache, reader=self.reader(seg.number)))
            self._targets = out
        return self._targets

    def exact_targets(self) -> list[_Target]:
        """Every segment with keys, searched by brute force (reads every group)."""
        return [_Target(self.root, self.cache, reader=self.reader(seg.number))
                for seg in self.snapshot.segments.values() if "keys" in seg.files]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="retrodb-query")
        return self._pool

    def _check_searchable(self, warn) -> None:
        t = self.snapshot.totals_summary
        if not t["segments"]:
            raise MissingStage(f"{self.root} (v{self.snapshot.version}) has no documents",
                               hint=f"run: retrodb ingest {self.root} SOURCE...")
        if not self.config.get("embedder") or t["without_keys"] == t["segments"]:
            raise MissingStage(f"{self.root} (v{self.snapshot.version}) has no keys yet, so nothing can be searched",
                               hint=f"run: retrodb embed {self.root}")
        if t["without_keys"]:
            warn(f"{t['without_keys']} segment(s) ({t['without_keys_chunks']:,} chunks) have no keys yet and were "
                 f"not searched; run: retrodb embed {self.root}")

    def _embed(self, texts: list[str]) -> np.ndarray:
        batch = len(texts) >= BATCH_QUERIES
        key = ("embedder", self.config["embedder"]["sha256"], self.device, batch)
        if key not in self.cache:
            from .embedder import embedder_for

            device, dtype = _query_device(self.device, self.config["embedder"])
            # many texts at once (the model's live retrieval in eval): the dtype `embed` would pick, bf16
            # where this CPU has it and it measures faster (the measuring costs a second, once per process)
            self.cache[key] = embedder_for(self.config, device=device, dtype="auto" if batch else dtype)
        embedder = self.cache[key]
        if getattr(embedder, "device", "cpu") != "cpu" or not hasattr(embedder, "torch") \
                or len(texts) > FEW_QUERIES:
            return np.asarray(embedder.embed(texts), dtype=np.float32)
        # A few short texts: one CPU thread. Several threads gain nothing on a batch this small, and where
        # the cores are busy their barriers can cost 50x (6 ms -> 480 ms measured on a loaded 2-vCPU VM).
        torch = embedder.torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return np.asarray(embedder.embed(texts), dtype=np.float32)
        finally:
            torch.set_num_threads(threads)

    def _doc_exclusions(self, doc_ids: list[str], warn) -> list[_Exclusion]:
        """The chunk ranges of live documents, found through the id index."""
        from .ids import lookup

        if not doc_ids:
            return []
        live, _ = lookup(self.snapshot, doc_ids)
        found = {d.doc_id for d in live}
        for doc_id in doc_ids:
            if doc_id not in found:
                warn(f"--exclude-doc {doc_id!r}: no such live document in v{self.snapshot.version}")
        return [_Exclusion(d.first_chunk_id, d.first_chunk_id + d.num_chunks, d.segment) for d in live]

    def _locate(self, chunk_id: int) -> tuple[_Reader, int]:
        """The segment and row of a live chunk: the shard that indexes it says which segment holds it; else the
        segment that wrote it (chunk ids carry it); else a segment a compaction wrote it into."""
        ids = np.array([chunk_id], dtype=np.int64)
        candidates = []
        for t in self.targets():
            if t.kind == "shard":
                n = int(t.segments_of(ids)[0])
                if n >= 0:
                    candidates.append(n)
        candidates.append(chunk_id >> 32)
        seen = set()
        for number in candidates + [None]:
            if number is None:  # compacted segments hold chunks of older segment numbers
                rest = [s.number for s in self.snapshot.segments_where(lambda s: s["compacted"] > 0)
                        if s.compacted_from and s.number not in seen]
            else:
                rest = [number]
            for n in rest:
                if n in seen:
                    continue
                seen.add(n)
                r = self.reader(n)
                if r is None or (r.rg_max.size and (r.rg_min.min() > chunk_id or r.rg_max.max() < chunk_id)):
                    continue
                row = r.row_of(chunk_id)
                if row is not None:
                    if r.deleted(ids)[0]:
                        break
                    return r, row
        raise RetrodbError(f"chunk {chunk_id} is not in {self.root} at v{self.snapshot.version} "
                           "(never existed, or deleted)",
                           hint=f'find chunk ids with: retrodb sql {self.root} "SELECT chunk_id, doc_id FROM chunks LIMIT 5"')

    def _chunk_keys(self, chunk_ids: list[int]) -> tuple[np.ndarray, list[list[_Exclusion]], list[int]]:
        """The stored keys of chunks, the id ranges of their documents, and their segments."""
        rows, own, homes = [], [], []
        for cid in chunk_ids:
            r, row = self._locate(cid)
            if "keys" not in r.files:
                raise MissingStage(f"chunk {cid} is in {r.name}, which has no keys yet",
                                   hint=f"run: retrodb embed {self.root}")
            rows.append(np.asarray(r.keys()[row], dtype=np.float32))
            span = r.doc_range_of_chunk(cid)
            own.append([_Exclusion(*span, r.number)] if span else [])
            homes.append(r.number)
        return np.stack(rows), own, homes

    def _hnsw(self, t: _Target, q: np.ndarray, m: int, ef: int, threads: int):
        idx = t.index(int(self.config["embedder"]["dim"]), self._default_space())
        with t.lock:  # ef is per index: one search at a time on a given index
            for breadth in (max(ef, m), max(4 * ef, 4 * m)):
                idx.set_ef(breadth)
                try:
                    labels, dist = idx.knn_query(q, k=m, num_threads=threads)
                    return labels.astype(np.int64), 1.0 - dist
                except RuntimeError:  # fewer than m live neighbours reachable at this breadth
                    continue
        return self._exact_unit(t, q, m)

    def _exact_unit(self, t: _Target, q: np.ndarray, m: int):
        """A unit whose graph could not give m live results: its segments' keys, exactly."""
        numbers = [t.segment] if t.kind != "shard" else sorted(set(t.ranges()[:, 2].tolist()))
        parts = [self._exact(r, q, m) for n in numbers if (r := self.reader(n)) is not None]
        if not parts:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        labels = np.concatenate([p[0] for p in parts], axis=1)
        scores = np.concatenate([p[1] for p in parts], axis=1)
        return labels, scores

    def _exact(self, seg: _Reader, q: np.ndarray, m: int):
        keys = seg.keys(keep=False)
        ids = seg.chunk_ids()
        dead = seg.deleted(ids)
        cosine = self._default_space() == "cosine"
        n = len(keys)
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(q), 0), dtype=np.int64)
        block = max(1024, EXACT_BLOCK // max(1, len(q)))
        for start in range(0, n, block):
            kb = np.asarray(keys[start: start + block], dtype=np.float32)
            if cosine:
                kb /= np.maximum(np.linalg.norm(kb, axis=1, keepdims=True), 1e-12)
            s = q @ kb.T
            s[:, dead[start: start + block]] = -np.inf
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(kb)), s.shape)], axis=1)
            if cand_s.shape[1] > m:
                top = np.argpartition(-cand_s, m - 1, axis=1)[:, :m]
                cand_s = np.take_along_axis(cand_s, top, axis=1)
                cand_i = np.take_along_axis(cand_i, top, axis=1)
            best_s, best_i = cand_s, cand_i
        return ids[best_i], best_s

    def _default_space(self) -> str:
        return (self.config.get("index") or DEFAULT_PARAMS)["space"]

    def _merge(self, results, k: int, exclusions: list[list[_Exclusion]]) -> list[list[tuple]]:
        """Per query row, the global top k as (chunk_id, score, segment number, target)."""
        out = []
        for i, ex in enumerate(exclusions):
            ids, scores, segs, where = [], [], [], []
            for j, (t, labels, sc) in enumerate(results):
                lab, s = labels[i], sc[i]
                keep = np.isfinite(s) & ~t.deleted(lab)
                for e in ex:
                    keep &= (lab < e.lo) | (lab >= e.hi)
                ids.append(lab[keep])
                scores.append(s[keep].astype(np.float64))
                segs.append(t.segments_of(lab[keep]))
                where.append(np.full(int(keep.sum()), j))
            ids_a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            if not len(ids_a):
                out.append([])
                continue
            sc_a, seg_a, at_a = np.concatenate(scores), np.concatenate(segs), np.concatenate(where)
            ids_a, first = np.unique(ids_a, return_index=True)  # a chunk in two targets (compacted) counts once
            sc_a, seg_a, at_a = sc_a[first], seg_a[first], at_a[first]
            order = np.lexsort((ids_a, -sc_a))[:k]
            out.append([(int(ids_a[j]), float(sc_a[j]), int(seg_a[j]), results[int(at_a[j])][0]) for j in order])
        return out

    def _read_chunks(self, where: dict[int, int]) -> dict[int, dict]:
        """Rows of the given chunks (by segment number) with their text, continuation text and tokens: from the
        store of the shard that found them (one open file, whatever the number of segments), else from their
        segment's."""
        out: dict[int, dict] = {}
        by_store: dict[int, tuple] = {}
        for cid in where:
            t = self._last_from.get(cid)
            store = t.store() if t is not None else None
            if store is not None:
                by_store.setdefault(id(store), (store, []))[1].append(cid)
        for store, ids in by_store.values():
            with reading(self.root, store.path):
                out.update(store.read(ids))
        by_seg: dict[int, list[int]] = {}
        for cid, number in where.items():
            if cid not in out:
                by_seg.setdefault(number, []).append(cid)
        jobs = [(self.reader(n), ids) for n, ids in by_seg.items()]
        missing = [n for (r, _), n in zip(jobs, by_seg) if r is None]
        if missing:
            raise CorruptDatabase(f"an index of {self.root} names a chunk of {segment_name(missing[0])}, which is not "
                                  f"in snapshot v{self.snapshot.version}", hint=f"run: retrodb verify {self.root}")
        if len(jobs) > 1 and self.threads > 1 and not all("store" in r.files for r, _ in jobs):
            parts = list(self._executor().map(lambda job: job[0].read(job[1]), jobs))  # Parquet releases the GIL
        else:
            parts = [r.read(ids) for r, ids in jobs]
        out.update({cid: row for part in parts for cid, row in part.items()})
        return out


def _query_device(device: str, identity: dict) -> tuple[str, str]:
    """Device and dtype for embedding a few queries: fp32 on the CPU, without the embedder's timing of
    bf16 against fp32 (seconds per process, worth it for a corpus, not for a query)."""
    if identity.get("kind") == "hash":
        return "cpu", "fp32"
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "cuda", "auto"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps", "auto"
        device = "cpu"
    return device, "fp32" if device == "cpu" else "auto"


def _neighbour(rank: int, chunk_id: int, score: float, row: dict) -> Neighbour:
    return Neighbour(rank=rank, score=round(score, 6), chunk_id=chunk_id, doc_id=row["doc_id"],
                     position=row["position"], text=row["text"], continuation=row["continuation"],
                     tokens=row["tokens"], continuation_tokens=row["continuation_tokens"])


def with_overlap(n: Neighbour, query_tokens: list[int], tokenizer) -> Neighbour:
    """`n` with `r` and `overlap` set: the longest token run the query shares with its [N, F], and where that
    run lies in its text and continuation (character spans; None where re-tokenising the text does not give
    the stored tokens back, so no span can be trusted)."""
    from dataclasses import replace

    from .overlap import longest_common_run

    value = list(n.tokens) + list(n.continuation_tokens)
    run = longest_common_run(query_tokens, value)
    info = {"tokens": run.length, "query_start": run.a_start, "start": run.b_start,
            "text_span": None, "continuation_span": None}
    if run.length:
        cut = len(n.tokens)
        parts = (("text_span", n.text, n.tokens, run.b_start, min(run.b_start + run.length, cut)),
                 ("continuation_span", n.continuation or "", n.continuation_tokens,
                  max(run.b_start, cut) - cut, run.b_start + run.length - cut))
        for key, text, tokens, a, b in parts:
            if b > a:
                info[key] = _char_span(tokenizer, text, tokens, a, b)
    r = run.length / len(query_tokens) if len(query_tokens) else 0.0
    return replace(n, r=round(r, 6), overlap=info)


def _char_span(tokenizer, text: str, tokens: list[int], a: int, b: int) -> list[int] | None:
    """Character span of tokens a .. b-1 of `text`, whose stored tokens are `tokens`."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    if list(enc.ids) != list(tokens):
        return None
    return [int(enc.offsets[a][0]), int(enc.offsets[b - 1][1])]


def searcher_for(db, threads: int | None = None, device: str = "auto") -> Searcher:
    """The Searcher kept in a Database handle, renewed when the handle moves to another snapshot.

    Loaded indexes, key memmaps and Parquet metadata of files the new snapshot
    still references stay cached; the rest is dropped.
    """
    searcher = db.__dict__.get("_searcher")
    if searcher is not None and searcher.snapshot is db.snapshot and searcher.device == device \
            and (threads is None or threads == searcher.threads):
        return searcher
    cache = db.__dict__.setdefault("_query_cache", {})
    if searcher is not None:
        searcher.close()
        from .database import referenced

        for key in [key for key in cache if not all(referenced(db.snapshot, p) for p in _paths_in(key))]:
            del cache[key]
    searcher = Searcher(db.snapshot, cache, threads=threads, device=device)
    db.__dict__["_searcher"] = searcher
    return searcher


def _paths_in(key: tuple) -> list[str]:
    """The database files a cache entry was built from: the elements of its key that are database paths."""
    return [p for p in key[1:] if isinstance(p, str) and p.split("/")[0] in ("segments", "indexes")]
