"""Stages on a Ray cluster: CPU stages as tasks, embed as a pool of actors (one model per GPU).

The same stage objects run here as in the local executor; this module only places units.
- The coordinator (the command, which holds the writer lock) hands out units, collects the
  results and commits. Workers write only their own unit's files: a segment directory, or their
  progress files under `_work/<job>/`. Nothing a worker does is visible before the commit.
- Every node must see the database directory at the same path: a shared filesystem. Before any
  unit runs, a probe task on every node reads a token the coordinator wrote under `_work/` and
  writes an answer back; a node that cannot is named in a clear error, before any work starts.
- A worker, actor or node that dies costs at most its unit: the unit is retried (RETRIES times,
  wherever Ray places it; a lost actor is replaced), and the stage is idempotent per unit, so the
  retry finds what the dead attempt finished (embed resumes from its last durable pass). The
  progress the dead attempt reported is taken back off the bar. An error the stage raises on
  purpose (bad input under --on-error fail, a damaged file) is not retried: it is the command's
  error, raised as itself. If the whole command dies, a rerun resumes as it does locally.
- Progress: workers add up their reports and send them every REPORT_EVERY seconds (and at the end
  of each unit) to one small actor on the coordinator's node, which the coordinator drains while
  it waits for results: one bar covers the whole cluster, and `nodes` gives figures per node.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import RetrodbError, require

RETRIES = 3  # attempts after the first, per unit, when its worker, actor or node dies
REPORT_EVERY = 0.5  # seconds between a worker's progress messages (and the coordinator's drains)
PROBE_TIMEOUT = 120.0  # seconds for every node to answer the shared-directory probe
STALL_TIMEOUT = 600.0  # seconds with units left, no live actor and none starting up, before giving up
SHARED_FS_HINT = ("every Ray node must see the database directory at the same path: put it on a shared "
                  "filesystem (NFS, Lustre, CephFS, ...) mounted at the same place on every node, or run "
                  "with --executor local")

Callback = Callable[[dict], None]
_probed: set = set()  # (directory, node ids) already probed by this process
_remote: dict = {}  # Ray remote wrappers of this module's functions and classes, made once


def connect(address: str | None = None):
    """The ray module, connected: to `address`, or to $RAY_ADDRESS, or to a new local cluster."""
    ray = require("ray", "ray")
    if not ray.is_initialized():
        import logging

        kwargs = dict(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
        if address is None and not os.environ.get("RAY_ADDRESS"):
            kwargs["include_dashboard"] = False
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise RetrodbError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}",
                               hint="check --ray-address (host:port of the head node, e.g. 10.0.0.1:6379) and "
                                    "that `ray status` works there") from None
    return ray


def _wrapped(name: str, obj, **options):
    if name not in _remote:
        _remote[name] = require("ray", "ray").remote(**options)(obj) if options else require("ray", "ray").remote(obj)
    return _remote[name]


def alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _on_node(ray, node_id: str, soft: bool = False):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)


# ---------------------------------------------------------------- the shared directory


def _probe(directory: str, token: str) -> tuple[bool, str]:
    """On one node: read the coordinator's token, write an answer beside it."""
    import ray

    from . import faults
    from .atomic import atomic_write_bytes

    path = Path(directory)
    try:
        faults.point("ray.probe")
        seen = (path / "token").read_text()
    except OSError as exc:
        return False, f"cannot read {path / 'token'}: {exc.strerror or exc}"
    if seen != token:
        return False, f"{path / 'token'} holds another token: this node sees another directory at that path"
    try:
        atomic_write_bytes(path / f"answer-{ray.get_runtime_context().get_node_id()}", token.encode())
    except OSError as exc:
        return False, f"cannot write in {path}: {exc.strerror or exc}"
    return True, ""


