"""Executors run a stage over units: inline, in a local process pool, or on Ray.

They bound the number of units in flight (memory stays flat however many
units there are), pass each result to `on_result` as it arrives, and route
the stage's progress reports to `on_progress`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
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


class LocalExecutor:
    """A process pool on this machine; `workers=1` runs inline in this process."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or default_workers()

    def run(self, stage: Stage, units: Iterable, on_result: Callback | None = None,
            on_progress: Callback | None = None) -> list[dict]:
        if self.workers == 1:
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
