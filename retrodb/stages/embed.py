"""Embed stage: one segment's chunks -> its keys file (float16, row-aligned with chunks.parquet).

Work in progress is durable: the keys are written into `<work_dir>/<segment>.keys.npy`
(a preallocated .npy, memory-mapped) one pass of `rows_per_pass` chunks at a time;
after each pass the file is flushed and fsynced, then `<segment>.rows.json` records
how many leading rows are final. The next pass is submitted to the embedder before the
current one is waited for, so the model runs on while a pass is made durable. A rerun after a crash continues from there, so a
crash costs at most the pass it interrupted. The finished file is renamed to
`segments/<segment>/keys-<sha12>-<maxlen>.npy`; until a snapshot lists it, a rerun
finds it there and reuses it.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .. import faults
from ..atomic import atomic_write_bytes, file_record, fsync_file, make_dirs, publish, tmp_path_for
from ..errors import CorruptDatabase
from ..snapshot import segment_name
from .base import Stage, result

ROWS_PER_PASS = 8192  # chunks per durable pass: bounds lost work (and float32 memory) per crash
PASS_ROWS_ENV = "RETRODB_EMBED_PASS_ROWS"  # overrides ROWS_PER_PASS (crash tests use small passes)


def keys_file_name(identity: dict) -> str:
    return f"keys-{identity['sha256'][:12]}-{identity['max_length']}.npy"


def chunk_texts(root: Path, seg: dict) -> list[str]:
    """The exact character span of each chunk of a segment, in chunk-table order."""
    docs = pq.read_table(root / seg["files"]["documents"]["path"], columns=["doc_id", "text"])
    text_of = dict(zip(docs["doc_id"].to_pylist(), docs["text"].to_pylist()))
    chunks = pq.read_table(root / seg["files"]["chunks"]["path"], columns=["doc_id", "char_start", "char_end"])
    return [text_of[d][a:b] for d, a, b in zip(chunks["doc_id"].to_pylist(), chunks["char_start"].to_pylist(),
                                                chunks["char_end"].to_pylist())]


class EmbedStage(Stage):
    """Reports `chunks` (embedded now) and `resumed` (rows found finished) as it goes."""

    name = "embed"

    def __init__(self, root: Path, embedder, work_dir: Path, rows_per_pass: int | None = None):
        self.root = Path(root)
        self.embedder = embedder
        self.work_dir = Path(work_dir)
        self.rows_per_pass = rows_per_pass

    def prepare(self) -> dict:
        """Load the model here (an actor does, once) and check that its weights are the ones the coordinator
        chose: a node with another model at the same path would otherwise write other keys."""
        emb = self.embedder
        expected = emb.identity()
        if getattr(emb, "kind", None) == "bert":
            from ..embedder import check_identity, weights_sha256

            check_identity(expected, {**expected, "sha256": weights_sha256(emb.path)})
        emb.load()
        return {"device": emb.device, "dtype": emb.dtype, "batch_size": emb.batch_size}

    def pass_rows(self) -> int:
        """Chunks per durable pass: at least ROWS_PER_PASS, and 128 batches (a pass costs an fsync)."""
        if self.rows_per_pass or os.environ.get(PASS_ROWS_ENV):
            return max(1, self.rows_per_pass or int(os.environ[PASS_ROWS_ENV]))
        self.embedder.load()
        return max(ROWS_PER_PASS, 128 * self.embedder.batch_size)

    def run(self, unit: dict) -> dict:
        """`unit`: {"segment": number, "entry": its manifest entry}; the result's entry adds the keys file."""
        segment, seg = unit["segment"], unit["entry"]
        name = segment_name(segment)
        final = self.root / "segments" / name / keys_file_name(self.embedder.identity())

        def done(chunks: int, resumed_chunks: int) -> dict:
            return result(segment, {"files": {"keys": file_record(self.root, final)}}, resumed=chunks == 0 and
                          resumed_chunks > 0, chunks=chunks, resumed_chunks=resumed_chunks)

        if final.exists():  # finished by an earlier, interrupted run, not yet committed
            self.report(resumed=seg["chunks"])
            return done(0, seg["chunks"])
        texts = chunk_texts(self.root, seg)
        if len(texts) != seg["chunks"]:
            raise CorruptDatabase(f"{name}: chunks.parquet has {len(texts)} rows, the manifest says {seg['chunks']}",
                                  hint="run: retrodb verify DB")
        dim = self.embedder.dim
        if not texts:
            tmp = tmp_path_for(final)
            with open(tmp, "wb") as f:
                np.save(f, np.empty((0, dim), dtype=np.float16))
            publish(tmp, final)
            return done(0, 0)
        partial = self.work_dir / f"{name}.keys.npy"
        marker = self.work_dir / f"{name}.rows.json"
        rows_done = self._rows_done(partial, marker, len(texts), dim)
        if rows_done:
            keys = np.lib.format.open_memmap(partial, mode="r+")
            self.report(resumed=rows_done)
        else:
            make_dirs(self.work_dir)
            marker.unlink(missing_ok=True)
            keys = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(texts), dim))
        per_pass = self.pass_rows()
        passes: deque = deque()  # (stop, job) submitted, oldest first

        def finish_pass() -> None:
            stop, job = passes.popleft()
            job.wait()
            keys.flush()
            fsync_file(partial)
            atomic_write_bytes(marker, json.dumps({"rows": stop, "of": len(texts), "dim": dim}).encode())
            faults.point("embed.pass_done")

        try:
            for start in range(rows_done, len(texts), per_pass):
                stop = min(start + per_pass, len(texts))
                passes.append((stop, self.embedder.submit(texts[start:stop], keys[start:stop],
                                                          lambda n: self.report(chunks=n))))
                if len(passes) > 1:
                    finish_pass()
            while passes:
                finish_pass()
        finally:
            for _, job in passes:  # a failure: let the passes still running end before the file is let go
                job.done.wait()
        del keys
        publish(partial, final)
        marker.unlink(missing_ok=True)
        faults.point("embed.segment_done")
        return done(len(texts) - rows_done, rows_done)

    @staticmethod
    def _rows_done(partial: Path, marker: Path, rows: int, dim: int) -> int:
        """Leading rows of `partial` that an earlier run finished (0 if none, or if it does not match)."""
        try:
            mark = json.loads(marker.read_text())
            header = np.load(partial, mmap_mode="r")
            shape, dtype = header.shape, header.dtype
            del header
        except (OSError, ValueError):
            return 0
        if shape != (rows, dim) or dtype != np.float16 or mark.get("of") != rows:
            return 0
        return max(0, min(int(mark.get("rows", 0)), rows))
