"""Executors run a stage over units: inline, in a local process pool, or on Ray.

They bound the number of units in flight (memory stays flat however many
units there are), pass each result to `on_result` as it arrives, and route
the stage's progress reports to `on_progress`.

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

from .errors import require
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
    """A process pool on this machine; `workers=1` runs inline in this process."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or default_workers()

    def run(self, stage: Stage, units: Iterable, on_result: Callback | None = None,
            on_progress: Callback | None = None) -> list[dict]:
        if self.workers == 1 or not spawn_is_safe(self.workers):
            stage.set_reporter(on_progress)
            try:
                results = []
                for unit in units:
                    results.append(stage.run(unit))
                    if on_result:
                        on_result(results[-1])
                return results
            finally:
                stage.set_reporter(None)
        ctx = mp.get_context("spawn")
        q = ctx.Queue() if on_progress else None
        stop = threading.Event()
        pump = threading.Thread(target=_pump, args=(q, on_progress, stop), daemon=True) if q else None
        if pump:
            pump.start()
        results: list[dict] = []
        try:
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as pool:
                pending = set()
                for unit in units:
                    pending.add(pool.submit(_run_in_worker, stage, unit))
                    if len(pending) >= 2 * self.workers:
                        pending = _collect(pending, results, on_result)
                while pending:
                    pending = _collect(pending, results, on_result)
        finally:
            stop.set()
            if pump:
                pump.join()
        return results


def _collect(pending: set, results: list, on_result) -> set:
    done, rest = wait(pending, return_when=FIRST_COMPLETED)
    for fut in done:
        results.append(fut.result())
        if on_result:
            on_result(results[-1])
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


class RayExecutor:
    """Runs each unit as a Ray task; `address` joins an existing cluster (default: start a local one)."""

    def __init__(self, address: str | None = None, max_in_flight: int = 64, num_cpus_per_task: float = 1):
        self.ray = require("ray", "ray")
        self.address = address
        self.max_in_flight = max_in_flight
        self.num_cpus_per_task = num_cpus_per_task

    def run(self, stage: Stage, units: Iterable, on_result: Callback | None = None,
            on_progress: Callback | None = None) -> list[dict]:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
        task = ray.remote(num_cpus=self.num_cpus_per_task)(_run_in_worker)
        stage_ref = ray.put(stage)
        results: list[dict] = []
        pending: list = []

        def drain(block_until: int) -> None:
            nonlocal pending
            while len(pending) > block_until:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    results.append(ray.get(ref))
                    if on_result:
                        on_result(results[-1])

        for unit in units:
            pending.append(task.remote(stage_ref, unit))
            drain(self.max_in_flight - 1)
        drain(0)
        return results


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


def make_executor(kind: str = "local", workers: int | None = None, address: str | None = None):
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address=address)
    raise ValueError(f"unknown executor {kind!r}: use local or ray")
