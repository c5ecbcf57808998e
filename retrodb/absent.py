"""Proof of absence: scan every file under a database directory for a text.

What counts as "present" (DESIGN.md, privacy invariants):
- the text's UTF-8 bytes, in any file: Parquet columns are read through
  their decoder (a raw byte scan of a zstd page proves nothing) and their raw
  bytes too (footers and statistics are plain), .gz/.zst files are
  decompressed, everything else (manifests, logs, locks, temporary files,
  key and index files) is scanned as raw bytes. Matching is RE2, the engine
  redaction selects with: with ignore_case, Unicode case folding (Ü = ü) in
  raw bytes and decoded columns alike. Files are streamed in blocks (a match
  across a block boundary is found), never read whole into memory;
- its LM token-id sequence, in any Parquet list column of token ids (the
  flattened values, so a sequence split across two chunks is found too) and,
  for sequences of 3+ tokens, as little-endian uint16/uint32 bytes in
  non-vector files;
- with `keys`, any stored vector within cosine `threshold` of the text's own
  key: every row of every keys file and every vector of every HNSW file,
  slots marked deleted included (parsed from hnswlib's file format).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # hnswlib saveIndex(): offsetLevel0 .. ef_construction
VECTOR_SUFFIXES = (".npy", ".hnsw")


BLOCK = 4 << 20  # bytes read at a time: memory stays flat whatever the file size


@dataclass
class Hit:
    file: str  # relative to the database root
    location: str  # column/row, byte offset, or vector slot
    what: str  # text | tokens | key
    needle: int  # index of the text in the list searched for
    doc_id: str | None = None  # the document the row belongs to (Parquet tables with a doc_id column)

    @property
    def segment(self) -> str | None:
        parts = self.file.split("/")
        return parts[1] if len(parts) > 2 and parts[0] == "segments" else None

    def describe(self) -> str:
        """Where, in words: the document (and segment) when known, then the place in the file."""
        if self.doc_id is not None:
            return f"document {self.doc_id!r} of {self.segment or self.file} ({self.location})"
        return f"{self.file} ({self.location})"

    def to_dict(self) -> dict:
        return {**self.__dict__, "segment": self.segment}


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


def _blocks(f, size: int | None = None):
    while True:
        data = f.read(size or BLOCK)
        if not data:
            return
        yield data


class AbsenceScanner:
    """Scans files for `texts` (RE2, the redaction's engine: with `ignore_case`, Unicode case folding, in raw bytes
    and decoded Parquet alike), their token-id sequences and their keys. Files are streamed in blocks."""

    def __init__(self, texts: list[str], token_seqs: list[list[list[int]]] | None = None, ignore_case: bool = False,
                 keys: list[np.ndarray] | None = None, threshold: float = 0.999):
        from .pii import compile_re2, json_variants, literal_pattern

        self.texts = texts
        self.ignore_case = ignore_case
        # each text, and its JSON-escaped form (metadata is JSON text), as RE2 patterns; `needle_of` maps back
        variants = [(i, v) for i, t in enumerate(texts) for v in json_variants(t)]
        self.needle_of = [i for i, _ in variants]
        self.patterns = [(f"(?i:{literal_pattern(v)})" if ignore_case else literal_pattern(v)) for _, v in variants]
        self.each = [compile_re2(p) for p in self.patterns]
        self.any = compile_re2("|".join(f"(?:{p})" for p in self.patterns)) if texts else None
        # bytes a match can span: a character and its other case take at most 4 bytes each
        self.overlap = max((len(v.encode("utf-8")) * (4 if ignore_case else 1) for _, v in variants), default=1)
        # (needle, ids) for every form a text's ids take in context (see tokenizer.token_id_forms)
        self.seqs = [(i, np.asarray(s, dtype=np.int64)) for i, forms in enumerate(token_seqs or []) for s in forms]
        self.raw_seqs = []
        for i, s in self.seqs:
            if len(s) >= 3:
                for dt in ("<u2", "<u4"):
                    if s.max(initial=0) < np.iinfo(dt).max:
                        self.raw_seqs.append((i, s.astype(dt).tobytes()))
        self.overlap = max([self.overlap] + [len(p) for _, p in self.raw_seqs])
        self.keys = [k / np.linalg.norm(k) for k in (keys or [])]
        self.threshold = threshold
        self.files = 0  # what was scanned, for the report
        self.bytes = 0

    def kinds(self) -> list[str]:
        out = ["text (raw bytes, decoded Parquet, decompressed .gz/.zst)"] if self.texts else []
        if self.seqs:
            out.append("token ids")
        if self.keys:
            out.append(f"keys (cosine >= {self.threshold})")
        return out

    def scan(self, root: Path) -> list[Hit]:
        hits: list[Hit] = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            hits.extend(self.scan_file(path, rel))
        return hits

    def scan_file(self, path: Path, rel: str) -> list[Hit]:
        hits: list[Hit] = []
        name = path.name.lower()
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                magic = f.read(4)
                f.seek(0)
                hits += self._scan_stream(_blocks(f), rel, "bytes", tokens=not name.endswith(VECTOR_SUFFIXES))
        except OSError as exc:
            return [Hit(rel, f"unreadable: {exc.strerror or exc}", "text", -1)]
        self.files += 1
        self.bytes += size
        if name.endswith(".parquet") or magic == b"PAR1":
            hits += self._scan_parquet(path, rel)
        if name.endswith(".gz") or magic[:2] == b"\x1f\x8b":
            hits += self._scan_decompressed(path, rel, "gunzip")
        if name.endswith(".zst") or magic == b"\x28\xb5\x2f\xfd":
            hits += self._scan_decompressed(path, rel, "unzstd")
        if self.keys and name.endswith(".npy"):
            hits += self._scan_npy(path, rel)
        if self.keys and name.endswith(".hnsw"):
            hits += self._scan_hnsw(path, rel)
        return hits

    def _scan_decompressed(self, path: Path, rel: str, how: str) -> list[Hit]:
        """A compressed file, decompressed as a stream; a damaged or truncated one is scanned as far as it goes."""
        hits: list[Hit] = []

        def stream():
            """Decompressed blocks, as far as the data goes (a truncated or damaged file ends the stream)."""
            import zlib

            import zstandard

            with open(path, "rb") as raw:
                d = zlib.decompressobj(wbits=31) if how == "gunzip" else zstandard.ZstdDecompressor().decompressobj()
                for block in _blocks(raw):
                    while block:
                        try:
                            out = d.decompress(block)
                        except (zlib.error, zstandard.ZstdError):
                            return
                        if out:
                            yield out
                        block = d.unused_data if getattr(d, "eof", False) else b""
                        if block:  # the next member (gzip) or frame (zstd)
                            d = zlib.decompressobj(wbits=31) if how == "gunzip" else \
                                zstandard.ZstdDecompressor().decompressobj()

        hits += self._scan_stream(stream(), rel, how, tokens=True)
        return hits

    def _scan_stream(self, blocks, rel: str, how: str, tokens: bool) -> list[Hit]:
        """Blocks of one byte stream; each block is scanned with the tail of the one before, so a match across
        the boundary is found; each place is reported once."""
        hits: list[Hit] = []
        seen: set[tuple[int, int]] = set()
        counts: dict[int, int] = {}
        tail, offset = b"", 0  # offset: position of `tail` in the stream
        for block in blocks:
            data = tail + block
            if self.any is not None:
                for m in self.any.finditer(data):
                    matched = data[m.start():m.end()]
                    for k, each in enumerate(self.each):
                        i = self.needle_of[k]
                        if (i, offset + m.start()) not in seen and counts.get(i, 0) < 5 and each.fullmatch(matched):
                            seen.add((i, offset + m.start()))
                            counts[i] = counts.get(i, 0) + 1
                            hits.append(Hit(rel, f"{how} offset {offset + m.start()}", "text", i))
            if tokens:
                for i, pattern in self.raw_seqs:
                    for off in _find_all(data, pattern, 1):
                        if (-1 - i, offset + off) not in seen:
                            seen.add((-1 - i, offset + off))
                            hits.append(Hit(rel, f"{how} offset {offset + off} (token ids)", "tokens", i))
            keep = min(len(data), self.overlap)
            offset += len(data) - keep
            tail = data[len(data) - keep:]
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
            ids = table["doc_id"].combine_chunks() if "doc_id" in table.column_names else None

            def doc(row: int) -> str | None:
                return None if ids is None else ids[row].as_py()

            for col_name in table.column_names:
                col = table[col_name].combine_chunks()
                typ = col.type
                if pa.types.is_string(typ) or pa.types.is_large_string(typ):
                    for k, pattern in enumerate(self.patterns):
                        i = self.needle_of[k]
                        found = pc.match_substring_regex(col, pattern)
                        rows = np.flatnonzero(found.fill_null(False).to_numpy(zero_copy_only=False))
                        for r in rows[:5]:
                            hits.append(Hit(rel, f"row group {g}, row {int(r)}, column {col_name}", "text", i,
                                            doc(int(r))))
                elif pa.types.is_list(typ) and pa.types.is_integer(typ.value_type) and self.seqs:
                    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
                    offsets = col.offsets.to_numpy() - col.offsets[0].as_py()
                    for i, seq in self.seqs:
                        for start in _find_sequence(values, seq):
                            row = int(np.searchsorted(offsets, start, side="right") - 1)
                            hits.append(Hit(rel, f"row group {g}, row {row}, column {col_name} (value {start})",
                                            "tokens", i, doc(row)))
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

    def _scan_hnsw(self, path: Path, rel: str) -> list[Hit]:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        if len(raw) < HNSW_HEADER.size:
            return []
        _, _, count, size, label_off, data_off = HNSW_HEADER.unpack_from(raw[:HNSW_HEADER.size].tobytes(), 0)[:6]
        dim = (label_off - data_off) // 4
        if dim != len(self.keys[0]) or HNSW_HEADER.size + count * size > len(raw):
            return []
        hits = []
        for start in range(0, count, 65536):
            n = min(65536, count - start)
            level0 = raw[HNSW_HEADER.size + start * size: HNSW_HEADER.size + (start + n) * size].reshape(n, size)
            vectors = np.ascontiguousarray(level0[:, data_off: data_off + 4 * dim]).view(np.float32)
            labels = np.ascontiguousarray(level0[:, label_off: label_off + 8]).view(np.uint64)[:, 0]
            hits += [Hit(rel, f"vector slot {start + r} label {int(labels[r])} (cosine {c:.5f})", "key", i)
                     for i, r, c in self._close(vectors)]
        return hits


def scan_absent(root: str | Path, texts: list[str], *, ignore_case: bool = False, tokenizer_path: str | None = None,
                check_keys: bool = False, embedder=None, threshold: float = 0.999) -> list[Hit]:
    """Every place under `root` where any of `texts` (or its token ids, or its key) still is."""
    return absence_scanner(texts, ignore_case=ignore_case, tokenizer_path=tokenizer_path, check_keys=check_keys,
                           embedder=embedder, threshold=threshold).scan(Path(root))


def absence_scanner(texts: list[str], *, ignore_case: bool = False, tokenizer_path: str | None = None,
                    check_keys: bool = False, embedder=None, threshold: float = 0.999) -> AbsenceScanner:
    """The scanner for `texts`, their token ids (with a tokenizer) and their keys (with `check_keys`); after a
    scan its `files`, `bytes` and `kinds()` say what was covered."""
    seqs = None
    if tokenizer_path:
        from .tokenizer import load_tokenizer, token_id_forms

        tok = load_tokenizer(tokenizer_path)
        seqs = [token_id_forms(tok, t) for t in texts]
    keys = list(embedder.embed(texts)) if check_keys and embedder is not None else None
    return AbsenceScanner(texts, seqs, ignore_case, keys, threshold)
