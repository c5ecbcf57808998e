"""Nearest-neighbour queries over one snapshot: search every segment, merge, read only the winners.

Each live segment is searched on its own (its HNSW index, or brute force over
its memory-mapped keys with `exact`), all segments at once on a thread pool
(hnswlib and NumPy release the GIL). Tombstoned chunks are marked deleted in
the loaded index, so the graph search skips them without losing neighbours;
chunks excluded for one query (its own document) are over-fetched for and
dropped. The per-segment candidates are merged into the global top k, and the
chunk rows, document texts and continuations are read for the winners alone,
from the Parquet row groups whose chunk_id statistics contain them.

A `Searcher` keeps what it loaded (indexes, key memmaps, Parquet metadata)
for the next query; `Database.query` keeps one per database handle. Cache
keys name the files an entry was built from, and an entry goes as soon as
one of them is no longer in the handle's snapshot (an index loaded with
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
from .snapshot import Snapshot
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
    segment: str  # where those chunks live (over-fetch is needed there only)


class _Segment:
    """What queries need of one segment, loaded lazily and kept."""

    def __init__(self, root: Path, name: str, seg: dict, cache: dict):
        import pyarrow.parquet as pq

        self.root = root
        self.name = name
        self.seg = seg
        self.files = seg["files"]
        self.cache = cache
        self.lock = threading.Lock()
        self.chunk_path = root / self.files["chunks"]["path"]
        self.doc_path = root / self.files["documents"]["path"]
        with reading(root, self.chunk_path):
            self.chunk_md = pq.read_metadata(self.chunk_path)
        self.rg_min, self.rg_max, self.rg_start = _row_group_ranges(self.chunk_md, "chunk_id")
        self.tomb_lo, self.tomb_hi = self._tombstones()
        self.live = int(seg["chunks"]) - int((self.tomb_hi - self.tomb_lo).sum())
        self._ids: np.ndarray | None = None
        self._docs: tuple | None = None
        self._doc_ids = None

    # -- tombstones
    def _tombstones(self) -> tuple[np.ndarray, np.ndarray]:
        rec = self.files.get("tombstones")
        if not rec:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        key = ("tombstones", rec["path"], rec["sha256"])
        if key not in self.cache:
            import pyarrow.parquet as pq

            with reading(self.root, self.root / rec["path"]):
                t = pq.read_table(self.root / rec["path"], columns=["first_chunk_id", "num_chunks"])
            lo = t["first_chunk_id"].to_numpy().astype(np.int64)
            hi = lo + t["num_chunks"].to_numpy().astype(np.int64)
            order = np.argsort(lo, kind="stable")
            self.cache[key] = (lo[order], hi[order])
        return self.cache[key]

    def deleted(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `ids` are tombstoned in this snapshot."""
        if not len(self.tomb_lo):
            return np.zeros(len(ids), dtype=bool)
        at = np.searchsorted(self.tomb_lo, ids, side="right") - 1
        return (at >= 0) & (ids < self.tomb_hi[np.maximum(at, 0)])

    # -- keys and ids
    def keys(self) -> np.ndarray:
        key = ("keys", self.files["keys"]["path"])
        if key not in self.cache:
            self.cache[key] = open_keys(self.root, self.seg)
        return self.cache[key]

    @_reads("chunk_path")
    def chunk_ids(self) -> np.ndarray:
        if self._ids is None:
            key = ("chunk_ids", self.files["chunks"]["path"])
            if key not in self.cache:
                self.cache[key] = read_chunk_ids(self.root, self.seg)
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

    # -- index
    def has_index(self) -> bool:
        return "index" in self.files

    def index(self, dim: int, default_space: str):
        rec = self.files["index"]
        tomb = self.files.get("tombstones", {}).get("path")
        key = ("index", rec["path"], tomb)
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
                for lo, hi in zip(self.tomb_lo.tolist(), self.tomb_hi.tolist()):
                    for label in range(lo, hi):
                        try:
                            idx.mark_deleted(label)
                        except RuntimeError:  # not in this index (already gone)
                            pass
                self.cache[key] = idx
            return self.cache[key]

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

    @_reads("doc_path")
    def doc_ranges(self, doc_id: str) -> list[tuple[int, int]]:
        """Chunk id ranges of the live document `doc_id` in this segment (empty if it is not here)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if self._doc_ids is None:
            key = ("doc_ids", self.files["documents"]["path"])
            if key not in self.cache:
                self.cache[key] = pq.read_table(self.doc_path, columns=["doc_id"]).column(0).combine_chunks()
            self._doc_ids = self.cache[key]
        rows = np.flatnonzero(pc.equal(self._doc_ids, pa.scalar(doc_id)).to_numpy(zero_copy_only=False))
        first, count, *_ = self.doc_table()
        out = [(int(first[r]), int(first[r] + count[r])) for r in rows]
        return [(lo, hi) for lo, hi in out if not self.deleted(np.array([lo]))[0]]

    def doc_range_of_chunk(self, chunk_id: int) -> tuple[int, int] | None:
        first, count, order, _, _ = self.doc_table()
        at = np.searchsorted(first[order], chunk_id, side="right") - 1
        if at < 0:
            return None
        row = order[at]
        return (int(first[row]), int(first[row] + count[row])) if chunk_id < first[row] + count[row] else None

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
        self._segments: dict[str, _Segment] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

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
               exclusions: list[list[_Exclusion]] | None = None, warn=None) -> list[list[tuple[int, float, str]]]:
        """The global top k of each query row as (chunk_id, score, segment), reading no chunk text."""
        warn = warn or (lambda m: warnings.warn(m, QueryWarning, stacklevel=3))
        q = np.ascontiguousarray(q, dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        exclusions = exclusions or [[] for _ in range(len(q))]
        segs = [s for s in self.segments().values() if "keys" in s.files and s.live > 0]
        if not exact:
            missing = [s for s in segs if not s.has_index()]
            if missing:
                n = sum(s.live for s in missing)
                warn(f"{len(missing)} segment(s) ({n:,} chunks) have no index yet and were searched exactly "
                     f"(brute force); build them with: retrodb index {self.root}")
        threads_each = max(1, self.threads // max(1, len(segs)))

        def one(seg: _Segment):
            extra = max((sum(e.hi - e.lo for e in ex if e.segment == seg.name) for ex in exclusions), default=0)
            m = min(k + extra, seg.live)
            if exact or not seg.has_index():
                return seg.name, *self._exact(seg, q, m)
            return seg.name, *self._hnsw(seg, q, m, ef, threads_each)

        if len(segs) > 1 and self.threads > 1:
            results = list(self._executor().map(one, segs))
        else:
            results = [one(s) for s in segs]
        return self._merge(results, k, exclusions)

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

    def segments(self) -> dict[str, _Segment]:
        if self._segments is None:
            self._segments = {n: _Segment(self.root, n, s, self.cache) for n, s in sorted(self.snapshot.segments.items())}
        return self._segments

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="retrodb-query")
        return self._pool

    def _check_searchable(self, warn) -> None:
        segs = self.snapshot.segments
        if not segs:
            raise MissingStage(f"{self.root} (v{self.snapshot.version}) has no documents",
                               hint=f"run: retrodb ingest {self.root} SOURCE...")
        if not self.config.get("embedder") or not any("keys" in s["files"] for s in segs.values()):
            raise MissingStage(f"{self.root} (v{self.snapshot.version}) has no keys yet, so nothing can be searched",
                               hint=f"run: retrodb embed {self.root}")
        without = [n for n, s in segs.items() if "keys" not in s["files"]]
        if without:
            n = sum(segs[s]["chunks"] for s in without)
            warn(f"{len(without)} segment(s) ({n:,} chunks) have no keys yet and were not searched; "
                 f"run: retrodb embed {self.root}")

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
        out = []
        for doc_id in doc_ids:
            found = [_Exclusion(lo, hi, s.name) for s in self.segments().values() for lo, hi in s.doc_ranges(doc_id)]
            if not found:
                warn(f"--exclude-doc {doc_id!r}: no such live document in v{self.snapshot.version}")
            out.extend(found)
        return out

    def _locate(self, chunk_id: int) -> tuple[_Segment, int]:
        """The segment and row of a live chunk; its own segment first (chunk ids carry it), then the others."""
        segs = self.segments()
        home = f"seg-{chunk_id >> 32:06d}"
        order = ([segs[home]] if home in segs else []) + [s for n, s in segs.items() if n != home]
        for seg in order:
            if seg.rg_max.size and (seg.rg_min.min() > chunk_id or seg.rg_max.max() < chunk_id):
                continue
            row = seg.row_of(chunk_id)
            if row is not None:
                if seg.deleted(np.array([chunk_id]))[0]:
                    break
                return seg, row
        raise RetrodbError(f"chunk {chunk_id} is not in {self.root} at v{self.snapshot.version} "
                           "(never existed, or deleted)",
                           hint=f'find chunk ids with: retrodb sql {self.root} "SELECT chunk_id, doc_id FROM chunks LIMIT 5"')

    def _chunk_keys(self, chunk_ids: list[int]) -> tuple[np.ndarray, list[list[_Exclusion]], list[str]]:
        """The stored keys of chunks, the id ranges of their documents, and their segments."""
        rows, own, homes = [], [], []
        for cid in chunk_ids:
            seg, row = self._locate(cid)
            if "keys" not in seg.files:
                raise MissingStage(f"chunk {cid} is in {seg.name}, which has no keys yet",
                                   hint=f"run: retrodb embed {self.root}")
            rows.append(np.asarray(seg.keys()[row], dtype=np.float32))
            span = seg.doc_range_of_chunk(cid)
            own.append([_Exclusion(*span, seg.name)] if span else [])
            homes.append(seg.name)
        return np.stack(rows), own, homes

    def _hnsw(self, seg: _Segment, q: np.ndarray, m: int, ef: int, threads: int):
        idx = seg.index(int(self.config["embedder"]["dim"]), (self.config.get("index") or DEFAULT_PARAMS)["space"])
        with seg.lock:  # ef is per index: one search at a time on a given segment
            for breadth in (max(ef, m), max(4 * ef, 4 * m)):
                idx.set_ef(breadth)
                try:
                    labels, dist = idx.knn_query(q, k=m, num_threads=threads)
                    return labels.astype(np.int64), 1.0 - dist
                except RuntimeError:  # fewer than m live neighbours reachable at this breadth
                    continue
        return self._exact(seg, q, m)

    def _exact(self, seg: _Segment, q: np.ndarray, m: int):
        keys = seg.keys()
        ids = seg.chunk_ids()
        dead = seg.deleted(ids)
        cosine = self._space(seg) == "cosine"
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

    def _space(self, seg: _Segment) -> str:
        if seg.has_index():
            p = params_of(seg.files["index"]["path"])
            if p:
                return p["space"]
        return (self.config.get("index") or DEFAULT_PARAMS)["space"]

    def _merge(self, results, k: int, exclusions: list[list[_Exclusion]]) -> list[list[tuple[int, float, str]]]:
        segs = self.segments()
        out = []
        for i, ex in enumerate(exclusions):
            ids, scores, names = [], [], []
            for name, labels, sc in results:
                lab, s = labels[i], sc[i]
                keep = np.isfinite(s) & ~segs[name].deleted(lab)
                for e in ex:
                    keep &= (lab < e.lo) | (lab >= e.hi)
                ids.append(lab[keep])
                scores.append(s[keep].astype(np.float64))
                names.extend([name] * int(keep.sum()))
            if not names:
                out.append([])
                continue
            ids_a, sc_a = np.concatenate(ids), np.concatenate(scores)
            order = np.lexsort((ids_a, -sc_a))[:k]
            out.append([(int(ids_a[j]), float(sc_a[j]), names[j]) for j in order])
        return out

    def _read_chunks(self, where: dict[int, str]) -> dict[int, dict]:
        """Rows of the given chunks (by segment) with their text, continuation text and tokens."""
        by_seg: dict[str, list[int]] = {}
        for cid, name in where.items():
            by_seg.setdefault(name, []).append(cid)
        segs = self.segments()
        jobs = [(segs[name], ids) for name, ids in by_seg.items()]
        if len(jobs) > 1 and self.threads > 1:  # Parquet decoding releases the GIL
            parts = list(self._executor().map(lambda job: self._read_segment_chunks(*job), jobs))
        else:
            parts = [self._read_segment_chunks(*job) for job in jobs]
        return {cid: row for part in parts for cid, row in part.items()}

    def _read_segment_chunks(self, seg: _Segment, ids: list[int]) -> dict[int, dict]:
        rows = seg.chunk_rows(ids + [c + 1 for c in ids])  # continuations are (almost always) the next id
        missing = [r["continuation_id"] for c in ids if (r := rows.get(c)) and r["continuation_id"] is not None
                   and r["continuation_id"] not in rows]
        rows.update(seg.chunk_rows(missing))
        firsts = {c: c - rows[c]["position"] for c in ids if c in rows}
        docs = seg.doc_texts(firsts.values())
        out = {}
        for c in ids:
            r = rows.get(c)
            doc = docs.get(firsts.get(c)) if r else None
            if r is None or doc is None or doc[0] != r["doc_id"]:
                raise CorruptDatabase(f"chunk {c} of {seg.name} is in the index but not in its tables",
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
        live = {f["path"] for f in db.snapshot.files()}
        for key in [key for key in cache if not all(p in live for p in _paths_in(key))]:
            del cache[key]
    searcher = Searcher(db.snapshot, cache, threads=threads, device=device)
    db.__dict__["_searcher"] = searcher
    return searcher


def _paths_in(key: tuple) -> list[str]:
    """The database files a cache entry was built from: the elements of its key that are segment paths."""
    return [p for p in key[1:] if isinstance(p, str) and p.startswith("segments/")]
