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

import time
from dataclasses import dataclass, field
from pathlib import Path

from . import faults
from .database import Database
from .errors import ConfigMismatch, MissingStage
from .executor import check_executor, make_executor, node_figures
from .snapshot import segment_name
from .stages.base import merge_result, segment_unit
from .stages.index import DEFAULT_PARAMS, IndexStage, check_params, index_is_current

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
    seconds: float = 0.0
    nodes: dict = field(default_factory=dict)  # on Ray: {"index": [per-node figures]}
    retried_units: int = 0  # on Ray: unit attempts lost to a dead worker or node, and run again

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["keys_per_s"] = round(self.chunks / self.seconds, 1) if self.seconds and self.chunks else None
        return d


def build_segment_index(root: Path, seg_name: str, seg: dict, params: dict, threads: int | None = None) -> dict:
    """Build the index of one segment from its keys (labels = chunk ids); returns its file record.

    The file goes into the segment directory under a name of its own (temporary
    name, then publish); the caller records it in the segment's files and commits.
    """
    return IndexStage(Path(root), params, threads).run(segment_unit(seg_name, seg))["entry"]["files"]["index"]


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
          executor: str = "local", ray_address: str | None = None, wait: float = 0.0,
          progress=None) -> IndexReport:
    """Build the HNSW index of every segment of the database at `root` that has keys and no current index.

    Locally one segment at a time on `threads` threads (default all cores); on Ray each segment is a task of
    `threads` CPUs (default 1), as many at once as the cluster has room for."""
    check_executor(executor)
    if commit_every < 1:
        commit_every = 1
    db = Database(root)
    started = time.perf_counter()
    with db.writer("index", wait=wait) as w:
        base = w.base
        with_keys = {n: s for n, s in base.segments.items() if "keys" in s["files"]}
        if not base.segments:
            raise MissingStage(f"{w.root} has no segments yet", hint=f"run: retrodb ingest {w.root} SOURCE...")
        if not with_keys or not base.config.get("embedder"):
            raise MissingStage(f"{w.root} has no keys yet, so there is nothing to index",
                               hint=f"run: retrodb embed {w.root}")
        recorded = base.config.get("index")
        params = requested_params(recorded, space, M, ef_construction, rebuild)
        report = IndexReport(base.version, params)
        report.without_keys = sorted(n for n in base.segments if n not in with_keys)
        todo = [(n, s) for n, s in sorted(with_keys.items()) if not index_is_current(s, params)]
        report.up_to_date = len(with_keys) - len(todo)
        if progress is not None:
            progress({"total": sum(s["chunks"] for _, s in todo)})
        pending: dict[str, dict] = {}

        def commit() -> None:
            data = w.base.derive("index")
            data["config"]["index"] = params
            for res in pending.values():
                merge_result(data["segments"], res)
            faults.point("index.before_commit")
            w.commit(data)
            pending.clear()

        def on_result(result: dict) -> None:
            name = segment_name(result["segment"])
            pending[name] = result
            report.segments.append(name)
            report.chunks += result["chunks"]
            report.resumed_segments += int(result["resumed"])
            if len(pending) >= commit_every:
                commit()

        if executor == "ray":
            threads = threads or 1
        stage = IndexStage(w.root, params, threads)
        on_progress = (lambda c: progress({**c, "advance": c.get("chunks", 0)})) if progress is not None else None
        runner = make_executor(executor, 1, ray_address, cpus_per_task=threads or 1)
        try:
            runner.run(stage, [segment_unit(n, s) for n, s in todo], on_result=on_result, on_progress=on_progress)
        finally:
            if executor == "ray":
                report.nodes = {"index": node_figures(runner)}
                report.retried_units = runner.retried
        if pending or recorded != params:
            commit()
        report.version = w.base.version
    report.seconds = time.perf_counter() - started
    return report


def _fmt(params: dict) -> str:
    return f"space={params['space']} M={params['M']} ef_construction={params['ef_construction']}"


def _flags(params: dict) -> list[str]:
    return [f"--space {params['space']}", f"--M {params['M']}", f"--ef-construction {params['ef_construction']}"]
