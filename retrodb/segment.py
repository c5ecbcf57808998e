"""Segment files: written once, streaming, never changed in place.

A segment directory holds `documents.parquet` and `chunks.parquet` (zstd),
later `keys-*.npy`, `index-*.hnsw` and `tombstones-*.parquet`. The writer
appends one row group per batch so memory stays bounded by the batch, and
publishes each file under its final name only when it is complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import file_record, make_dirs, publish, tmp_path_for
from .readers import Document
from .schema import TOKEN_TYPES, arrow_schema
from .tokenizer import ChunkedBatch

PARQUET_OPTS = dict(compression="zstd", compression_level=3, write_statistics=["chunk_id", "doc_id"])


def chunk_id_base(segment: int) -> int:
    """Chunk ids of segment N are (N << 32) + i: unique, never reused, no coordination needed."""
    return segment << 32


class SegmentWriter:
    """Streams documents and their chunks of one segment into Parquet."""

    def __init__(self, root: Path, directory: Path, segment: int, token_type: str):
        self.root = root
        self.dir = make_dirs(directory)
        self.token_type = token_type
        self.doc_schema = arrow_schema("documents")
        self.chunk_schema = arrow_schema("chunks", token_type)
        self._doc_tmp = tmp_path_for(self.dir / "documents.parquet")
        self._chunk_tmp = tmp_path_for(self.dir / "chunks.parquet")
        self._docs = pq.ParquetWriter(self._doc_tmp, self.doc_schema, **_opts(self.doc_schema))
        self._chunks = pq.ParquetWriter(self._chunk_tmp, self.chunk_schema, **_opts(self.chunk_schema))
        self.next_chunk = chunk_id_base(segment)
        self.documents = 0
        self.chunks = 0
        self.tokens = 0

    def write(self, docs: list[Document], batch: ChunkedBatch) -> None:
        """Append documents (all with at least one token) and their chunks."""
        n_chunks = np.bincount(batch.chunk_doc, minlength=len(docs)).astype(np.int64)
        first_ids = self.next_chunk + np.concatenate([[0], np.cumsum(n_chunks)[:-1]])
        m = len(batch.chunk_doc)
        chunk_ids = self.next_chunk + np.arange(m, dtype=np.int64)
        last_of_doc = np.ones(m, dtype=bool)
        if m > 1:
            last_of_doc[:-1] = batch.chunk_doc[1:] != batch.chunk_doc[:-1]
        continuation = pa.array(chunk_ids + 1, mask=last_of_doc)
        doc_ids = [d.doc_id for d in docs]
        self._docs.write_table(pa.table({
            "doc_id": doc_ids,
            "source": [d.source for d in docs],
            "metadata": [d.metadata for d in docs],
            "text": [d.text for d in docs],
            "num_chars": np.fromiter((len(d.text) for d in docs), dtype=np.int64, count=len(docs)),
            "num_tokens": batch.doc_token_counts,
            "num_chunks": n_chunks.astype(np.int32),
            "first_chunk_id": first_ids,
        }, schema=self.doc_schema))
        tok_type = TOKEN_TYPES[self.token_type]
        values = pa.array(batch.tokens.astype(tok_type.to_pandas_dtype(), copy=False), type=tok_type)
        offsets = np.concatenate([batch.chunk_token_starts, [len(batch.tokens)]]).astype(np.int32)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), values)
        self._chunks.write_table(pa.table({
            "chunk_id": chunk_ids,
            "doc_id": pa.array(doc_ids).take(pa.array(batch.chunk_doc)),
            "position": batch.chunk_position.astype(np.int32),
            "char_start": batch.chunk_char_start,
            "char_end": batch.chunk_char_end,
            "num_tokens": batch.chunk_token_counts.astype(np.int32),
            "tokens": tokens,
            "continuation_id": continuation,
        }, schema=self.chunk_schema))
        self.next_chunk += m
        self.documents += len(docs)
        self.chunks += m
        self.tokens += int(batch.doc_token_counts.sum())

    def close(self) -> dict:
        """Finish both files and publish them; returns their manifest records."""
        self._docs.close()
        self._chunks.close()
        files = {}
        for kind, tmp in (("documents", self._doc_tmp), ("chunks", self._chunk_tmp)):
            final = self.dir / f"{kind}.parquet"
            publish(tmp, final)
            files[kind] = file_record(self.root, final)
        return files

    def abort(self) -> None:
        for w in (self._docs, self._chunks):
            try:
                w.close()
            except Exception:
                pass
        self._doc_tmp.unlink(missing_ok=True)
        self._chunk_tmp.unlink(missing_ok=True)


def _opts(schema: pa.Schema) -> dict:
    names = set(schema.names)
    opts = dict(PARQUET_OPTS)
    opts["write_statistics"] = [c for c in PARQUET_OPTS["write_statistics"] if c in names]
    return opts


def write_table_file(root: Path, path: Path, table: pa.Table) -> dict:
    """Write a whole small table (tombstones, rewritten segments) atomically; returns its record."""
    tmp = tmp_path_for(path)
    pq.write_table(table, tmp, **_opts(table.schema))
    publish(tmp, path)
    return file_record(root, path)
