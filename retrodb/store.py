"""Chunk stores: what a query returns for a chunk, memory-mapped, so a winner costs microseconds.

`segments/seg-N/store.arrow` holds, for each chunk of the segment (in the row order of
chunks.parquet), its chunk id, document id, position, text, tokens and continuation id, as
an uncompressed Arrow IPC file (schemas/store.json). A reader memory-maps it and takes the
rows of the winners directly: no Parquet row group (thousands of rows) is decoded for one
chunk, and the document's text is not read to slice the chunk out of it. It is derived data:
written beside documents.parquet and chunks.parquet whenever they are written (ingest,
compaction, duplicate removal), covered by `verify` (it must agree with them) and by redaction
like every other file of a segment. A segment written before chunk stores has none and is read
from Parquet.

Cost: the chunk text again (uncompressed) plus the tokens uncompressed: about 128 + 4 x 64
bytes a chunk for 64 uint16 tokens and ~300 characters of English, next to ~3 KB of float16
key and ~3.4 KB of HNSW per chunk at dim 768.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import file_record, publish, tmp_path_for

STORE_NAME = "store.arrow"
STORE_COLUMNS = ("chunk_id", "doc_id", "position", "text", "tokens", "continuation_id")
BATCH_ROWS = 1 << 16


def store_schema(token_type: str):
    from .schema import arrow_schema

    return arrow_schema("store", token_type)


class StoreWriter:
    """Streams store rows into `final` under a temporary name; `close` publishes it."""

    def __init__(self, final: Path, token_type: str):
        import pyarrow as pa

        self.final = Path(final)
        self.tmp = tmp_path_for(self.final)
        self.schema = store_schema(token_type)
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)

    def write(self, chunk_ids, doc_ids, positions, texts, tokens, continuation) -> None:
        import pyarrow as pa

        self._writer.write_table(pa.table({"chunk_id": chunk_ids, "doc_id": doc_ids, "position": positions,
                                           "text": texts, "tokens": tokens, "continuation_id": continuation},
                                          schema=self.schema))

    def close(self, root: Path) -> dict:
        self._writer.close()
        self._sink.close()
        publish(self.tmp, self.final)
        return file_record(root, self.final)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)


def _token_type(chunks_file) -> str:
    from .schema import TOKEN_TYPES

    value_type = chunks_file.schema_arrow.field("tokens").type.value_type
    return next(name for name, t in TOKEN_TYPES.items() if t == value_type)


def _rows_from_tables(directory: Path):
    """A segment's store rows derived from its documents.parquet and chunks.parquet (chunks are grouped by document,
    in document order: `verify` checks it), a batch of documents at a time: (chunk ids, doc ids, positions, texts,
    tokens, continuation ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = pq.ParquetFile(Path(directory) / "documents.parquet")
    chunks = pq.ParquetFile(Path(directory) / "chunks.parquet").iter_batches(
        batch_size=BATCH_ROWS, columns=["chunk_id", "doc_id", "position", "char_start", "char_end", "tokens",
                                        "continuation_id"])
    pending = None
    for batch in docs.iter_batches(batch_size=4096, columns=["doc_id", "text", "num_chunks"]):
        need = int(np.asarray(batch.column(2)).sum())
        parts = []
        while need > 0:
            if pending is None or pending.num_rows == 0:
                pending = next(chunks)
            take = pending.slice(0, need)
            parts.append(take)
            pending = pending.slice(need)
            need -= take.num_rows
        if not parts:
            continue
        c = pa.Table.from_batches(parts)
        texts = batch.column(1).to_pylist()
        counts = np.asarray(batch.column(2)).astype(np.int64)
        doc_of_chunk = np.repeat(np.arange(len(texts)), counts)
        starts, ends = c["char_start"].to_pylist(), c["char_end"].to_pylist()
        chunk_texts = [texts[d][a:b] for d, a, b in zip(doc_of_chunk.tolist(), starts, ends)]
        yield c["chunk_id"], c["doc_id"], c["position"], chunk_texts, c["tokens"], c["continuation_id"]


def write_from_tables(root: Path, directory: Path) -> dict:
    """(Re)write a segment's store from its documents.parquet and chunks.parquet."""
    import pyarrow.parquet as pq

    token_type = _token_type(pq.ParquetFile(Path(directory) / "chunks.parquet"))
    writer = StoreWriter(Path(directory) / STORE_NAME, token_type)
    try:
        for columns in _rows_from_tables(directory):
            writer.write(*columns)
    except BaseException:
        writer.abort()
        raise
    return writer.close(root)


def segment_rows(root: Path, files: dict):
    """The store rows of a segment (given its file records), as tables in the row order of its chunks.parquet:
    from its store, or derived from its tables for a segment written before stores."""
    import pyarrow as pa

    if "store" in files:
        for batch in ChunkStore(Path(root) / files["store"]["path"]).batches:
            yield pa.Table.from_batches([batch])
        return
    directory = (Path(root) / files["chunks"]["path"]).parent
    for ids, doc_ids, positions, texts, tokens, cont in _rows_from_tables(directory):
        yield pa.table({"chunk_id": ids, "doc_id": doc_ids, "position": positions, "text": texts,
                        "tokens": tokens, "continuation_id": cont})


def copy_rows(root: Path, final: Path, token_type: str, tables) -> dict:
    """A store at `final` made of the row tables `tables` (an iterator), published when complete."""
    writer = StoreWriter(final, token_type)
    try:
        for t in tables:
            if t.num_rows:
                writer.write(*(t.column(n) for n in STORE_COLUMNS))
    except BaseException:
        writer.abort()
        raise
    return writer.close(root)


class ChunkStore:
    """A memory-mapped store: rows of chunks by chunk id (thread-safe for reading)."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = Path(path)
        self._source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(self._source)
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        sizes = [b.num_rows for b in self.batches]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = [np.asarray(b.column(0)) for b in self.batches]
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.order = None if np.all(np.diff(self.ids) > 0) else np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids if self.order is None else self.ids[self.order]

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, chunk_id: int) -> int | None:
        at = int(np.searchsorted(self.sorted_ids, chunk_id))
        if at >= len(self.sorted_ids) or self.sorted_ids[at] != chunk_id:
            return None
        return at if self.order is None else int(self.order[at])

    def _cell(self, row: int, column: int):
        b = int(np.searchsorted(self.starts, row, side="right") - 1)
        return self.batches[b].column(column)[row - int(self.starts[b])].as_py()

    def read(self, ids) -> dict[int, dict]:
        """{chunk_id: {doc_id, position, text, tokens, continuation, continuation_tokens}} of the ids found."""
        out = {}
        for cid in ids:
            row = self.row(int(cid))
            if row is None:
                continue
            cont_id = self._cell(row, 5)
            cont = self.row(cont_id) if cont_id is not None else None
            out[int(cid)] = {
                "doc_id": self._cell(row, 1), "position": self._cell(row, 2), "text": self._cell(row, 3),
                "tokens": self._cell(row, 4),
                "continuation": self._cell(cont, 3) if cont is not None else None,
                "continuation_tokens": self._cell(cont, 4) if cont is not None else [],
            }
        return out

    def table(self):
        """The whole store as one table (verify)."""
        import pyarrow as pa

        return pa.Table.from_batches(self.batches) if self.batches else None
