"""Embed stage: one segment's chunks -> its keys file (float16, row-aligned with chunks.parquet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .. import faults
from ..atomic import file_record, publish, tmp_path_for
from .base import Stage

ROWS_PER_PASS = 8192  # chunks embedded per pass: bounds memory for any segment size


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
    name = "embed"

    def __init__(self, root: Path, embedder):
        self.root = Path(root)
        self.embedder = embedder

    def run(self, unit: tuple[str, dict]) -> dict:
        name, seg = unit
        directory = self.root / "segments" / name
        final = directory / keys_file_name(self.embedder.identity())
        if final.exists():  # finished by an earlier, interrupted run
            return {"segment": name, "record": file_record(self.root, final), "chunks": seg["chunks"], "resumed": True}
        texts = chunk_texts(self.root, seg)
        tmp = tmp_path_for(final)
        keys = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(texts), self.embedder.dim))
        for start in range(0, len(texts), ROWS_PER_PASS):
            part = texts[start: start + ROWS_PER_PASS]
            keys[start: start + len(part)] = self.embedder.embed(part).astype(np.float16)
            self.report(chunks=len(part))
            faults.point("embed.pass_done")
        keys.flush()
        del keys
        publish(tmp, final)
        return {"segment": name, "record": file_record(self.root, final), "chunks": len(texts), "resumed": False}
