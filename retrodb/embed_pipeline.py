"""The embedder's pipeline: texts in, keys out, each step on its own thread so the model never waits.

    submit(texts, out) -> Job        (any thread; jobs run in submission order, back to back)
      tokenise  thread   texts -> windows -> padded int32 batches (windows go to a process pool on
                         accelerators, several in flight, the next job's as soon as this job's are out)
      compute   thread   batch -> pinned host buffer -> device (asynchronous copy) -> forward, masked
                         mean, L2 norm, float16 -> pinned host buffer (asynchronous copy), an event
      write     thread   waits for that event, scatters the rows into `out`, calls on_batch
    Job.wait()

Why each piece (issue 14, on an H100 the stage ran at 0.31x of the bare forward, host-bound):
- the compute thread does nothing but feed the device: no padding (done where the text is tokenised),
  no mask building (made on the device from the lengths), no waiting for a copy back (the write thread
  waits on the batch's event), so the device queue stays full while Python threads take turns;
- host buffers are pinned once and reused (a ring), so copies are asynchronous and allocation-free;
  a slot is reused only after its copy's event completed;
- a job's windows grow from one batch to WINDOW_BATCHES, so the first batch is ready after one
  batch's tokenising, and the tokenise thread moves on to the next job while the device runs this
  one: a caller that submits its next pass before it waits for this one (the embed stage does,
  and two segments are embedded at once) never drains the pipeline between passes or segments.
On CPU the same threads run with plain tensors (no pinning, no events): the forward dominates and the
other threads cost little.

Batches: texts are taken longest first (by characters), cut into windows, sorted by token count within
each window and cut into batches, so a batch pads very little; the same texts in the same job always
make the same batches, whatever else runs, so keys do not depend on concurrency or scheduling.
A failure in any thread fails every job in the pipeline (their wait() raises it) and the pipeline stops;
the embedder starts a new one on its next submit. So does a pipeline left idle for IDLE seconds (its
threads end, so an embedder that is dropped does not keep threads, or its model, alive).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from itertools import chain

import numpy as np

PREFETCH = 4  # padded batches waiting for the compute thread
IN_FLIGHT = 4  # batches computed (on the device) waiting for the write thread; also the pinned output slots
INPUT_SLOTS = 4  # pinned input buffers
WINDOW_BATCHES = 16  # largest window, in batches
POLL = 0.1  # seconds between checks of the stop flag while a thread waits
IDLE = 30.0  # seconds without a job after which the threads end (the embedder starts new ones when needed)

_worker_tokenizer = None


def init_tokenize_worker(tokenizer_json: str, max_length: int) -> None:
    """Process-pool initializer: the embedder's tokenizer, truncating at max_length."""
    global _worker_tokenizer
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker_tokenizer.no_padding()
    _worker_tokenizer.enable_truncation(max_length)


