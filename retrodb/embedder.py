"""Frozen-BERT keys: mean-pooled (attention-masked), L2-normalised embeddings.

Two embedders share one interface (`identity()`, `embed(texts) -> float32
[n, dim]` with unit rows, `load()`):
- `BertEmbedder`: any local Hugging Face BERT-family directory (default: the
  bundled all-MiniLM-L6-v2). Creating one is cheap: its identity (weights
  sha256, dim from config.json) needs no model, and the model is loaded on
  the first `embed`, so a command with nothing to embed never loads it.
  `submit(texts, out)` hands texts to the embedder's pipeline
  (embed_pipeline.py: tokenising, device feeding and writing back each on
  their own thread, so the model never waits on the host) and returns a job
  to wait on; `embed` is submit-and-wait.
- `HashEmbedder` (`--model hash:DIM`): a deterministic bag-of-words hash,
  for tests and for timing the pipeline without a model. Texts that share
  words get similar keys, so neighbours are still meaningful.

The identity is recorded in the database config at the first embed and
compared on every later one, so keys from two models never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ConfigMismatch, MissingStage, RetrodbError, UsageError

DEFAULT_MAX_LENGTH = 128  # BERT tokens per chunk, [CLS] and [SEP] included; a 64-token chunk needs about 66
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
HASH_PREFIX = "hash:"
CPU_BATCH = 32  # chunks per forward on CPU: best or within noise of best for MiniLM and bert-base (bench_embed)
# On CUDA/MPS: the H100 sweep (docs/benchmarks.md) gave MiniLM's bare forward 74k chunks/s at 512, 86k at 1024
# and 90k at 2048 (bert-base 21k, 23k, 23k); 1024 gets most of it with half the activation memory of 2048.
ACCEL_BATCH = 1024
# On an accelerator one tokenising thread cannot keep up with the model (the GIL-bound part is turning
# token ids into arrays): windows are tokenised by this many processes instead (0: in a thread).
# RETRODB_TOKENIZE_PROCS overrides it, also on CPU (tests).
ACCEL_TOKENIZE_PROCS = 8

def weights_sha256(directory: Path) -> str:
    """sha256 over the weight files of a model directory (safetensors or PyTorch bins), in name order.

    Hashing reads every weight byte (118 ms for MiniLM's 86 MB, seconds for bert-large), and every `query` process
    needs the identity: the digest is cached, in this process and on disk (`cache_dir()`), keyed by each
    file's name, size, inode, mtime and ctime; a file that changes in any of them is hashed again.
    """
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise RetrodbError(f"no model weights (*.safetensors or *.bin) in {directory}",
                           hint="pass --model DIR with a local Hugging Face BERT directory")
    stats = [(p.name, (st := p.stat()).st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(directory.resolve()), stats]).encode()).hexdigest()
    cached = _IDENTITIES.get(key) or _read_identity_cache().get(key)
    if cached:
        _IDENTITIES[key] = cached
        return cached
    digest = _hash_files(files)
    _IDENTITIES[key] = digest
    _write_identity_cache(key, digest)
    return digest


_IDENTITIES: dict[str, str] = {}  # this process's weights digests, by the key of weights_sha256
IDENTITY_CACHE_ENTRIES = 64


def cache_dir() -> Path:
    """Where retrodb keeps caches that belong to no database: $RETRODB_CACHE_DIR, else $XDG_CACHE_HOME/retrodb,
    else ~/.cache/retrodb."""
    if os.environ.get("RETRODB_CACHE_DIR"):
        return Path(os.environ["RETRODB_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrodb"


def _read_identity_cache() -> dict:
    try:
        data = json.loads((cache_dir() / "weights-sha256.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_identity_cache(key: str, digest: str) -> None:
    """Best effort: a cache that cannot be written (read-only home) only costs the next process a hash."""
    from .atomic import atomic_write_bytes

    data = _read_identity_cache()
    data.pop(key, None)
    data[key] = digest
    data = dict(list(data.items())[-IDENTITY_CACHE_ENTRIES:])
    try:
        atomic_write_bytes(cache_dir() / "weights-sha256.json", json.dumps(data).encode())
    except OSError:
        pass


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def same_identity(a: dict | None, b: dict | None) -> bool:
    """Two identities make the same keys (same weights, dim and max length; the path may differ)."""
    if not a or not b:
        return False
    return all(a.get(k) == b.get(k) for k in ("sha256", "dim", "max_length", "pooling"))


def check_identity(recorded: dict, current: dict) -> None:
    if not same_identity(recorded, current):
        raise ConfigMismatch(
            f"the database's keys were made by {recorded['path']} (sha256 {recorded['sha256'][:12]}, dim "
            f"{recorded['dim']}, max length {recorded['max_length']}); this embedder is {current['path']} "
            f"(sha256 {current['sha256'][:12]}, dim {current['dim']}, max length {current['max_length']})",
            hint="leave out --model and --max-length to use the database's own embedder, or rebuild every key "
                 "with: retrodb embed DB --model DIR --reembed",
        )


class HashEmbedder:
    """Deterministic bag-of-words hashing embedder (no model, no torch)."""

    kind = "hash"
    _word = re.compile(r"\w+")

    def __init__(self, dim: int = 64, max_length: int = DEFAULT_MAX_LENGTH):
        if dim < 2:
            raise UsageError("hash embedder dimension must be at least 2 (hash:64)")
        self.dim = dim
        self.max_length = max_length
        self.device = "cpu"
        self.dtype = "fp32"
        self.loaded = True
        self.batch_size = 1024

    def identity(self) -> dict:
        return {"kind": "hash", "path": f"{HASH_PREFIX}{self.dim}", "sha256": hashlib.sha256(
            f"hash-embedder-v1:{self.dim}".encode()).hexdigest(), "pooling": "bag-of-words", "dim": self.dim,
            "max_length": self.max_length}

    def load(self) -> "HashEmbedder":
        return self

    @lru_cache(maxsize=1 << 16)
    def _slot(self, word: str) -> tuple[int, float]:
        d = hashlib.blake2b(word.encode(), digest_size=8).digest()
        v = int.from_bytes(d, "little")
        return v % self.dim, 1.0 if (v >> 63) & 1 else -1.0

    def embed(self, texts: list[str], on_batch=None, out: np.ndarray | None = None) -> np.ndarray:
        keys = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for w in self._word.findall(text.lower())[: self.max_length]:
                j, s = self._slot(w)
                keys[i, j] += s
        norms = np.linalg.norm(keys, axis=1, keepdims=True)
        keys[:, 0] += (norms[:, 0] == 0)  # a text with no words still gets a unit key
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        out = _output(out, len(texts), self.dim)
        out[:] = keys
        if on_batch is not None and texts:
            on_batch(len(texts))
        return out

    def submit(self, texts: list[str], out: np.ndarray | None = None, on_batch=None):
        """Computed at once, in this thread; the returned job is finished."""
        from .embed_pipeline import Job

        return Job([], self.embed(texts, on_batch, out))


def _output(out: np.ndarray | None, rows: int, dim: int) -> np.ndarray:
    if out is None:
        return np.empty((rows, dim), dtype=np.float32)
    if out.shape != (rows, dim) or out.dtype not in (np.float16, np.float32):
        raise ValueError(f"out must be float16/float32 of shape {(rows, dim)}, not {out.dtype} {out.shape}")
    return out


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def model_hidden_size(directory: Path) -> int:
    try:
        config = json.loads((directory / "config.json").read_text())
        return int(config.get("hidden_size") or config["dim"])
    except (OSError, ValueError, KeyError, TypeError):
        raise RetrodbError(f"{directory} has no readable config.json with a hidden_size",
                           hint="pass --model DIR with a local Hugging Face BERT directory") from None


class BertEmbedder:
    """A frozen Hugging Face BERT-family encoder with attention-masked mean pooling, loaded on first use."""

    kind = "bert"

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto",
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int | None = None):
        if device not in DEVICES:
            raise UsageError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if max_length < 3:
            raise UsageError(f"--max-length must be at least 3 BERT tokens, not {max_length}")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
        self.path = Path(model_dir).expanduser().resolve()
        if not self.path.is_dir():
            raise RetrodbError(f"model directory {self.path} does not exist",
                               hint="pass --model DIR with a local Hugging Face BERT directory")
        self.dim = model_hidden_size(self.path)
        self.max_length = max_length
        self.requested = (device, dtype)
        self.requested_batch = batch_size
        self.device: str | None = None  # set by load()
        self.dtype: str | None = None
        self.batch_size = batch_size
        self.model = None
        self.tokenizer = None
        self.load_seconds = 0.0
        self._sha: str | None = None
        self._pipeline = None  # started by the first submit (embed_pipeline.EmbedPipeline)
        self._pipeline_lock = threading.Lock()
        if device in ("cuda", "mps"):  # fail now, not after the model is read
            self._check_device(device)

    def __getstate__(self) -> dict:  # picklable for executors: the model is loaded again where it runs
        state = dict(self.__dict__)
        state.update(model=None, tokenizer=None, device=None, dtype=None, batch_size=self.requested_batch)
        for name in ("torch", "_encode", "_pad_id", "_tokenize_pool", "_pipeline", "_pipeline_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pipeline = None
        self._pipeline_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def identity(self) -> dict:
        if self._sha is None:
            self._sha = weights_sha256(self.path)
        return {"kind": "bert", "path": str(self.path), "sha256": self._sha, "pooling": "mean",
                "dim": self.dim, "max_length": self.max_length}

    # ------------------------------------------------------------ loading

    def _check_device(self, device: str) -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RetrodbError("--device cuda, but no CUDA device is visible to torch "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                               hint="use --device auto or --device cpu")
        if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RetrodbError("--device mps, but no Apple GPU is available", hint="use --device auto or --device cpu")

    def load(self) -> "BertEmbedder":
        """Read the tokenizer and the model, pick device, dtype and batch size. Idempotent."""
        if self.model is not None:
            return self
        started = time.perf_counter()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.torch = torch
        bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on our stderr
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.path), use_fast=True)
            model = AutoModel.from_pretrained(str(self.path), dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise RetrodbError(f"cannot load a Hugging Face model from {self.path}: {str(exc).splitlines()[0]}",
                               hint="the directory needs config.json, weights and a tokenizer") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        if not getattr(tokenizer, "is_fast", False):
            raise RetrodbError(f"{self.path} has no fast tokenizer (tokenizer.json)",
                               hint="save the tokenizer with a recent transformers to get tokenizer.json")
        if int(model.config.hidden_size) != self.dim:
            raise RetrodbError(f"{self.path}: config.json says hidden size {self.dim}, the model has "
                               f"{model.config.hidden_size}")
        self.tokenizer = tokenizer
        from tokenizers import Tokenizer

        self._backend_json = tokenizer.backend_tokenizer.to_str()
        backend = Tokenizer.from_str(self._backend_json)  # a copy: we set its truncation
        backend.no_padding()
        backend.enable_truncation(self.max_length)
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._pad_id = tokenizer.pad_token_id or 0
        self.model = model.eval().requires_grad_(False)
        self.device = self._pick_device(self.requested[0])
        self.model.to(self.device)
        self.dtype = self._pick_dtype(self.requested[1])
        if self.batch_size is None:
            self.batch_size = CPU_BATCH if self.device == "cpu" else ACCEL_BATCH
        self.load_seconds = time.perf_counter() - started
        return self

    def _pick_device(self, device: str) -> str:
        torch = self.torch
        if device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                return "mps"
            return "cpu"
        self._check_device(device)
        return device

    def _pick_dtype(self, dtype: str) -> str:
        if dtype != "auto":
            return dtype
        if self.device == "cuda":
            return "bf16" if self.torch.cuda.is_bf16_supported() else "fp16"
        if self.device == "mps":
            return "fp16"
        if not cpu_has_native_bf16():
            return "fp32"
        return self._measure_cpu_dtype()

    def _measure_cpu_dtype(self) -> str:
        """bf16 only if it is faster here: time a 32 x 64-token batch both ways, interleaved, best of 3."""
        torch = self.torch
        ids = torch.randint(1000, 2000, (32, 64))
        mask = torch.ones_like(ids)
        timings = {"fp32": float("inf"), "bf16": float("inf")}
        for name in timings:  # warm-up
            self.dtype = name
            self._forward(ids, mask)
        for _ in range(3):
            for name in timings:
                self.dtype = name
                t = time.perf_counter()
                self._forward(ids, mask)
                timings[name] = min(timings[name], time.perf_counter() - t)
        return "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"

    # ------------------------------------------------------------ embedding

    def _forward(self, input_ids, attention_mask):
        """Unit-length mean-pooled keys of one tokenised batch (int64 tensors on the device), float32, left on
        the device."""
        torch = self.torch
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype)
        with torch.inference_mode():
            with torch.autocast(device_type=self.device, dtype=amp) if amp is not None else nullcontext():
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def tokenize(self, texts: list[str]):
        """input_ids and attention_mask (int64) of one batch, padded to its longest text (to a multiple of 8
        off CPU; pinned on CUDA). For benchmarks: embedding tokenises inside the pipeline."""
        from .embed_pipeline import encode

        torch = self.torch
        lengths, flat = encode(self._encode, texts)
        width = int(lengths.max()) if len(lengths) else 0
        if self.device != "cpu":
            width = -(-width // 8) * 8
        mask = np.arange(width) < lengths[:, None]
        ids = np.full((len(lengths), width), self._pad_id, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids[mask] = flat[(starts[:, None] + np.arange(width))[mask]]
        ids, mask = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
        if self.device == "cuda":
            ids, mask = ids.pin_memory(), mask.pin_memory()
        return ids, mask

    def tokenize_procs(self) -> int:
        env = os.environ.get("RETRODB_TOKENIZE_PROCS")
        if env is not None:
            return max(0, int(env))
        if self.device == "cpu":
            return 0
        from .executor import main_reruns_caller

        if main_reruns_caller():  # spawned processes would re-run the caller's script (see executor.py)
            return 0
        return max(0, min(ACCEL_TOKENIZE_PROCS, (os.cpu_count() or 1) - 2))

    def _pool(self):
        """The tokenising process pool (created at first use, kept for the embedder's life)."""
        if getattr(self, "_tokenize_pool", None) is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            from .embed_pipeline import init_tokenize_worker

            self._tokenize_pool = ProcessPoolExecutor(
                self.tokenize_procs(), mp_context=mp.get_context("spawn"), initializer=init_tokenize_worker,
                initargs=(self._backend_json, self.max_length))
        return self._tokenize_pool

    def close(self) -> None:
        """Stop the pipeline's threads and the tokenising processes (a later submit starts them again)."""
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
        pool = getattr(self, "_tokenize_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            self._tokenize_pool = None

    def submit(self, texts: list[str], out: np.ndarray | None = None, on_batch=None):
        """Queue `texts` for embedding; returns a job whose `wait()` gives `out` (float16 or float32
        [len(texts), dim], e.g. a slice of a memory-mapped keys file; default a new float32 array) once
        every row is written. Thread-safe; jobs run in submission order, and `on_batch(n)` is called (from
        the pipeline's write thread) as each batch of n rows is written."""
        from .embed_pipeline import EmbedPipeline

        with self._pipeline_lock:
            self.load()
            out = _output(out, len(texts), self.dim)
            while True:
                pipeline = self._pipeline
                if pipeline is not None and pipeline.batch_size != self.batch_size:  # batch size changed (benchmarks)
                    pipeline.close()
                if pipeline is None or pipeline.closed:  # first use, idle too long, failed, or batch size changed
                    self._pipeline = EmbedPipeline(self)
                job = self._pipeline.submit(texts, out, on_batch)
                if job is not None:
                    return job

    def embed(self, texts: list[str], on_batch=None, out: np.ndarray | None = None) -> np.ndarray:
        """Keys for `texts`, in order: float32 [len(texts), dim] (or into `out`), rows of unit length."""
        return self.submit(texts, out, on_batch).wait()


def load_embedder(model: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                  max_length: int = DEFAULT_MAX_LENGTH, batch_size: int | None = None):
    """An embedder for `model`: a local HF directory, `hash:DIM`, or None for the bundled MiniLM.

    Cheap: a BERT model is read only at its first `embed` (or `load()`).
    """
    if model is not None and str(model).startswith(HASH_PREFIX):
        try:
            dim = int(str(model)[len(HASH_PREFIX):])
        except ValueError:
            raise UsageError(f"bad hash embedder {model!r}; use hash:DIM, e.g. hash:64") from None
        return HashEmbedder(dim, max_length)
    if model is None:
        from .tokenizer import default_model_dir

        model = default_model_dir()
    return BertEmbedder(model, device=device, dtype=dtype, max_length=max_length, batch_size=batch_size)


def embedder_for(config: dict, device: str = "auto", dtype: str = "auto", batch_size: int | None = None, *,
                 check: bool = True):
    """The embedder a database was built with (its config['embedder']), checked against its identity.

    If the recorded directory is gone (the database moved to another machine) and the
    bundled model has the recorded weights, the bundled one is used.
    """
    ident = config.get("embedder")
    if not ident:
        raise MissingStage("this database has no keys yet", hint="run: retrodb embed DB")
    path = ident["path"]
    if not path.startswith(HASH_PREFIX) and not Path(path).is_dir():
        path = _bundled_with(ident["sha256"]) or path
    emb = load_embedder(path, device=device, dtype=dtype, max_length=ident["max_length"], batch_size=batch_size)
    if check:
        check_identity(ident, emb.identity())
    return emb


def _bundled_with(sha256: str) -> Path | None:
    from .tokenizer import default_model_dir

    try:
        bundled = default_model_dir()
        return bundled if weights_sha256(bundled) == sha256 else None
    except RetrodbError:
        return None
