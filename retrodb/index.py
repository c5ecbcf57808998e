"""`retrodb index`: one HNSW index per segment that has keys and no current index.

The index parameters ({space, M, ef_construction}) are recorded in the config
at the first build; a later build with other parameters is refused unless
`rebuild` is given, and then each segment's index is replaced as it is rebuilt
(queries keep working meanwhile on the old ones). Finished segments are
committed every `commit_every` segments and at the end, so an interrupted run
keeps most of its work, and an index file published just before a crash is
picked up, not rebuilt, by the next run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import faults
from .database import Database
from .errors import ConfigMismatch, MissingStage
from .executor import check_executor, make_executor, node_figures
from .shards import merge_units
from .snapshot import Segment, segment_name
from .stages.base import segment_unit
from .stages.index import DEFAULT_PARAMS, IndexStage, check_params, index_file_name, index_is_current

DEFAULT_COMMIT_EVERY = 16  # segments per commit: a crash loses at most this many builds


@dataclass
class IndexReport:
    version: int
    params: dict
    segments: list[str] = field(default_factory=list)  # built (or picked up) by this run
    chunks: int = 0
    resumed_segments: int = 0  # index files found published by an interrupted run
    up_to_date: int = 0  # segments whose index was already current
    without_keys: list[str] = field(default_factory=list)
    merged: list[dict] = field(default_factory=list)  # shards built by --merge: name, tier, vectors, segments
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # on Ray: {"index": [per-node figures]}
    retried_units: int = 0  # on Ray: unit attempts lost to a dead worker or node, and run again

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["keys_per_s"] = round(self.chunks / self.seconds, 1) if self.seconds and self.chunks else None
        return d


def build_segment_index(root: Path, seg: Segment, params: dict, threads: int | None = None) -> dict:
    """Build the index of one segment from its keys (labels = chunk ids); returns its file record.

    The file goes into the segment directory under a name of its own (temporary
    name, then publish); the caller records it in the segment's files and commits.
    """
    return IndexStage(Path(root), params, threads).run(segment_unit(seg))["entry"]["files"]["index"]


def requested_params(recorded: dict | None, space: str | None, M: int | None, ef_construction: int | None,
                     rebuild: bool) -> dict:
    """The parameters to build with: the options given, else the recorded ones, else the defaults."""
    given = {"space": space, "M": M, "ef_construction": ef_construction}
    base = recorded or DEFAULT_PARAMS
    params = check_params({**base, **{k: v for k, v in given.items() if v is not None}})
    if recorded and check_params(recorded) != params and not rebuild:
        raise ConfigMismatch(
            f"this database's indexes were built with {_fmt(recorded)}; you asked for {_fmt(params)}",
            hint="leave out the index options to use the recorded ones, or rebuild every index with: "
                 "retrodb index DB --rebuild " + " ".join(_flags(params)),
        )
    return params


def index(root: str | Path, *, space: str | None = None, M: int | None = None, ef_construction: int | None = None,
          threads: int | None = None, rebuild: bool = False, commit_every: int = DEFAULT_COMMIT_EVERY,
          executor: str = "local", ray_address: str | None = None, wait: float = 0.0, merge: bool = False,
          progress=None) -> IndexReport:
    """Build the HNSW index of every segment of the database at `root` that has keys and no current index;
    with `merge`, then merge index units into shards in size tiers (see retrodb/shards.py).

    Locally one segment at a time on `threads` threads (default all cores); on Ray each segment is a task of
    `threads` CPUs (default 1), as many at once as the cluster has room for."""
    check_executor(executor)
    if commit_every < 1:
        commit_every = 1
    db = Database(root)
    started = time.perf_counter()
    job = "index-" + hashlib.sha256(json.dumps([space, M, ef_construction, rebuild]).encode()).hexdigest()[:12]
    with db.writer("index", wait=wait, keep_job=job) as w:
        base = w.base
        if not len(base.segments):
            raise MissingStage(f"{w.root} has no segments yet", hint=f"run: retrodb ingest {w.root} SOURCE...")
        totals = base.totals_summary
        if totals["without_keys"] == totals["segments"] or not base.config.get("embedder"):
            raise MissingStage(f"{w.root} has no keys yet, so there is nothing to index",
                               hint=f"run: retrodb embed {w.root}")
        recorded = base.config.get("index")
        params = requested_params(recorded, space, M, ef_construction, rebuild)
        report = IndexReport(base.version, params)
        # only the groups that hold a segment without keys or without a current index are read
        stale = recorded is not None and recorded != params
        if merge and not stale:  # unindexed segments go straight into shards where a tier fills up
            report.merged = merge_units(w, params=params, threads=threads, unindexed=True)
            base = w.base
        todo, without = [], []
        for seg in base.segments_where(lambda s: stale or s["without_keys"] or s["unindexed"]):
            if "keys" not in seg.files:
                without.append(seg.name)
            elif (stale and seg.shard is not None) or (seg.shard is None and not index_is_current(seg.files, params)):
                todo.append(seg)
        report.without_keys = sorted(without)
        report.up_to_date = totals["segments"] - totals["without_keys"] - len(todo)
        if progress is not None:
            progress({"total": sum(s.chunks for s in todo)})
        work = w.work_dir(job)
        w.write_json(work / "plan.json", {"base_version": base.version})
        pending: dict[int, dict] = {}

        def commit() -> None:
            edit = w.edit("index")
            edit.config["index"] = params
            for res in pending.values():
                if edit.apply(res).shard is not None:  # rebuilt with other parameters: out of its old shard
                    edit.update(res["segment"], shard=None)
            faults.point("index.before_commit")
            w.commit(edit)
            w.write_json(work / "plan.json", {"base_version": w.base.version})
            pending.clear()

        def on_result(result: dict) -> None:
            pending[result["segment"]] = result
            report.segments.append(segment_name(result["segment"]))
            report.chunks += result["chunks"]
            report.resumed_segments += int(result["resumed"])
            if len(pending) >= commit_every:
                commit()

        if executor == "ray":
            threads = threads or 1
        stage = IndexStage(w.root, params, threads)
        for seg in todo:  # the files this run may publish: removed by the next writer unless committed
            w.track(w.segment_dir(seg.number) / index_file_name(params, seg.files["keys"]), job)
        on_progress = (lambda c: progress({**c, "advance": c.get("chunks", 0)})) if progress is not None else None
        runner = make_executor(executor, 1, ray_address, cpus_per_task=threads or 1)
        try:
            runner.run(stage, [segment_unit(s) for s in todo], on_result=on_result, on_progress=on_progress)
        finally:
            if executor == "ray":
                report.nodes = {"index": node_figures(runner)}
                report.retried_units = runner.retried
        if pending or recorded != params:
            commit()
        if merge:
            report.merged += merge_units(w, threads=threads)
        shutil.rmtree(work, ignore_errors=True)
        report.version = w.base.version
    report.seconds = time.perf_counter() - started
    return report


def _fmt(params: dict) -> str:
    return f"space={params['space']} M={params['M']} ef_construction={params['ef_construction']}"


def _flags(params: dict) -> list[str]:
    return [f"--space {params['space']}", f"--M {params['M']}", f"--ef-construction {params['ef_construction']}"]
