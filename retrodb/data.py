"""The RETRO training dataset: token windows of documents, each chunk with its stored neighbours as [N, F] tokens.

    from retrodb.data import RetroDataset, collate
    ds = RetroDataset("my-db", seq_len=512, k=2, split="train")
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate)

An item is a window of `seq_len` tokens of ONE document (windows never cross documents)
starting at a chunk boundary, with, for each of its C = seq_len / m chunks, the k
neighbours `retrodb neighbours` stored for that chunk, as the neighbour chunk's tokens
followed by its continuation's (2m tokens, padded, with a mask). Neighbours are
filtered at read time: a deleted chunk (tombstoned, or compacted away) is skipped and the
next stored one (the margin) takes its rank; a neighbour is never from the item's own
document, from `exclude_docs`, nor, for the training split, from a validation document
(so validation text never reaches training through retrieval). The split is by a hash
of the document id (sha256), the same on every machine.

Reading is by chunk id: the Parquet row group whose chunk_id statistics hold an id is
read and kept in an LRU cache of `cache_groups` decoded groups (default 128, about
0.5-1 MB each), so memory is bounded by the cache, not by the database (the map-style
dataset also keeps an index of its documents, about 20 bytes each plus the ids; the
iterable one streams them). DataLoader workers each get their own cache.

An item (m = the chunk size, C = seq_len / m; pad id 0, masks say what is real):
    input_ids       int64 (seq_len,)      tokens[s : s+seq_len] of one document, s a multiple of m
    targets         int64 (seq_len,)      tokens[s+1 : s+seq_len+1], -100 where there is none
    neighbours      int64 (C, k, 2m)      per input chunk, its k neighbours' tokens then their continuations'
    neighbour_mask  bool  (C, k, 2m)      True where `neighbours` holds a real token
    chunk_ids       int64 (C,)            stored chunk id of each input chunk (-1: padding chunk)
    neighbour_ids   int64 (C, k)          chunk ids of the neighbours (-1 where fewer than k remain)
    doc_id          str
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .database import Database
from .errors import MissingStage, RetrodbError

PAD_ID = 0
IGNORE_INDEX = -100
CACHE_GROUPS = 128  # decoded Parquet row groups kept per reader (about 0.5-1 MB each: ~4k chunks of ingest)


def split_of(doc_id: str, val_fraction: float = 0.02) -> str:
    """"train" or "val" for a document id: the first 8 bytes of its sha256 against `val_fraction`."""
    if not 0.0 <= val_fraction <= 1.0:
        raise RetrodbError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0 ** 64 else "train"


def _open(db, at: int | None = None) -> Database:
    if isinstance(db, Database):
        return db if at is None or db.version == at else Database(db.root, at)
    return Database(Path(db), at)


class _LRU(OrderedDict):
    def __init__(self, size: int = CACHE_GROUPS):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class _Groups:
    """Row groups of one Parquet file addressed by chunk id: min/max statistics, decoded groups cached."""

    def __init__(self, path: Path, columns: list[str], cache: _LRU, key_column: str = "chunk_id"):
        import pyarrow.parquet as pq

        from .query import _row_group_ranges

        self.path = path
        self.columns = columns
        self.cache = cache
        self.file = pq.ParquetFile(path)
        self.lo, self.hi, _ = _row_group_ranges(self.file.metadata, key_column)
        self.key_column = key_column

    def candidates(self, chunk_id: int) -> np.ndarray:
        return np.flatnonzero((self.lo <= chunk_id) & (self.hi >= chunk_id))

    def group(self, g: int) -> dict:
        def load():
            t = self.file.read_row_group(int(g), columns=self.columns)
            out = {}
            for name in self.columns:
                col = t[name].combine_chunks()
                if name == "tokens":  # kept in their stored type; a chunk's slice is converted when read
                    out["offsets"] = col.offsets.to_numpy()
                    out["values"] = col.values.to_numpy()
                elif name == "doc_id":  # kept as Arrow: one value is decoded when asked for
                    out[name] = col
                else:
                    out[name] = col.fill_null(-1).to_numpy() if col.null_count else col.to_numpy()
            keys = out[self.key_column]
            out["order"] = np.argsort(keys, kind="stable")  # stable: rows of one chunk stay in rank order
            out["sorted"] = keys[out["order"]]
            return out

        return self.cache.get_or((str(self.path), int(g)), load)

    def rows(self, chunk_id: int):
        """(group dict, row indexes in it) of the rows whose key is `chunk_id`, first group that has any."""
        for g in self.candidates(chunk_id):
            d = self.group(g)
            a, b = np.searchsorted(d["sorted"], [chunk_id, chunk_id + 1])
            if b > a:
                return d, d["order"][a:b]
        return None, None


class ChunkStore:
    """Tokens, documents and continuations of chunks of one snapshot, by chunk id; deleted chunks are not found."""

    COLUMNS = ["chunk_id", "doc_id", "tokens", "continuation_id"]

    def __init__(self, snapshot, cache_groups: int = CACHE_GROUPS):
        from . import tombstones

        self.snapshot = snapshot
        self.root = Path(snapshot.root)
        self.cache = _LRU(cache_groups)
        self.names = sorted(snapshot.segments)
        self._groups: dict[str, _Groups] = {}
        self._dead: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._compacted = [n for n in self.names if snapshot.segments[n].get("compacted_from")]
        for name in self.names:
            seg = snapshot.segments[name]
            t = tombstones.read(self.root, seg)
            lo = t["first_chunk_id"].to_numpy().astype(np.int64)
            hi = lo + t["num_chunks"].to_numpy().astype(np.int64)
            order = np.argsort(lo)
            self._dead[name] = (lo[order], hi[order])

    def __getstate__(self) -> dict:  # DataLoader workers started with spawn: open files again there
        state = dict(self.__dict__)
        state["_groups"], state["cache"] = {}, _LRU(self.cache.size)
        return state

    def _segment(self, name: str) -> _Groups:
        if name not in self._groups:
            seg = self.snapshot.segments[name]
            self._groups[name] = _Groups(self.root / seg["files"]["chunks"]["path"], self.COLUMNS, self.cache)
        return self._groups[name]

    def _candidates(self, chunk_id: int) -> list[str]:
        home = f"seg-{chunk_id >> 32:06d}"
        out = [home] if home in self.snapshot.segments else []
        for name in self._compacted:  # compacted segments hold chunks of older segment numbers
            g = self._segment(name)
            if name != home and len(g.lo) and g.lo.min() <= chunk_id <= g.hi.max():
                out.append(name)
        return out

    def deleted(self, name: str, chunk_id: int) -> bool:
        lo, hi = self._dead[name]
        at = np.searchsorted(lo, chunk_id, side="right") - 1
        return bool(at >= 0 and chunk_id < hi[at])

    def find(self, chunk_id: int):
        """(segment name, group dict, row) of a live chunk, or None (never existed, deleted, compacted away)."""
        for name in self._candidates(int(chunk_id)):
            d, rows = self._segment(name).rows(int(chunk_id))
            if d is not None:
                return None if self.deleted(name, int(chunk_id)) else (name, d, int(rows[0]))
        return None

    @staticmethod
    def tokens_of(d: dict, row: int) -> np.ndarray:
        return d["values"][d["offsets"][row]: d["offsets"][row + 1]].astype(np.int64)

    def value(self, chunk_id: int, m: int, hit=None) -> tuple[np.ndarray, np.ndarray] | None:
        """RETRO's [N, F] of a live chunk: its tokens then its continuation's (2m, PAD_ID-padded) and the mask.
        `hit`: the chunk's `find` result, if already looked up."""
        hit = hit or self.find(chunk_id)
        if hit is None:
            return None
        name, d, row = hit
        toks = self.tokens_of(d, row)[:m]
        cont = int(d["continuation_id"][row])
        nxt = np.zeros(0, dtype=np.int64)
        if cont >= 0:
            d2, rows2 = self._segment(name).rows(cont)
            if d2 is not None:
                nxt = self.tokens_of(d2, int(rows2[0]))[:m]
        out = np.full(2 * m, PAD_ID, dtype=np.int64)
        mask = np.zeros(2 * m, dtype=bool)
        out[: len(toks)], mask[: len(toks)] = toks, True
        out[m: m + len(nxt)], mask[m: m + len(nxt)] = nxt, True
        return out, mask


