"""Executors run a stage over units: inline (on one or more threads), in a local process pool, or on Ray
(cluster.py).

They bound the number of units in flight (memory stays flat however many
units there are), pass each result to `on_result` as it arrives, and route
the stage's progress reports to `on_progress`, adding `{"units_total": n}`
first (when the units are a list) and `{"units": 1}` as each unit finishes.

Worker processes are spawned, and a spawned process re-runs the top-level
code of the main script. A script that calls retrodb at its top level
without `if __name__ == "__main__":` would have every worker start the same
command again (and fail on the writer lock). `main_reruns_caller` spots that
case from the call stack, and the pool is then not used: the work runs in
this process, with a warning that says how to get the workers back.
"""

from __future__ import annotations

import ast
import multiprocessing as mp
import os
import queue
import sys
import threading
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from typing import Callable, Iterable

from .errors import UsageError
from .stages.base import Stage

Callback = Callable[[dict], None]

_worker_queue = None


def _init_worker(q) -> None:
    global _worker_queue
    _worker_queue = q
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run_in_worker(stage: Stage, unit) -> dict:
    q = _worker_queue
    stage.set_reporter(q.put if q is not None else None)
    return stage.run(unit)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for reports and benchmarks."""
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main_reruns_caller() -> str | None:
    """The main script's path if a spawned worker would re-run the code that is calling us now (top-level code
    of the script, outside `if __name__ == "__main__":`), else None."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    if path is None or (name is not None and (name == "__main__" or name.endswith(".__main__"))):
        return None  # interactive, -c, or a package's __main__: multiprocessing does not re-run it
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return None  # not called while the main script's top level runs
    return None if frame.f_lineno in _guarded_lines(os.path.abspath(path)) else path


@lru_cache(maxsize=4)
def _guarded_lines(path: str) -> frozenset[int]:
    """Line numbers of a script that are inside a top-level `if __name__ == "__main__":` block."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_test(node.test):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return frozenset(lines)


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
        any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)


def spawn_is_safe(workers: int) -> bool:
    """False (with a warning) when spawned workers would re-run the caller's unguarded top-level code."""
    script = main_reruns_caller()
    if script is None:
        return True
    warnings.warn(f"retrodb runs in this process instead of {workers} worker processes: {script} calls it at "
                  "its top level, which each worker process would run again; put the call under "
                  "`if __name__ == \"__main__\":` to use the workers", RuntimeWarning, stacklevel=3)
    return False


class LocalExecutor:
    """A process pool on this machine; `workers=1` runs inline in this process, on `threads` threads (a stage
    that shares one model between units, as embed does, runs two units at once so that one is read and
    tokenised while the other is on the model)."""

    def __init__(self, workers: int | None = None, threads: int = 1):
        self.workers = workers or default_workers()
        self.threads = max(1, threads)

    def run(self, stage: Stage, units: Iterable, on_result: Callback | None = None,
            on_progress: Callback | None = None) -> list[dict]:
        if on_progress is not None and hasattr(units, "__len__"):
            on_progress({"units_total": len(units)})
        results: list[dict] = []

        def done(res: dict) -> None:
            results.append(res)
            if on_result:
                on_result(res)
            if on_progress:
                on_progress({"units": 1})

        if self.workers == 1 or not spawn_is_safe(self.workers):
            stage.set_reporter(on_progress)
            try:
                if self.threads == 1:
                    for unit in units:
                        done(stage.run(unit))
                else:
                    _run_on_threads(stage, units, self.threads, done)
                return results
            finally:
                stage.set_reporter(None)
        ctx = mp.get_context("spawn")
        q = ctx.Queue() if on_progress else None
        stop = threading.Event()
        pump = threading.Thread(target=_pump, args=(q, on_progress, stop), daemon=True) if q else None
        if pump:
            pump.start()
        try:
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
                pending = set()
                for unit in units:
                    pending.add(pool.submit(_run_in_worker, stage, unit))
                    if len(pending) >= 2 * self.workers:
                        pending = _collect(pending, done)
                while pending:
                    pending = _collect(pending, done)
        finally:
            stop.set()
            if pump:
                pump.join()
        return results


def _run_on_threads(stage: Stage, units: Iterable, threads: int, done: Callable[[dict], None]) -> None:
    """`stage.run` over `units`, `threads` at a time in this process; `done` is called in the calling thread."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="retrodb-unit") as pool:
        pending: set = set()
        try:
            for unit in units:
                pending.add(pool.submit(stage.run, unit))
                if len(pending) >= threads:
                    pending = _collect(pending, done)
            while pending:
                pending = _collect(pending, done)
        except BaseException:
            for fut in pending:
                fut.cancel()
            wait(pending)  # the units already running end before the error leaves (they share the stage)
            raise


def _collect(pending: set, done: Callable[[dict], None]) -> set:
    finished, rest = wait(pending, return_when=FIRST_COMPLETED)
    for fut in finished:
        done(fut.result())
    return rest


def _pump(q, on_progress, stop: threading.Event) -> None:
    while True:
        try:
            on_progress(q.get(timeout=0.1))
        except queue.Empty:
            if stop.is_set():
                return
        except (EOFError, OSError):
            return


def run_keeping_finished(executor, stage: Stage, units: Iterable, on_result: Callback, on_progress: Callback | None,
                         pending: dict, commit: Callable[[], None]) -> None:
    """Run `stage` over `units`; whatever stops the run, first commit the finished results still `pending`
    (each is complete), then re-raise."""
    try:
        executor.run(stage, units, on_result=on_result, on_progress=on_progress)
    except BaseException:
        if pending:
            try:
                commit()
            except Exception:
                pass
        raise


EXECUTORS = ("local", "ray")


def check_executor(kind: str) -> None:
    if kind not in EXECUTORS:
        raise UsageError(f"unknown --executor {kind!r}: use local or ray")


def make_executor(kind: str = "local", workers: int | None = None, address: str | None = None, *,
                  threads: int = 1, cpus_per_task: float = 1, actors=None):
    """`local`: a process pool of `workers` (inline on `threads` threads with one worker); `ray`: the cluster at
    `address` (default: $RAY_ADDRESS or a new local one), each unit a task of `cpus_per_task` CPUs, or with
    `actors` (cluster.ActorPlan) on a pool of model actors."""
    if kind == "local":
        return LocalExecutor(workers, threads)
    if kind == "ray":
        from .cluster import RayExecutor

        return RayExecutor(address, cpus_per_task=cpus_per_task, actors=actors)
    check_executor(kind)


def node_figures(executor) -> list[dict]:
    """Per-node figures of the executor's last run (Ray only; [] for the local executor)."""
    return list(getattr(executor, "nodes", []) or [])
