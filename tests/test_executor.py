"""Executors without Ray: units on threads, unit progress, and what --executor ray says when ray is missing."""

import sys
import threading
import time

import pytest

from retrodb.errors import MissingDependency, UsageError
from retrodb.executor import LocalExecutor, make_executor
from retrodb.stages.base import Stage
from tests.edit_helpers import build_db


class SlowStage(Stage):
    """Sleeps a little per unit and records which threads ran units at the same time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[str] = set()

    def run(self, unit: dict) -> dict:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        time.sleep(0.05)
        self.report(chunks=unit["segment"])
        with self.lock:
            self.running -= 1
        return {"segment": unit["segment"], "entry": {}, "resumed": False}


def test_inline_threads_run_two_units_at_once_and_report_units():
    stage, seen, progress = SlowStage(), [], []
    results = LocalExecutor(workers=1, threads=2).run(stage, [{"segment": i} for i in range(1, 7)],
                                                      on_result=seen.append, on_progress=progress.append)
    assert sorted(r["segment"] for r in results) == list(range(1, 7)) and len(seen) == 6
    assert stage.most == 2 and len(stage.threads) == 2
    assert progress[0] == {"units_total": 6}
    assert sum(p.get("units", 0) for p in progress) == 6 and sum(p.get("chunks", 0) for p in progress) == 21


def test_inline_threads_stop_at_the_first_error():
    class Failing(SlowStage):
        def run(self, unit):
            if unit["segment"] == 2:
                raise ValueError("boom")
            return super().run(unit)

    with pytest.raises(ValueError, match="boom"):
        LocalExecutor(workers=1, threads=2).run(Failing(), ({"segment": i} for i in range(1, 50)))


def test_unknown_executor_is_a_usage_error(cli, tmp_path):
    with pytest.raises(UsageError, match="unknown --executor 'slurm'"):
        make_executor("slurm")
    db = build_db(tmp_path / "db", n_docs=4)
    for args in (["embed", db], ["index", db], ["compact", db], ["neighbours", db], ["add", db, tmp_path]):
        res = cli(*args, "--executor", "slurm")
        assert res.code == 2 and "unknown --executor 'slurm'" in res.err, args


def test_gpus_need_the_ray_executor(tmp_path):
    from retrodb.embed import embed

    db = build_db(tmp_path / "db", n_docs=4, embed=None)
    with pytest.raises(UsageError, match="--gpus is for --executor ray"):
        embed(db, "hash:16", gpus=1)


def test_missing_ray_says_which_extra_to_install(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    db = build_db(tmp_path / "db", n_docs=4, embed=None)
    from retrodb.embed import embed

    with pytest.raises(MissingDependency) as err:
        embed(db, "hash:16", executor="ray")
    assert "pip install 'retrodb[ray]'" in err.value.hint
    for args in (["ingest", tmp_path / "db2", tmp_path / "db-src.jsonl"], ["embed", db, "--model", "hash:16"]):
        res = cli(*args, "--executor", "ray")
        assert res.code == 1 and "optional package 'ray'" in res.err and "retrodb[ray]" in res.err, args
    assert not (tmp_path / "db2").exists()  # refused before the database is created
