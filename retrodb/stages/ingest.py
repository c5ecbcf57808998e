"""Ingest stage: one work unit of input -> one segment (documents + chunks Parquet).

Memory is bounded per batch of documents and, for a long document, per
window of its text (see tokenizer.WINDOW_CHARS); a document that cannot be
tokenised in bounded memory is refused as too-large, naming it.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
from pathlib import Path

from .. import faults
from ..atomic import atomic_write_bytes
from ..errors import BadInput
from ..readers import Document, Issue, ReadOptions, read_unit, unit_size
from ..segment import SegmentWriter
from ..snapshot import SEGMENTS, segment_name
from ..tokenizer import chunk_batch, load_tokenizer, too_large
from .base import Stage, result

MAX_ISSUES_KEPT = 200  # per unit; counts are always exact
BATCH_CHARS = 1 << 20  # tokenise about 1 MB of text per batch call
BATCH_DOCS = 2048


class Pipeline:
    """Runs writes on one background thread (Parquet encoding and zstd release the GIL), so the
    next batch is tokenised while the previous one is written. At most two batches wait."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    item[0](*item[1:])
                except BaseException as exc:  # re-raised in the submitting thread
                    self._error = exc

    def submit(self, fn, *args) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((fn, *args))

    def close(self, check: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if check and self._error is not None:
            raise self._error


class IngestStage(Stage):
    name = "ingest"

    def __init__(self, root: Path, job_dir: Path, config: dict, read_opts: ReadOptions, on_error: str = "skip"):
        self.root = Path(root)
        self.job_dir = Path(job_dir)
        self.tokenizer_path = config["tokenizer"]["path"]
        self.token_type = config["tokenizer"]["token_type"]
        self.chunk_size = config["chunk_size"]
        self.read_opts = read_opts
        self.on_error = on_error

    def marker(self, segment: int) -> Path:
        return self.job_dir / f"{segment_name(segment)}.done.json"

    def run(self, unit: dict) -> dict:
        """`unit`: {"segment": number, "pieces": [Piece, ...]}."""
        segment = unit["segment"]
        marker = self.marker(segment)
        if marker.exists():
            done = json.loads(marker.read_text())
            done["resumed"] = True
            self.report(bytes=unit_size(unit), documents=done["entry"]["documents"], tokens=done["entry"]["tokens"])
            return done
        seg_dir = self.root / SEGMENTS / segment_name(segment)
        if seg_dir.exists():  # a half-written attempt of this same unit
            shutil.rmtree(seg_dir)
        tokenizer = load_tokenizer(self.tokenizer_path)
        writer = SegmentWriter(self.root, seg_dir, segment, self.token_type)
        issues: list[dict] = []
        counts: dict[str, int] = {}
        seen: set[str] = set()
        batch: list[Document] = []
        batch_chars = 0

        def note(issue: Issue) -> None:
            if self.on_error == "fail":
                raise BadInput(str(issue), hint="fix the input, or pass --on-error skip to skip bad records")
            counts[issue.kind] = counts.get(issue.kind, 0) + 1
            if len(issues) < MAX_ISSUES_KEPT:
                issues.append(issue.to_dict())

        def flush() -> None:
            nonlocal batch, batch_chars
            if not batch:
                return
            chunked = chunk_batch(tokenizer, [d.text for d in batch], self.chunk_size)
            keep = chunked.doc_token_counts > 0
            if not keep.all():  # text with no tokens at all (e.g. only control characters)
                for d, k in zip(batch, keep):
                    if not k:
                        note(Issue("empty", d.source, "skipped: no tokens in document"))
                batch = [d for d, k in zip(batch, keep) if k]
                chunked = chunk_batch(tokenizer, [d.text for d in batch], self.chunk_size) if batch else None
            if chunked is not None:
                background.submit(writer.write, batch, chunked)
                self.report(documents=len(batch), tokens=int(chunked.doc_token_counts.sum()))
            batch, batch_chars = [], 0

        background = Pipeline()
        try:
            for item in read_unit(unit, self.read_opts):
                if isinstance(item, Issue):
                    note(item)
                    continue
                if item.doc_id in seen:
                    note(Issue("duplicate-id", item.source, f"duplicate document id {item.doc_id!r}; first one kept"))
                    continue
                if reason := too_large(tokenizer, item.text):
                    note(Issue("too-large", item.source, f"document {item.doc_id!r} skipped: {reason}"))
                    continue
                seen.add(item.doc_id)
                batch.append(item)
                batch_chars += len(item.text)
                if batch_chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                    flush()
            flush()
            background.close()
            faults.point("ingest.before_close")
        except BaseException:
            background.close(check=False)
            writer.abort()
            raise
        files = writer.close()
        if writer.documents == 0:
            shutil.rmtree(seg_dir, ignore_errors=True)
            files = {}
        done = result(segment, {"documents": writer.documents, "chunks": writer.chunks, "tokens": writer.tokens,
                                "files": files}, issues=issues, issue_counts=counts)
        faults.point("ingest.before_marker")
        atomic_write_bytes(marker, json.dumps(done).encode())
        faults.point("ingest.segment_done")
        self.report(bytes=unit_size(unit))
        return done
