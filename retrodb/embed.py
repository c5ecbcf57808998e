"""`retrodb embed`: compute the keys of every segment that has none.

The embedder is chosen and its identity checked before any model is read, so
a run with nothing to do never loads one. Finished segments are committed in
groups (every `commit_every_segments` segments or `commit_every_s` seconds,
and at the end): a big database gets a few snapshots, not one per segment.
The first commit of a run that starts a model (a new database, or --reembed)
also records the embedder identity, so config and keys always change together.
Work in progress survives a crash: unfinished segments resume from their last
durable pass (see stages/embed.py) under `_work/embed-<sha12>-<maxlen>/`,
which the writer keeps while no other command has committed in between.

Locally the model is loaded once and two segments are embedded at a time on it
(one is read and tokenised while the other is on the model). On Ray
(`executor="ray"`), one actor per GPU holds a model (`gpus`; default every GPU
of the cluster; CPU actors, one per node, where there is none) and segments
stream to them; this process only commits (cluster.py).

`embed_texts` embeds arbitrary texts with a database's own embedder (query uses it).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import faults
from .database import Database, Writer
from .database import open as open_database
from .embedder import DEFAULT_MAX_LENGTH, check_identity, embedder_for, load_embedder, same_identity
from .errors import MissingStage, RetrodbError, UsageError
from .executor import check_executor, make_executor, node_figures, run_keeping_finished
from .snapshot import segment_name
from .stages.base import segment_unit
from .stages.embed import EmbedStage, keys_file_name

COMMIT_EVERY_S = 60.0  # commit finished segments at least this often...
COMMIT_EVERY_SEGMENTS = 64  # ...or once this many are finished


@dataclass
class EmbedReport:
    version: int  # snapshot current at the end
    model: str  # embedder path (or hash:DIM)
    device: str | None = None  # None when no model was needed
    dtype: str | None = None
    batch_size: int | None = None
    segments: list[str] = field(default_factory=list)  # segments whose keys this run committed
    skipped_segments: int = 0  # segments that already had keys of this embedder
    chunks: int = 0  # keys computed by this run
    resumed_chunks: int = 0  # keys an interrupted run had finished, reused
    commits: int = 0
    model_loaded: bool = False
    load_seconds: float = 0.0  # reading the model and choosing the dtype
    seconds: float = 0.0  # the whole run
    executor: str = "local"
    nodes: dict = field(default_factory=dict)  # on Ray: {"embed": [per-node figures]}
    retried_units: int = 0  # on Ray: unit attempts lost to a dead worker, actor or node, and run again

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        work = self.seconds - self.load_seconds
        d["chunks_per_s"] = round(self.chunks / work, 1) if self.chunks and work > 0 else None
        return d


def job_name(identity: dict) -> str:
    return f"embed-{identity['sha256'][:12]}-{identity['max_length']}"


def choose_embedder(recorded: dict | None, model: str | Path | None = None, *, device: str = "auto",
                    dtype: str = "auto", batch_size: int | None = None, max_length: int | None = None):
    """The embedder a run uses: `model` if given, else the database's own, else the bundled MiniLM."""
    if model is None and recorded:
        return embedder_for({"embedder": {**recorded, "max_length": max_length or recorded["max_length"]}},
                            device=device, dtype=dtype, batch_size=batch_size, check=False)
    return load_embedder(model, device=device, dtype=dtype, max_length=max_length or DEFAULT_MAX_LENGTH,
                         batch_size=batch_size)


def embed_executor(executor: str = "local", ray_address: str | None = None, gpus: int | None = None,
                   device: str = "auto", embedder=None):
    """The executor of the embed stage: locally, two units at a time on this process's model (one unit at a time
    for the hash embedder, which has no pipeline to keep busy); on Ray, model actors."""
    check_executor(executor)
    if executor == "local":
        if gpus is not None:
            raise UsageError("--gpus is for --executor ray (one model per GPU of the cluster); locally, --device "
                             "picks the device")
        return make_executor("local", 1, threads=1 if getattr(embedder, "kind", None) == "hash" else 2)
    from .cluster import ActorPlan

    if gpus is not None and gpus < 0:
        raise UsageError(f"--gpus must be 0 (CPU actors) or more, not {gpus}")
    return make_executor("ray", address=ray_address, actors=ActorPlan(gpus=0 if device == "cpu" else gpus))