def check_shared_directory(ray, root: Path) -> None:
    """Refuse (RetrodbError) unless every alive node reads what this process wrote under `root`, and this
    process reads what each node wrote back. Once per directory and set of nodes per process."""
    from .atomic import atomic_write_bytes, make_dirs
    from .database import WORK

    root = Path(root).resolve()
    nodes = {n["NodeID"]: n for n in alive_nodes(ray)}
    key = (str(root), frozenset(nodes))
    if key in _probed:
        return
    token = uuid.uuid4().hex
    directory = make_dirs(root / WORK / f"ray-probe-{token[:12]}")
    try:
        atomic_write_bytes(directory / "token", token.encode())
        probe = _wrapped("probe", _probe)
        refs = {node: probe.options(num_cpus=0, max_retries=0, scheduling_strategy=_on_node(ray, node)).remote(
            str(directory), token) for node in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT)
        still = {n["NodeID"] for n in alive_nodes(ray)}  # a node that went away meanwhile runs nothing: not a problem
        problems = []
        for node, ref in refs.items():
            where = f"node {nodes[node].get('NodeManagerAddress', '?')} ({node[:12]})"
            if ref not in ready:
                if node in still:
                    problems.append(f"{where} did not answer within {PROBE_TIMEOUT:.0f} s")
                continue
            try:
                ok, detail = ray.get(ref)
            except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
                continue  # the node is gone (the list of nodes lags behind a node's death)
            except ray.exceptions.RayError as exc:
                ok, detail = False, f"the probe failed: {str(exc).splitlines()[0]}"
            if ok and not (directory / f"answer-{node}").exists():
                ok, detail = False, f"what it wrote in {directory} is not visible here"
            if not ok:
                problems.append(f"{where}: {detail}")
        if problems:
            more = f" (and {len(problems) - 1} more node(s))" if len(problems) > 1 else ""
            raise RetrodbError(f"a Ray node cannot use the database directory {root}: {problems[0]}{more}",
                               hint=SHARED_FS_HINT)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    _probed.add(key)


# ---------------------------------------------------------------- in the workers


class _ProgressSink:
    """An actor on the coordinator's node that collects workers' progress until the coordinator drains it."""

    def __init__(self):
        self.items: list = []

    def add(self, key: tuple, node: str, counts: dict) -> None:
        self.items.append((key, node, counts))

    def drain(self) -> list:
        items, self.items = self.items, []
        return items


class _Reporter:
    """A stage's reporter in a worker: adds up counts, sends them to the sink every REPORT_EVERY seconds."""

    def __init__(self, sink, key: tuple, node: str):
        self.sink, self.key, self.node = sink, key, node
        self.counts: dict = {}
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, counts: dict) -> None:
        with self.lock:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + v
        if time.monotonic() - self.last >= REPORT_EVERY:
            self.flush(wait=False)

    def flush(self, wait: bool) -> None:
        with self.lock:
            counts, self.counts = self.counts, {}
            self.last = time.monotonic()
        if not counts:
            return
        try:
            ref = self.sink.add.remote(self.key, self.node, counts)
            if wait:
                import ray

                ray.get(ref)
        except Exception:  # progress is best effort: it never fails a unit
            pass


