"""Proof of absence: scan every file under a database directory for a text.

What counts as "present" (DESIGN.md, privacy invariants):
- the text's UTF-8 bytes, in any file: Parquet columns are read through
  their decoder (a raw byte scan of a zstd page proves nothing) and their raw
  bytes too (footers and statistics are plain), .gz/.zst files are
  decompressed, everything else (manifests, logs, locks, temporary files,
  key and index files) is scanned as raw bytes;
- its LM token-id sequence, in any Parquet list column of token ids (the
  flattened values, so a sequence split across two chunks is found too) and,
  for sequences of 3+ tokens, as little-endian uint16/uint32 bytes in
  non-vector files;
- with `keys`, any stored vector within cosine `threshold` of the text's own
  key: every row of every keys file and every vector of every HNSW file,
  slots marked deleted included (parsed from hnswlib's file format).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # hnswlib saveIndex(): offsetLevel0 .. ef_construction
VECTOR_SUFFIXES = (".npy", ".hnsw")


@dataclass
class Hit:
    file: str  # relative to the database root
    location: str  # column/row, byte offset, or vector slot
    what: str  # text | tokens | key
    needle: int  # index of the text in the list searched for

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _find_all(haystack: bytes, needle: bytes, limit: int = 5) -> list[int]:
    out, start = [], 0
    while len(out) < limit:
        i = haystack.find(needle, start)
        if i < 0:
            break
        out.append(i)
        start = i + 1
    return out


def _find_sequence(values: np.ndarray, seq: np.ndarray) -> list[int]:
    """Start indexes of `seq` in the 1-D array `values`."""
    n = len(seq)
    if n == 0 or len(values) < n:
        return []
    candidates = np.flatnonzero(values[: len(values) - n + 1] == seq[0])
    for j in range(1, n):
        if not len(candidates):
            break
        candidates = candidates[values[candidates + j] == seq[j]]
    return candidates[:5].tolist()


class AbsenceScanner:
    def __init__(self, texts: list[str], token_seqs: list[list[list[int]]] | None = None, ignore_case: bool = False,
                 keys: list[np.ndarray] | None = None, threshold: float = 0.999):
        self.texts = texts
        self.ignore_case = ignore_case
        self.needles = [(t.lower() if ignore_case else t).encode("utf-8") for t in texts]
        # (needle, ids) for every form a text's ids take in context (see tokenizer.token_id_forms)
        self.seqs = [(i, np.asarray(s, dtype=np.int64)) for i, forms in enumerate(token_seqs or []) for s in forms]
        self.raw_seqs = []
        for i, s in self.seqs:
            if len(s) >= 3:
                for dt in ("<u2", "<u4"):
                    if s.max(initial=0) < np.iinfo(dt).max:
                        self.raw_seqs.append((i, s.astype(dt).tobytes()))
        self.keys = [k / np.linalg.norm(k) for k in (keys or [])]
        self.threshold = threshold

    def scan(self, root: Path) -> list[Hit]:
        hits: list[Hit] = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            hits.extend(self.scan_file(path, rel))
        return hits

    def scan_file(self, path: Path, rel: str) -> list[Hit]:
        hits: list[Hit] = []
        name = path.name.lower()
        raw = path.read_bytes()
        hits += self._scan_bytes(raw, rel, "bytes", tokens=not name.endswith(VECTOR_SUFFIXES))
        if name.endswith(".parquet") or raw[:4] == b"PAR1":
            hits += self._scan_parquet(path, rel)
        if name.endswith(".gz") or raw[:2] == b"\x1f\x8b":
            try:
                hits += self._scan_bytes(gzip.decompress(raw), rel, "gunzip", tokens=True)
            except (OSError, EOFError):
                pass
        if name.endswith(".zst") or raw[:4] == b"\x28\xb5\x2f\xfd":
            try:
                import zstandard

                data = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
                hits += self._scan_bytes(data, rel, "unzstd", tokens=True)
            except Exception:  # not a complete zstd frame
                pass
        if self.keys and name.endswith(".npy"):
            hits += self._scan_npy(path, rel)
        if self.keys and name.endswith(".hnsw"):
            hits += self._scan_hnsw(raw, rel)
        return hits

    def _scan_bytes(self, data: bytes, rel: str, how: str, tokens: bool) -> list[Hit]:
        hits = []
        hay = data.lower() if self.ignore_case else data
        for i, needle in enumerate(self.needles):
            for off in _find_all(hay, needle):
                hits.append(Hit(rel, f"{how} offset {off}", "text", i))
        if tokens:
            for i, pattern in self.raw_seqs:
                for off in _find_all(data, pattern, 1):
                    hits.append(Hit(rel, f"{how} offset {off} (token ids)", "tokens", i))
        return hits

    def _scan_parquet(self, path: Path, rel: str) -> list[Hit]:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        hits: list[Hit] = []
        try:
            pf = pq.ParquetFile(path)
        except Exception:
            return [Hit(rel, "unreadable Parquet file: scanned as raw bytes only", "text", -1)]
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            for col_name in table.column_names:
                col = table[col_name].combine_chunks()
                typ = col.type
                if pa.types.is_string(typ) or pa.types.is_large_string(typ):
                    for i, text in enumerate(self.texts):
                        found = pc.match_substring(col, text, ignore_case=self.ignore_case)
                        rows = np.flatnonzero(found.fill_null(False).to_numpy(zero_copy_only=False))
                        for r in rows[:5]:
                            hits.append(Hit(rel, f"row group {g} column {col_name} row {int(r)}", "text", i))
                elif pa.types.is_list(typ) and pa.types.is_integer(typ.value_type) and self.seqs:
                    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
                    for i, seq in self.seqs:
                        for start in _find_sequence(values, seq):
                            hits.append(Hit(rel, f"row group {g} column {col_name} value {start}", "tokens", i))
        return hits

    def _close(self, vectors: np.ndarray) -> list[tuple[int, int, float]]:
        out = []
        norms = np.linalg.norm(vectors, axis=1)
        norms[norms == 0] = 1
        for i, key in enumerate(self.keys):
            cos = (vectors @ key.astype(np.float32)) / norms
            for r in np.flatnonzero(cos >= self.threshold)[:5]:
                out.append((i, int(r), float(cos[r])))
        return out

    def _scan_npy(self, path: Path, rel: str) -> list[Hit]:
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError:
            return []
        if arr.ndim != 2 or arr.shape[1] != len(self.keys[0]):
            return []
        hits = []
        for start in range(0, arr.shape[0], 65536):
            block = np.asarray(arr[start: start + 65536], dtype=np.float32)
            for i, r, c in self._close(block):
                hits.append(Hit(rel, f"row {start + r} (cosine {c:.5f})", "key", i))
        return hits

    def _scan_hnsw(self, raw: bytes, rel: str) -> list[Hit]:
        if len(raw) < HNSW_HEADER.size:
            return []
        _, _, count, size, label_off, data_off = HNSW_HEADER.unpack_from(raw, 0)[:6]
        dim = (label_off - data_off) // 4
        if dim != len(self.keys[0]) or HNSW_HEADER.size + count * size > len(raw):
            return []
        level0 = np.frombuffer(raw, dtype=np.uint8, count=count * size, offset=HNSW_HEADER.size).reshape(count, size)
        vectors = level0[:, data_off: data_off + 4 * dim].copy().view(np.float32)
        labels = level0[:, label_off: label_off + 8].copy().view(np.uint64)[:, 0]
        return [Hit(rel, f"vector slot {r} label {int(labels[r])} (cosine {c:.5f})", "key", i)
                for i, r, c in self._close(vectors)]


def scan_absent(root: str | Path, texts: list[str], *, ignore_case: bool = False, tokenizer_path: str | None = None,
                check_keys: bool = False, embedder=None, threshold: float = 0.999) -> list[Hit]:
    """Every place under `root` where any of `texts` (or its token ids, or its key) still is."""
    root = Path(root)
    seqs = None
    if tokenizer_path:
        from .tokenizer import load_tokenizer, token_id_forms

        tok = load_tokenizer(tokenizer_path)
        seqs = [token_id_forms(tok, t) for t in texts]
    keys = list(embedder.embed(texts)) if check_keys and embedder is not None else None
    return AbsenceScanner(texts, seqs, ignore_case, keys, threshold).scan(root)
