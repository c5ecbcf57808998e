"""`retrodb embed`: compute the keys of every segment that has none, committing as it goes.

Each finished segment is committed at once, so an interrupted run keeps its
finished segments and a rerun only embeds the rest. The first embed records
the embedder identity in the config; a later embed with another model is
refused unless `reembed` rebuilds every key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .database import Database
from .embedder import DEFAULT_MAX_LENGTH, check_identity, load_embedder
from .stages.embed import EmbedStage


@dataclass
class EmbedReport:
    version: int
    model: str
    device: str
    dtype: str
    segments: list[str] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["chunks_per_s"] = round(self.chunks / self.seconds, 1) if self.seconds and self.chunks else None
        return d


def embed(root: str | Path, model: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
          batch_size: int | None = None, max_length: int = DEFAULT_MAX_LENGTH, reembed: bool = False,
          wait: float = 0.0, progress=None, embedder=None) -> EmbedReport:
    """Embed every segment of the database at `root` that has no keys (all of them with `reembed`)."""
    db = Database(root)
    recorded = db.config.get("embedder")
    if embedder is None:
        if model is None and recorded and not reembed:
            model, max_length = recorded["path"], recorded["max_length"]
        embedder = load_embedder(model, device=device, dtype=dtype, max_length=max_length, batch_size=batch_size)
    ident = embedder.identity()
    started = time.perf_counter()
    report = EmbedReport(db.version, ident["path"], embedder.device, embedder.dtype)
    with db.writer("embed", wait=wait) as w:
        recorded = w.base.config.get("embedder")
        if recorded and not reembed:
            check_identity(recorded, ident)
        todo = [(n, s) for n, s in sorted(w.base.segments.items()) if reembed or "keys" not in s["files"]]
        if progress is not None:
            progress({"total": sum(s["chunks"] for _, s in todo)})
        stage = EmbedStage(w.root, embedder)
        stage.set_reporter(lambda c: progress and progress({**c, "advance": c.get("chunks", 0)}))
        if reembed or not recorded:
            data = w.base.derive("embed")
            data["config"]["embedder"] = ident
            if reembed:  # keys and indexes of the old model no longer apply
                for seg in data["segments"].values():
                    seg["files"].pop("keys", None)
                    seg["files"].pop("index", None)
            w.commit(data)
        for name, seg in todo:
            result = stage.run((name, seg))
            data = w.base.derive("embed")
            data["segments"][name]["files"]["keys"] = result["record"]
            w.commit(data)
            report.segments.append(name)
            report.chunks += result["chunks"]
        report.version = w.base.version
    report.seconds = time.perf_counter() - started
    return report