def _run_unit(stage, unit, sink, key: tuple) -> dict:
    """Run one unit in a task or an actor thread; its progress goes to `sink` under `key` (unit id, attempt)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    stage = copy.copy(stage)  # an actor runs units on several threads: each gets its own reporter
    reporter = _Reporter(sink, key, node)
    stage.set_reporter(reporter)
    started = time.perf_counter()
    try:
        result = stage.run(unit)
    finally:
        reporter.flush(wait=True)
    return {"result": result, "node": node, "seconds": time.perf_counter() - started}


class _StageActor:
    """Holds one prepared stage (embed: one loaded model) and runs units on it, several at once."""

    def __init__(self, stage, env: dict):
        os.environ.update(env)
        self.stage = stage

    def ready(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        info = {"node": ctx.get_node_id(), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}
        try:
            info.update(self.stage.prepare())
        except RetrodbError as exc:
            exc.message = f"on Ray node {ray.util.get_node_ip_address()}: {exc.message}"
            raise
        return info

    def run(self, unit, sink, key: tuple) -> dict:
        return _run_unit(self.stage, unit, sink, key)


# ---------------------------------------------------------------- the coordinator


@dataclass
class ActorPlan:
    """How a stage that holds a model runs: one actor per GPU, or one CPU actor per node."""

    gpus: int | None = None  # GPU actors (None: every GPU of the cluster; 0, or none in the cluster: CPU actors)
    per_actor: int = 2  # units in flight per actor: the next is read and tokenised while one runs
    tokenize_procs: int = 8  # most tokenising processes per GPU actor (fewer where the node has few cores)


def unit_name(unit) -> str:
    from .snapshot import segment_name

    if isinstance(unit, dict) and isinstance(unit.get("segment"), int):
        return segment_name(unit["segment"])
    return str(unit)


def _cause(exc):
    """The exception a stage raised in a worker, as itself (a RetrodbError keeps its type and hint)."""
    ray = require("ray", "ray")
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
        return cause
    return RetrodbError(f"a Ray worker failed: {str(exc).splitlines()[0]}")


class RayExecutor:
    """Runs a stage's units on Ray: as tasks of `cpus_per_task` CPUs, or (with `actors`) on an actor pool.

    `address`: an existing cluster (host:port), else $RAY_ADDRESS, else a new local one. After `run`,
    `nodes` holds per-node figures and `retried` the number of unit attempts lost to dead workers.
    """

    def __init__(self, address: str | None = None, *, cpus_per_task: float = 1, actors: ActorPlan | None = None,
                 retries: int = RETRIES, max_in_flight: int | None = None):
        self.ray = require("ray", "ray")
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.actors = actors
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.nodes: list[dict] = []
        self.retried = 0
        self.actor_info: list[dict] = []

    def run(self, stage, units: Iterable, on_result: Callback | None = None,
            on_progress: Callback | None = None) -> list[dict]:
        ray = connect(self.address)
        if getattr(stage, "root", None) is not None:
            check_shared_directory(ray, Path(stage.root))
        job = _Job(ray, self, stage, units, on_result, on_progress)
        try:
            return job.run()
        finally:
            job.close()
            self.nodes = job.node_figures()
            self.retried = job.retried


class _Job:
    """The state of one RayExecutor.run: units to hand out, attempts in flight, progress and figures."""

    def __init__(self, ray, ex: RayExecutor, stage, units: Iterable, on_result, on_progress):
        self.ray, self.ex, self.stage = ray, ex, stage
        self.on_result, self.on_progress = on_result, on_progress
        self.total = len(units) if hasattr(units, "__len__") else None
        self.units = iter(units)
        self.exhausted = False
        self.todo: deque = deque()  # (uid, unit, attempt) to run before new units
        self.next_uid = 0
        self.inflight: dict = {}  # ObjectRef -> (uid, unit, attempt, actor slot or None)
        self.reported: dict = {}  # (uid, attempt) -> counts already passed to on_progress
        self.reported_node: dict = {}  # (uid, attempt) -> node it reported from
        self.dead: set = set()  # (uid, attempt) that died: late reports are dropped
        self.results: list[dict] = []
        self.retried = 0
        self.started = time.monotonic()
        self.per_node: dict[str, dict] = {}
        self.node_address = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
        self.last_drain = 0.0
        self.pool = _ActorPool(ray, stage, ex.actors) if ex.actors is not None else None
        here = ray.get_runtime_context().get_node_id()  # the sink lives and dies with the coordinator's node
        try:
            self.sink = _wrapped("sink", _ProgressSink).options(
                num_cpus=0, scheduling_strategy=_on_node(ray, here)).remote()
        except BaseException:
            if self.pool is not None:
                self.pool.close()
            raise
        if self.pool is None:
            self.task = _wrapped("run_unit", _run_unit)
            self.stage_ref = ray.put(stage)
            cpus = ray.cluster_resources().get("CPU", 1)
            self.capacity = ex.max_in_flight or max(2, int(2 * cpus / max(ex.cpus_per_task, 1e-3)))

    # ------------------------------------------------------------ units

    def _take(self):
        if self.todo:
            return self.todo.popleft()
        if self.exhausted:
            return None
        unit = next(self.units, _END)
        if unit is _END:
            self.exhausted = True
            return None
        self.next_uid += 1
        return (self.next_uid, unit, 0)

    def _submit(self) -> None:
        while True:
            if self.pool is None:
                if len(self.inflight) >= self.capacity:
                    return
                slot = None
            else:
                slot = self.pool.free_slot()
                if slot is None:
                    return
            item = self._take()
            if item is None:
                return
            uid, unit, attempt = item
            if slot is None:
                ref = self.task.options(num_cpus=self.ex.cpus_per_task, max_retries=0).remote(
                    self.stage_ref, unit, self.sink, (uid, attempt))
            else:
                ref = slot.handle.run.remote(unit, self.sink, (uid, attempt))
                slot.inflight += 1
            self.inflight[ref] = (uid, unit, attempt, slot)

    def run(self) -> list[dict]:
        if self.on_progress is not None and self.total is not None:
            self.on_progress({"units_total": self.total})
        while True:
            self._submit()
            waiting = list(self.inflight) + (self.pool.starting_refs() if self.pool else [])
            if not self.inflight and (self.exhausted and not self.todo):
                break
            if self.pool is not None:
                self.pool.check_stalled(bool(self.todo) or not self.exhausted)
            if not waiting:
                time.sleep(REPORT_EVERY)
                continue
            ready, _ = self.ray.wait(waiting, num_returns=1, timeout=REPORT_EVERY)
            self._drain()
            for ref in ready:
                if self.pool is not None and self.pool.is_starting(ref):
                    self.pool.started(ref)
                else:
                    self._finished(ref)
        self._drain(force=True)
        return self.results

    def _finished(self, ref) -> None:
        ray = self.ray
        uid, unit, attempt, slot = self.inflight.pop(ref)
        if slot is not None:
            slot.inflight -= 1
        try:
            out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        except ray.exceptions.RayError as exc:  # the worker, its actor or its node died: retry the unit
            self._lost(uid, unit, attempt, slot, exc)
            return
        self._drain(force=True)  # the unit's last report was sent before it returned
        key = (uid, attempt)
        node = out["node"]
        fig = self._node(node)
        fig["units"] += 1
        fig["seconds"] += out["seconds"]
        now = time.monotonic() - self.started
        fig["first"] = min(fig["first"], now - out["seconds"])
        fig["last"] = max(fig["last"], now)
        for k, v in self.reported.pop(key, {}).items():
            fig["counts"][k] = fig["counts"].get(k, 0) + v
        self.reported_node.pop(key, None)
        self.results.append(out["result"])
        if self.on_result is not None:
            self.on_result(out["result"])
        if self.on_progress is not None:
            self.on_progress({"units": 1})

    def _lost(self, uid, unit, attempt, slot, exc) -> None:
        key = (uid, attempt)
        self.dead.add(key)
        taken = self.reported.pop(key, {})
        node = self.reported_node.pop(key, None) or (slot.info.get("node") if slot is not None else None)
        if node is not None:
            self._node(node)["failed_units"] += 1
        if taken and self.on_progress is not None:
            self.on_progress({k: -v for k, v in taken.items()})
        if slot is not None:
            self.pool.lost(slot)
        self.retried += 1
        if attempt >= self.ex.retries:
            raise RetrodbError(f"{unit_name(unit)} failed {attempt + 1} times on the Ray cluster, the last time: "
                               f"{str(exc).splitlines()[0]}",
                               hint="check the cluster (ray status); rerun the command: finished units are kept")
        self.todo.appendleft((uid, unit, attempt + 1))

    def _drain(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_drain < REPORT_EVERY:
            return
        self.last_drain = time.monotonic()
        try:
            items = self.ray.get(self.sink.drain.remote())
        except self.ray.exceptions.RayError:
            return
        for key, node, counts in items:
            if key in self.dead:
                continue
            total = self.reported.setdefault(key, {})
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
            self.reported_node[key] = node
            if self.on_progress is not None:
                self.on_progress(counts)

    # ------------------------------------------------------------ figures

    def _node(self, node: str) -> dict:
        if node not in self.per_node:
            self.per_node[node] = {"units": 0, "failed_units": 0, "seconds": 0.0, "first": float("inf"),
                                   "last": 0.0, "counts": {}}
        return self.per_node[node]

    def node_figures(self) -> list[dict]:
        """Per node: units done and lost, seconds spent in units, the counts its units reported, and the rate of
        each count over the node's active time (its first unit's start to its last unit's end)."""
        if any(n not in self.node_address for n in self.per_node):
            self.node_address.update({n["NodeID"]: n.get("NodeManagerAddress") for n in self.ray.nodes()})
        out = []
        for node, fig in sorted(self.per_node.items(), key=lambda kv: (self.node_address.get(kv[0]) or "", kv[0])):
            active = fig["last"] - fig["first"] if fig["units"] else 0.0
            rec = {"node": node[:12], "address": self.node_address.get(node), "units": fig["units"],
                   "failed_units": fig["failed_units"], "seconds": round(fig["seconds"], 3),
                   "active_seconds": round(active, 3)}
            for k, v in sorted(fig["counts"].items()):
                rec[k] = v
                if active > 0:
                    rec[f"{k}_per_s"] = round(v / active, 1)
            if self.pool is not None:
                rec["actors"] = [{**a, "node": node[:12]} for a in self.pool.info if a.get("node") == node]
            out.append(rec)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.ex.actor_info = self.pool.info
            self.pool.close()
        for ref in list(self.inflight):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        try:
            self.ray.kill(self.sink)
        except Exception:
            pass