def embed(root: str | Path, model: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
          batch_size: int | None = None, max_length: int | None = None, reembed: bool = False,
          wait: float = 0.0, progress=None, embedder=None, commit_every_s: float = COMMIT_EVERY_S,
          commit_every_segments: int = COMMIT_EVERY_SEGMENTS, executor: str = "local",
          ray_address: str | None = None, gpus: int | None = None) -> EmbedReport:
    """Embed every segment of the database at `root` that has no keys.

    With another model than the database's, refuse unless `reembed`: then the
    first commit switches the config and drops every old key and index, and
    the run rebuilds them all. `max_length=None` keeps the database's (or 128).
    `executor="ray"` embeds on the cluster at `ray_address` with `gpus` model actors (see the module doc).
    """
    started = time.perf_counter()
    embed_executor(executor, ray_address, gpus, device)  # bad options fail before the model is chosen
    db = open_database(root)
    owned = embedder is None
    if embedder is None:
        embedder = choose_embedder(db.config.get("embedder"), model, device=device, dtype=dtype,
                                   batch_size=batch_size, max_length=max_length)
    runner = embed_executor(executor, ray_address, gpus, device, embedder)
    ident = embedder.identity()
    job = job_name(ident)
    report = EmbedReport(db.version, ident["path"], executor=executor)
    with db.writer("embed", wait=wait, keep_job=job) as w:
        recorded = w.base.config.get("embedder")
        switching = recorded is not None and not same_identity(recorded, ident)
        if switching and not reembed:
            check_identity(recorded, ident)
        todo = [s for s in w.base.segments_where(lambda g: switching or g["without_keys"] > 0)
                if switching or "keys" not in s.files]
        report.skipped_segments = w.base.totals_summary["segments"] - len(todo)
        if todo or switching:
            _run(w, job, embedder, ident, todo, switching or recorded is None, report, progress,
                 commit_every_s, commit_every_segments, runner)
        report.version = w.base.version
    if owned and hasattr(embedder, "close"):
        embedder.close()  # its pipeline threads and tokenising processes, if it started any
    actors = getattr(runner, "actor_info", None)
    if actors:  # on Ray: what the actors loaded
        report.model_loaded = True
        report.device, report.dtype, report.batch_size = (_joined(a.get(k) for a in actors)
                                                          for k in ("device", "dtype", "batch_size"))
    else:
        report.model_loaded = getattr(embedder, "model", None) is not None
        if report.model_loaded or (embedder.kind == "hash" and report.chunks):
            report.device, report.dtype, report.batch_size = embedder.device, embedder.dtype, embedder.batch_size
        report.load_seconds = round(getattr(embedder, "load_seconds", 0.0), 3) if report.model_loaded else 0.0
    report.seconds = time.perf_counter() - started
    return report


def _joined(values):
    """The actors' value if they agree (as it is), else their distinct values joined with commas."""
    distinct = {v for v in values if v is not None}
    if len(distinct) <= 1:
        return next(iter(distinct), None)
    return ",".join(sorted(map(str, distinct)))


def _run(w: Writer, job: str, embedder, ident: dict, todo: list, new_identity: bool, report: EmbedReport,
         progress, commit_every_s: float, commit_every_segments: int, runner) -> None:
    work = w.work_dir(job)
    w.write_json(work / "plan.json", {"base_version": w.base.version, "identity": ident})
    pending: dict[str, dict] = {}
    last_commit = time.monotonic()

    def commit() -> None:
        nonlocal new_identity, last_commit
        edit = w.edit("embed")
        if new_identity:  # the run's first commit: config and keys change together
            if edit.config.get("embedder") is not None:  # --reembed: old keys and indexes no longer apply
                for seg in list(edit.segments()):  # (neighbours were computed from the old keys)
                    edit.put(seg.with_files(drop=["keys", "index", "neighbours"]).changed(neighbours=None,
                                                                                        shard=None))
            edit.config["embedder"] = ident
        for res in pending.values():
            edit.apply(res)
        faults.point("embed.before_commit")
        w.commit(edit)
        w.write_json(work / "plan.json", {"base_version": w.base.version, "identity": ident})
        report.segments.extend(segment_name(n) for n in sorted(pending))
        report.commits += 1
        pending.clear()
        new_identity = False
        last_commit = time.monotonic()

    def on_result(result: dict) -> None:
        pending[result["segment"]] = result
        report.chunks += result["chunks"]
        report.resumed_chunks += result["resumed_chunks"]
        if len(pending) >= commit_every_segments or time.monotonic() - last_commit >= commit_every_s:
            commit()

    def on_progress(counts: dict) -> None:
        if progress is not None:
            progress({**counts, "advance": counts.get("chunks", 0) + counts.get("resumed", 0)})

    local = not hasattr(runner, "actors")
    finals = [w.segment_dir(s.number) / keys_file_name(ident) for s in todo]
    if local and any(not f.exists() for f in finals):
        embedder.load()  # before the bar starts, so that chunks/s and ETA count embedding only
    for f in finals:  # what this run may publish: removed by the next writer unless committed or resumed
        w.track(f, job)
    if progress is not None:
        progress({"total": sum(s.chunks for s in todo)})
    stage = EmbedStage(w.root, embedder, work)
    try:
        run_keeping_finished(runner, stage, [segment_unit(s) for s in todo], on_result, on_progress,
                             pending, commit)
    finally:
        if not local:
            report.nodes = {"embed": node_figures(runner)}
            report.retried_units = runner.retried
    if pending or new_identity:
        commit()
    report.segments.sort()  # units finish out of order (two at a time, or on a cluster)
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- arbitrary texts


@lru_cache(maxsize=2)
def _cached_embedder(identity_json: str, device: str, dtype: str, batch_size: int | None):
    return embedder_for({"embedder": json.loads(identity_json)}, device=device, dtype=dtype, batch_size=batch_size)


def embed_texts(db_or_root: Database | str | Path, texts: list[str], *, device: str = "auto", dtype: str = "auto",
                batch_size: int | None = None) -> np.ndarray:
    """Keys of `texts` made by the database's own embedder: float32 [len(texts), dim], unit rows.

    Comparable with the stored keys (cosine = dot product). The embedder is
    loaded once per process and kept for the next call (two at most).
    """
    db = db_or_root if isinstance(db_or_root, Database) else open_database(db_or_root)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise RetrodbError("embed_texts takes a list of strings")
    ident = db.config.get("embedder")
    if not ident:
        raise MissingStage(f"{db.root} has no keys yet, so no embedder", hint=f"run: retrodb embed {db.root}")
    emb = _cached_embedder(json.dumps(ident, sort_keys=True), device, dtype, batch_size)
    return emb.embed(list(texts))