def _store(db: Database) -> ChunkStore:
    """The ChunkStore kept in a database handle, renewed when the handle moves to another snapshot."""
    store = db.__dict__.get("_chunk_store")
    if store is None or store.snapshot is not db.snapshot:
        store = db.__dict__["_chunk_store"] = ChunkStore(db.snapshot)
    return store


def neighbour_tokens(db, neighbour_ids, m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, F] token ids of chunk ids: an int64 array [..., k] -> (tokens int64 [..., k, 2m], mask bool [..., k, 2m]).

    -1, and any id that is not a live chunk of the snapshot, gives all padding (PAD_ID, mask False). For
    live retrieval after `db.query(...)`: `neighbour_tokens(db, ids, db.config["chunk_size"])`.
    """
    db = _open(db)
    m = m or db.snapshot.chunk_size
    ids = np.asarray(neighbour_ids, dtype=np.int64)
    tokens = np.full(ids.shape + (2 * m,), PAD_ID, dtype=np.int64)
    mask = np.zeros(ids.shape + (2 * m,), dtype=bool)
    store = _store(db)
    flat_t, flat_m = tokens.reshape(-1, 2 * m), mask.reshape(-1, 2 * m)
    for i, cid in enumerate(ids.reshape(-1).tolist()):
        if cid >= 0:
            v = store.value(cid, m)
            if v is not None:
                flat_t[i], flat_m[i] = v
    return tokens, mask


class _Windows:
    """Shared by the two datasets: the snapshot, its stores, and how one item is assembled."""

    def __init__(self, db, seq_len: int, k: int, split: str | None, val_fraction: float, at: int | None,
                 exclude_docs=(), cache_groups: int = CACHE_GROUPS):
        self.db = _open(db, at)
        snap = self.db.snapshot
        self.m = snap.chunk_size
        if seq_len < self.m or seq_len % self.m:
            raise RetrodbError(f"seq_len {seq_len} must be a positive multiple of the chunk size {self.m}")
        if k < 1:
            raise RetrodbError(f"k must be at least 1, not {k}")
        if split not in (None, "train", "val"):
            raise RetrodbError(f"split must be None, 'train' or 'val', not {split!r}")
        split_of("", val_fraction)  # validates the fraction
        self.seq_len, self.k, self.split, self.val_fraction = seq_len, k, split, val_fraction
        self.chunks = seq_len // self.m
        self.exclude = set(exclude_docs)
        missing = sorted(n for n, s in snap.segments.items()
                         if "neighbours" not in s["files"] and s["chunks"] > s.get("deleted_chunks", 0))
        if missing:
            raise MissingStage(f"{self.db.root} (v{snap.version}): {len(missing)} segment(s) have no stored "
                               f"neighbours ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})",
                               hint=f"run: retrodb neighbours {self.db.root}")
        stored_k = (snap.config.get("neighbours") or {}).get("k", k)
        if stored_k < k:
            raise RetrodbError(f"the stored neighbours have k={stored_k}, fewer than the k={k} asked for",
                               hint=f"run: retrodb neighbours {self.db.root} --refresh --k {k}")
        self.store = ChunkStore(snap, cache_groups)
        self._nb: dict[str, _Groups] = {}
        self._split_cache: dict[str, bool] = {}

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: reopen the snapshot there
        state = dict(self.__dict__)
        state["db"] = (str(self.db.root), self.db.version)
        state["_nb"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        root, version = state["db"]
        state["db"] = Database(root, version)
        self.__dict__.update(state)
        self.store.snapshot = self.db.snapshot

    # -- which documents
    def keep_doc(self, doc_id: str) -> bool:
        if doc_id in self.exclude:
            return False
        return self.split is None or split_of(doc_id, self.val_fraction) == self.split

    def neighbour_allowed(self, doc_id: str) -> bool:
        if doc_id in self.exclude:
            return False
        if self.split != "train":
            return True
        ok = self._split_cache.get(doc_id)
        if ok is None:
            ok = self._split_cache[doc_id] = split_of(doc_id, self.val_fraction) == "train"
            if len(self._split_cache) > 1 << 16:
                self._split_cache.clear()
        return ok

    def documents(self, name: str):
        """Batches of (doc_ids, first_chunk_ids, num_chunks) of the live, kept documents of a segment."""
        import pyarrow.parquet as pq

        seg = self.db.snapshot.segments[name]
        pf = pq.ParquetFile(self.db.root / seg["files"]["documents"]["path"])
        for batch in pf.iter_batches(batch_size=8192, columns=["doc_id", "first_chunk_id", "num_chunks"]):
            ids = batch.column(0).to_pylist()
            first = batch.column(1).to_numpy().astype(np.int64)
            count = batch.column(2).to_numpy().astype(np.int64)
            keep = np.array([self.keep_doc(d) and count[i] > 0 and not self.store.deleted(name, int(first[i]))
                             for i, d in enumerate(ids)], dtype=bool)
            if keep.any():
                yield [d for d, k in zip(ids, keep) if k], first[keep], count[keep]

    # -- one item
    def _neighbours_file(self, name: str) -> _Groups:
        if name not in self._nb:
            seg = self.db.snapshot.segments[name]
            self._nb[name] = _Groups(self.db.root / seg["files"]["neighbours"]["path"],
                                     ["chunk_id", "neighbour_chunk_id"], self.store.cache)
        return self._nb[name]

    def item(self, name: str, doc_id: str, first: int, count: int, window: int) -> dict:
        m, C, k = self.m, self.chunks, self.k
        p0 = window * C
        ids = [first + p for p in range(p0, min(p0 + C + 1, count))]  # + the next chunk: the last target
        toks = []
        for cid in ids:
            hit = self.store.find(cid)
            if hit is None:
                raise RetrodbError(f"chunk {cid} of document {doc_id!r} is missing from {name}",
                                   hint=f"run: retrodb verify {self.db.root}")
            toks.append(ChunkStore.tokens_of(hit[1], hit[2]))
        seq = np.concatenate(toks[:C]) if toks else np.zeros(0, np.int64)
        following = toks[C][:1] if len(toks) > C else np.zeros(0, np.int64)
        stream = np.concatenate([seq, following])
        n = len(seq)
        input_ids = np.full(self.seq_len, PAD_ID, dtype=np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        input_ids[:n] = seq
        targets[: len(stream) - 1] = stream[1:]
        chunk_ids = np.full(C, -1, dtype=np.int64)
        own = ids[:C]
        chunk_ids[: len(own)] = own
        nb_ids = np.full((C, k), -1, dtype=np.int64)
        values = np.full((C, k, 2 * m), PAD_ID, dtype=np.int64)
        masks = np.zeros((C, k, 2 * m), dtype=bool)
        nb_file = self._neighbours_file(name)
        for u, cid in enumerate(own):
            d, rows = nb_file.rows(cid)
            if d is None:
                continue
            j = 0
            for nid in d["neighbour_chunk_id"][rows].tolist():
                if first <= nid < first + count:  # its own document (never stored; checked anyway)
                    continue
                hit = self.store.find(nid)
                if hit is None or not self.neighbour_allowed(hit[1]["doc_id"][hit[2]].as_py()):
                    continue  # deleted since, or a document this dataset must not see
                nb_ids[u, j] = nid
                values[u, j], masks[u, j] = self.store.value(nid, m, hit)
                j += 1
                if j == k:
                    break
        return {
            "input_ids": torch.from_numpy(input_ids),
            "targets": torch.from_numpy(targets),
            "neighbours": torch.from_numpy(values),
            "neighbour_mask": torch.from_numpy(masks),
            "chunk_ids": torch.from_numpy(chunk_ids),
            "neighbour_ids": torch.from_numpy(nb_ids),
            "doc_id": doc_id,
        }


class RetroDataset(torch.utils.data.Dataset):
    """Map-style: item i is a window of one document; see the module doc. Keeps an index of the snapshot's
    kept documents (about 20 bytes each plus the id strings); `RetroIterableDataset` streams them instead."""

    def __init__(self, db, *, seq_len: int = 512, k: int = 2, split: str | None = None, val_fraction: float = 0.02,
                 at: int | None = None, exclude_docs=(), cache_groups: int = CACHE_GROUPS):
        import pyarrow as pa

        self.w = _Windows(db, seq_len, k, split, val_fraction, at, exclude_docs, cache_groups)
        seg_idx, firsts, counts, doc_ids = [], [], [], []
        names = sorted(self.w.db.snapshot.segments)
        for i, name in enumerate(names):
            for ids, first, count in self.w.documents(name):
                seg_idx.append(np.full(len(ids), i, dtype=np.int32))
                firsts.append(first)
                counts.append(count)
                doc_ids.append(pa.array(ids, pa.string()))
        self.names = names
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        self.seg_idx, self.first, self.count = cat(seg_idx, np.int32), cat(firsts, np.int64), cat(counts, np.int64)
        self.doc_ids = pa.concat_arrays(doc_ids) if doc_ids else pa.array([], pa.string())
        windows = (self.count + self.w.chunks - 1) // self.w.chunks
        self.ends = np.cumsum(windows)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} of {n}")
        d = int(np.searchsorted(self.ends, i, side="right"))
        window = i - (int(self.ends[d - 1]) if d else 0)
        return self.w.item(self.names[self.seg_idx[d]], self.doc_ids[d].as_py(), int(self.first[d]),
                           int(self.count[d]), window)


class RetroIterableDataset(torch.utils.data.IterableDataset):
    """The same items, streamed segment by segment and document by document (memory flat in database size).
    Under a DataLoader with several workers, each worker yields every num_workers-th document."""

    def __init__(self, db, *, seq_len: int = 512, k: int = 2, split: str | None = None, val_fraction: float = 0.02,
                 at: int | None = None, exclude_docs=(), cache_groups: int = CACHE_GROUPS):
        self.w = _Windows(db, seq_len, k, split, val_fraction, at, exclude_docs, cache_groups)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shard, shards = (info.id, info.num_workers) if info is not None else (0, 1)
        n = 0
        for name in sorted(self.w.db.snapshot.segments):
            for ids, first, count in self.w.documents(name):
                for doc_id, f, c in zip(ids, first.tolist(), count.tolist()):
                    n += 1
                    if (n - 1) % shards != shard:
                        continue
                    for window in range((c + self.w.chunks - 1) // self.w.chunks):
                        yield self.w.item(name, doc_id, f, c, window)


def collate(items: list[dict]) -> dict:
    """Stack the items' tensors into a batch; doc_id becomes a list."""
    if not items:
        raise RetrodbError("collate needs at least one item")
    out = {key: torch.stack([it[key] for it in items]) for key in items[0] if key != "doc_id"}
    out["doc_id"] = [it["doc_id"] for it in items]
    return out
