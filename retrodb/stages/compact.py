"""Compact stage: one or more live segments -> one new segment without their tombstoned rows.

Rows keep their chunk ids (and so their continuation ids): a chunk id names
a chunk for the life of the database, whichever segment holds it. Keys are
carried over by row selection, never recomputed. The HNSW index (labels are
chunk ids) is rebuilt for the new segment only, from the kept keys, so it
holds no vector of a dropped row (hnswlib's mark_deleted would keep them in
the file). Documents, chunks and keys are streamed batch by batch, so memory
is bounded by a batch, not by the segment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .. import faults, neighbours, tombstones
from ..atomic import atomic_write_bytes, file_record, make_dirs, publish, tmp_path_for
from ..snapshot import SEGMENTS, segment_name
from .base import Stage, result

BATCH_ROWS = 1 << 16  # rows per Parquet batch and per block of keys copied


class CompactStage(Stage):
    name = "compact"

    def __init__(self, root: Path, job_dir: Path, index_params: dict | None = None):
        self.root = Path(root)
        self.job_dir = Path(job_dir)
        self.index_params = index_params

    def marker(self, segment: int) -> Path:
        return self.job_dir / f"{segment_name(segment)}.done.json"

    def run(self, unit: dict) -> dict:
        """`unit`: {"segment": new segment number, "sources": [[name, manifest entry], ...]}."""
        marker = self.marker(unit["segment"])
        if marker.exists():
            done = json.loads(marker.read_text())
            done["resumed"] = True
            self.report(chunks=done["entry"]["chunks"])
            return done
        name = segment_name(unit["segment"])
        directory = self.root / SEGMENTS / name
        if directory.exists():  # a half-written attempt of this same unit
            shutil.rmtree(directory)
        make_dirs(directory)
        sources = unit["sources"]
        deleted = [tombstones.deleted_doc_ids(self.root, seg) for _, seg in sources]
        files: dict[str, dict] = {}
        files["documents"], n_docs, n_tokens = self._copy_table("documents", sources, deleted, directory, "num_tokens")
        faults.point("compact.documents_written")
        files["chunks"], n_chunks, keep = self._copy_table("chunks", sources, deleted, directory, None)
        faults.point("compact.chunks_written")
        if all("keys" in seg["files"] for _, seg in sources):
            files["keys"] = self._copy_keys(sources, keep, directory, n_chunks)
            faults.point("compact.keys_written")
        entry = {"documents": n_docs, "chunks": n_chunks, "tokens": n_tokens, "files": files,
                 "compacted_from": [n for n, _ in sources],
                 "origin_max": max(neighbours.origin_max(n, seg) for n, seg in sources)}
        carried = neighbours.carry_over(self.root, sources, self._kept_ids(sources, keep), directory)
        if carried is not None:  # the kept chunks' precomputed neighbours come along (ranks renumbered)
            files["neighbours"], entry["neighbours"] = carried
            faults.point("compact.neighbours_written")
        if "keys" in files and self.index_params and all("index" in seg["files"] for _, seg in sources):
            from ..index import build_segment_index

            files["index"] = build_segment_index(self.root, name, entry, self.index_params)
            faults.point("compact.index_written")
        done = result(unit["segment"], entry, dropped_chunks=sum(seg["chunks"] for _, seg in sources) - n_chunks)
        atomic_write_bytes(marker, json.dumps(done).encode())
        faults.point("compact.segment_done")
        return done

    def _copy_table(self, kind: str, sources, deleted, directory: Path, sum_column: str | None):
        """Stream the rows of `kind` whose document is not deleted into directory/kind.parquet.

        Returns (file record, rows written, sum of `sum_column` or the keep masks per source).
        """
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from ..segment import _opts

        final = directory / f"{kind}.parquet"
        tmp = tmp_path_for(final)
        writer = None
        rows, total, masks = 0, 0, []
        try:
            for (_, seg), gone in zip(sources, deleted):
                src = pq.ParquetFile(self.root / seg["files"][kind]["path"])
                if writer is None:
                    writer = pq.ParquetWriter(tmp, src.schema_arrow, **_opts(src.schema_arrow))
                gone_ids = pa.array(sorted(gone), pa.string())
                parts = []
                for batch in src.iter_batches(batch_size=BATCH_ROWS):
                    keep = pc.invert(pc.is_in(batch["doc_id"], value_set=gone_ids)) if gone else \
                        pa.array(np.ones(batch.num_rows, dtype=bool))
                    kept = batch.filter(keep)
                    if kept.num_rows:
                        writer.write_batch(kept)
                    rows += kept.num_rows
                    if sum_column:
                        total += int(pc.sum(kept[sum_column]).as_py() or 0)
                    parts.append(keep.to_numpy(zero_copy_only=False))
                    if kind == "chunks":
                        self.report(chunks=kept.num_rows)
                masks.append(np.concatenate(parts) if parts else np.zeros(0, dtype=bool))
            writer.close()
        except BaseException:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
            raise
        publish(tmp, final)
        return file_record(self.root, final), rows, (total if sum_column else masks)

    def _kept_ids(self, sources, masks: list[np.ndarray]) -> list[np.ndarray]:
        from .index import read_chunk_ids

        return [read_chunk_ids(self.root, seg)[keep] for (_, seg), keep in zip(sources, masks)]

    def _copy_keys(self, sources, masks: list[np.ndarray], directory: Path, rows: int) -> dict:
        """Select the kept rows of each source's keys into one new keys file (same name, same identity)."""
        first = np.load(self.root / sources[0][1]["files"]["keys"]["path"], mmap_mode="r")
        final = directory / Path(sources[0][1]["files"]["keys"]["path"]).name
        tmp = tmp_path_for(final)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, first.shape[1]))
        at = 0
        for (_, seg), keep in zip(sources, masks):
            keys = np.load(self.root / seg["files"]["keys"]["path"], mmap_mode="r")
            for start in range(0, len(keep), BATCH_ROWS):
                block = keys[start: start + BATCH_ROWS][keep[start: start + BATCH_ROWS]]
                out[at: at + len(block)] = block
                at += len(block)
        out.flush()
        del out, first
        publish(tmp, final)
        return file_record(self.root, final)