def encode(encode_batch, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, flat ids int32) of `texts`, with the Rust tokenizer called directly (the same ids as the
    transformers tokenizer, without its per-token Python lists)."""
    rows = [e.ids for e in encode_batch(texts)]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    return lengths, np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))


def pad_batches(lengths: np.ndarray, flat: np.ndarray, batch_size: int, multiple: int, pad_id: int) -> list:
    """One window's batches: (rows, ids int32 [b, width], lengths int64 [b]); rows index the window, sorted by
    token count (longest first); width is the longest row, rounded up to `multiple`."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    by_length = np.argsort(-lengths, kind="stable")
    out = []
    for b in range(0, len(by_length), batch_size):
        pick = by_length[b: b + batch_size]
        n = lengths[pick]
        width = -(-int(n.max()) // multiple) * multiple if len(n) else 0
        mask = np.arange(width) < n[:, None]
        ids = np.full((len(pick), width), pad_id, dtype=np.int32)
        ids[mask] = flat[(starts[pick][:, None] + np.arange(width))[mask]]  # row r, column c: flat[starts[r] + c]
        out.append((pick, ids, n))
    return out


def tokenize_window(texts: list[str], batch_size: int, multiple: int, pad_id: int) -> list:
    """In a tokenising worker process: one window's padded batches."""
    fast = getattr(_worker_tokenizer, "encode_batch_fast", _worker_tokenizer.encode_batch)
    return pad_batches(*encode(fast, texts), batch_size, multiple, pad_id)


def window_sizes(n: int, batch_size: int):
    """Window lengths covering n texts: 1, 1, 2, 4, ... batches, then WINDOW_BATCHES batches each."""
    start, batches = 0, 1
    first = True
    while start < n:
        size = min(n - start, batches * batch_size)
        yield start, start + size
        start += size
        if not first:
            batches = min(WINDOW_BATCHES, batches * 2)
        first = False


class Job:
    """One submitted list of texts; `wait()` returns `out` once every row is written, or raises the failure."""

    def __init__(self, texts: list[str], out: np.ndarray, on_batch=None):
        self.texts = texts
        self.out = out
        self.on_batch = on_batch
        self.left = len(texts)
        self.error: BaseException | None = None
        self.done = threading.Event()
        if not texts:
            self.done.set()

    def wait(self) -> np.ndarray:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.out

    def fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()


class _Ready:
    """A finished 'future' for windows tokenised in the tokenise thread itself."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class EmbedPipeline:
    """Runs a loaded BertEmbedder's model over submitted jobs (see the module doc)."""

    def __init__(self, emb):
        self.emb = emb
        self.torch = emb.torch
        self.device = emb.device
        # Staged: batches go through the ring of host buffers (pinned, with events, on CUDA). Always on CUDA;
        # RETRODB_EMBED_STAGED=1 runs the same path on CPU (plain buffers, no-op events), so tests exercise it.
        self.pinned = emb.device == "cuda"
        self.staged = self.pinned or os.environ.get("RETRODB_EMBED_STAGED") == "1"
        self.multiple = 1 if emb.device == "cpu" else 8
        self.batch_size = emb.batch_size
        self.procs = emb.tokenize_procs()
        self.jobs: queue.Queue = queue.Queue()
        self.batches: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.written: queue.Queue = queue.Queue(maxsize=IN_FLIGHT)
        self.stop = threading.Event()
        self.closed = False  # no more jobs: closed, idle too long, or failed
        self.error: BaseException | None = None
        self._live: set[Job] = set()  # submitted and not yet finished, to fail on a pipeline failure
        self._lock = threading.Lock()
        self._in_slots: list | None = None
        self._in_next = 0
        self._out_free: dict = {}  # torch dtype -> queue of free pinned output buffers
        self.threads = [threading.Thread(target=self._guard, args=(fn,), name=f"retrodb-embed-{name}", daemon=True)
                        for name, fn in (("tokenise", self._tokenise), ("compute", self._compute),
                                         ("write", self._write))]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------ outside

    def submit(self, texts: list[str], out: np.ndarray, on_batch=None) -> Job | None:
        """The job, queued; None if this pipeline takes no more jobs (the caller starts another)."""
        job = Job(texts, out, on_batch)
        if not texts:
            return job
        with self._lock:
            if self.closed:
                return None
            self._live.add(job)
            self.jobs.put(job)
        return job

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self.stop.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        self._fail_all(RuntimeError("the embedding pipeline was closed"))

    # ------------------------------------------------------------ plumbing

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # one failure stops the pipeline and fails every job in it
            with self._lock:
                self.closed = True
                if self.error is None:
                    self.error = exc
            self.stop.set()
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            live, self._live = list(self._live), set()
        for job in live:
            job.fail(exc)

    def _get(self, q: queue.Queue, block: bool = True):
        """The next item of `q`; None once the pipeline stops (or at once, when not blocking and q is empty)."""
        while not self.stop.is_set():
            try:
                return q.get(timeout=POLL) if block else q.get_nowait()
            except queue.Empty:
                if not block:
                    return None
        return None

    def _next_job(self, block: bool):
        """The next job (None: none now, or stopping); waiting for one, the pipeline closes itself after IDLE
        seconds without any job in it."""
        if not block:
            return self._get(self.jobs, block=False)
        idle_since = time.monotonic()
        while not self.stop.is_set():
            try:
                return self.jobs.get(timeout=POLL)
            except queue.Empty:
                if time.monotonic() - idle_since < IDLE:
                    continue
                with self._lock:
                    if self.jobs.empty() and not self._live:
                        self.closed = True
                        self.stop.set()
                        return None
                idle_since = time.monotonic()
        return None

    def _put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------ tokenise

    def _tokenise(self) -> None:
        emb = self.emb
        pool = emb._pool() if self.procs else None
        most = 2 * self.procs if pool else 1  # windows being tokenised at once
        windows: deque = deque()  # (job, rows) not yet handed out
        futures: deque = deque()  # (job, rows, future)
        while not self.stop.is_set():
            # Take jobs: wait only when there is nothing else to do; otherwise top up so the pool starts on the
            # next job's windows while this job's last batches are computed.
            while len(windows) < most:
                job = self._next_job(block=not windows and not futures)
                if job is None:
                    break
                order = np.argsort(np.fromiter((-len(t) for t in job.texts), dtype=np.int64, count=len(job.texts)),
                                   kind="stable")
                windows.extend((job, order[a:b]) for a, b in window_sizes(len(order), self.batch_size))
            if self.stop.is_set():
                return
            while windows and len(futures) < most:
                job, rows = windows.popleft()
                texts = [job.texts[j] for j in rows]
                fut = pool.submit(tokenize_window, texts, self.batch_size, self.multiple, emb._pad_id) if pool \
                    else _Ready(pad_batches(*encode(emb._encode, texts), self.batch_size, self.multiple, emb._pad_id))
                futures.append((job, rows, fut))
            if not futures:
                continue
            job, rows, fut = futures.popleft()
            for pick, ids, lengths in fut.result():
                if job.done.is_set():  # failed
                    break
                if not self._put(self.batches, (job, rows[pick], ids, lengths)):
                    return

    # ------------------------------------------------------------ compute

    def _event(self):
        """An event recorded now on the current stream (CUDA), or one that is always complete (CPU)."""
        if not self.pinned:
            return _DONE
        event = self.torch.cuda.Event()
        event.record()
        return event

    def _input_slot(self):
        """The next (ids, lengths) host buffer pair, once its previous copy to the device is complete."""
        torch = self.torch
        if self._in_slots is None:
            width = self.emb.max_length + self.multiple
            self._in_slots = [[torch.empty(self.batch_size * width, dtype=torch.int32, pin_memory=self.pinned),
                               torch.empty(self.batch_size, dtype=torch.int64, pin_memory=self.pinned), None]
                              for _ in range(INPUT_SLOTS)]
        slot = self._in_slots[self._in_next]
        self._in_next = (self._in_next + 1) % len(self._in_slots)
        if slot[2] is not None:
            slot[2].synchronize()
        return slot

    def _to_device(self, ids: np.ndarray, lengths: np.ndarray):
        torch = self.torch
        if not self.staged:
            return torch.from_numpy(ids).to(self.device), torch.from_numpy(lengths).to(self.device)
        slot = self._input_slot()
        host_ids = slot[0][: ids.size].view(ids.shape)
        host_ids.copy_(torch.from_numpy(ids))
        host_len = slot[1][: len(lengths)]
        host_len.copy_(torch.from_numpy(lengths))
        dev = host_ids.to(self.device, non_blocking=True), host_len.to(self.device, non_blocking=True)
        slot[2] = self._event()  # (on CPU the "copy" is the buffer itself, used before this slot comes round)
        return dev

    def _output_slot(self, dtype):
        """A free pinned [batch, dim] buffer of `dtype` (waits while the write thread is IN_FLIGHT batches behind)."""
        free = self._out_free.get(dtype)
        if free is None:
            free = self._out_free[dtype] = queue.Queue()
            for _ in range(IN_FLIGHT + 1):
                free.put(self.torch.empty((self.batch_size, self.emb.dim), dtype=dtype, pin_memory=self.pinned))
        return self._get(free)

    def _compute(self) -> None:
        torch = self.torch
        while (item := self._get(self.batches)) is not None:
            job, rows, ids, lengths = item
            if job.done.is_set():
                continue
            dev_ids, dev_len = self._to_device(ids, lengths)
            mask = (torch.arange(ids.shape[1], device=dev_ids.device) < dev_len[:, None]).to(torch.int64)
            keys = self.emb._forward(dev_ids.to(torch.int64), mask)
            if job.out.dtype == np.float16:  # round on the device: half the bytes to copy back
                keys = keys.to(torch.float16)
            event = slot = None
            if self.staged:
                slot = self._output_slot(keys.dtype)
                if slot is None:
                    return
                host = slot[: len(rows)]
                host.copy_(keys, non_blocking=True)
                event = self._event()
            else:
                host = keys  # on CPU already; another device: the write thread copies it back
            if not self._put(self.written, (job, rows, host, event, slot)):
                return

    # ------------------------------------------------------------ write

    def _write(self) -> None:
        while (item := self._get(self.written)) is not None:
            job, rows, host, event, slot = item
            if event is not None:
                event.synchronize()
            if not job.done.is_set():
                job.out[rows] = host.cpu().numpy()
            if slot is not None:
                self._out_free[slot.dtype].put(slot)
            if job.done.is_set():
                continue
            job.left -= len(rows)
            if job.on_batch is not None:
                job.on_batch(len(rows))
            if job.left == 0:
                with self._lock:
                    self._live.discard(job)
                job.done.set()


class _Complete:
    """The event of a CPU 'copy': complete as soon as it is made."""

    def synchronize(self) -> None:
        pass


_DONE = _Complete()


def run_inline(emb, texts: list[str], out: np.ndarray) -> np.ndarray:
    """The same batches as the pipeline, computed in the calling thread (a reference for tests and benchmarks)."""
    torch = emb.torch
    multiple = 1 if emb.device == "cpu" else 8
    order = np.argsort(np.fromiter((-len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    for a, b in window_sizes(len(order), emb.batch_size):
        rows = order[a:b]
        for pick, ids, lengths in pad_batches(*encode(emb._encode, [texts[j] for j in rows]), emb.batch_size,
                                              multiple, emb._pad_id):
            ids_t = torch.from_numpy(ids).to(emb.device).to(torch.int64)
            mask = (torch.arange(ids.shape[1], device=ids_t.device) < torch.from_numpy(lengths).to(emb.device)[:, None])
            keys = emb._forward(ids_t, mask.to(torch.int64))
            if out.dtype == np.float16:
                keys = keys.to(torch.float16)
            out[rows[pick]] = keys.cpu().numpy()
    return out