_END = object()


class _Slot:
    """One actor of the pool: its handle, its spec (to start a replacement), and its units in flight."""

    def __init__(self, handle, spec: dict):
        self.handle, self.spec = handle, spec
        self.inflight = 0
        self.info: dict = {}
        self.live = False


class _ActorPool:
    """The actors of a model stage: started at once, used once ready, replaced when they die."""

    def __init__(self, ray, stage, plan: ActorPlan):
        self.ray, self.plan = ray, plan
        self.stage_ref = ray.put(stage)
        self.cls = _wrapped("actor", _StageActor)
        self.slots: list[_Slot] = []
        self.starting: dict = {}  # ready() ObjectRef -> slot
        self.info: list[dict] = []  # what each actor said when ready (node, device, dtype, ...)
        self.replacements = 0
        self.since = time.monotonic()  # last time an actor was live or became ready
        gpus = plan.gpus if plan.gpus is not None else int(ray.cluster_resources().get("GPU", 0))
        if gpus > 0:
            per_node = {n["NodeID"]: n["Resources"] for n in alive_nodes(ray)}
            cores = max((r.get("CPU", 1) / max(r.get("GPU", 1), 1) for r in per_node.values()), default=1)
            procs = int(max(1, min(plan.tokenize_procs, cores - 1)))
            specs = [{"num_gpus": 1, "num_cpus": 1, "env": {"RETRODB_TOKENIZE_PROCS": str(procs)}}] * gpus
        else:  # one CPU actor per node, using its cores (torch threads)
            specs = [{"num_cpus": n["Resources"]["CPU"], "node": n["NodeID"], "env": {}}
                     for n in alive_nodes(ray) if n["Resources"].get("CPU", 0) >= 1]
            if not specs:
                raise RetrodbError("the Ray cluster has no node with a CPU or GPU to embed on",
                                   hint="add nodes (ray start --address ...) or run with --executor local")
        for spec in specs:
            self._start(spec)

    def _start(self, spec: dict) -> None:
        options = {"num_cpus": spec["num_cpus"], "max_concurrency": self.plan.per_actor + 1, "max_restarts": 0}
        if spec.get("num_gpus"):
            options["num_gpus"] = spec["num_gpus"]
        if spec.get("node"):  # soft: if that node is gone, anywhere else
            options["scheduling_strategy"] = _on_node(self.ray, spec["node"], soft=True)
        handle = self.cls.options(**options).remote(self.stage_ref, spec["env"])
        slot = _Slot(handle, spec)
        self.slots.append(slot)
        self.starting[handle.ready.remote()] = slot

    def starting_refs(self) -> list:
        return list(self.starting)

    def is_starting(self, ref) -> bool:
        return ref in self.starting

    def started(self, ref) -> None:
        ray = self.ray
        slot = self.starting.pop(ref)
        try:
            slot.info = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the stage cannot run there (no model, other weights)
            raise _cause(exc) from None
        except ray.exceptions.RayError:  # died while starting (its node went away): another one
            self.lost(slot)
            return
        slot.live = True
        self.since = time.monotonic()
        self.info.append(slot.info)

    def free_slot(self) -> _Slot | None:
        live = [s for s in self.slots if s.live and s.inflight < self.plan.per_actor]
        return min(live, key=lambda s: s.inflight) if live else None

    def lost(self, slot: _Slot) -> None:
        if slot not in self.slots:
            return
        self.slots.remove(slot)
        try:
            self.ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        if self.replacements < RETRIES * max(1, len(self.slots) + 1):
            self.replacements += 1
            self._start(slot.spec)

    def check_stalled(self, work_left: bool) -> None:
        if any(s.live for s in self.slots):
            self.since = time.monotonic()
            return
        if not work_left:
            return
        if not self.starting:
            raise RetrodbError("every model actor on the Ray cluster died and none could be started again",
                               hint="check the cluster (ray status); rerun the command: finished units are kept")
        if time.monotonic() - self.since > STALL_TIMEOUT:
            raise RetrodbError(f"no model actor could start on the Ray cluster within {STALL_TIMEOUT:.0f} s "
                               "(not enough free GPUs or CPUs?)",
                               hint="check the cluster (ray status), or ask for fewer with --gpus N")

    def close(self) -> None:
        for slot in self.slots:
            try:
                self.ray.kill(slot.handle, no_restart=True)
            except Exception:
                pass
        self.slots.clear()
        self.starting.clear()
