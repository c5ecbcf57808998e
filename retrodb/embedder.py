"""Frozen-BERT keys: mean-pooled (attention-masked), L2-normalised embeddings.

Two embedders share one interface (`embed(texts) -> float32 [n, dim]`, unit rows):
- `BertEmbedder`: any local Hugging Face BERT-family directory (default: the
  bundled all-MiniLM-L6-v2). Batches are sorted by length to avoid padding
  waste, and the next batch is tokenised on a thread while the model runs.
- `HashEmbedder` (`--model hash:DIM`): a deterministic bag-of-words hash,
  for tests and for timing the pipeline without a model. Texts that share
  words get similar keys, so neighbours are still meaningful.

Each has an `identity()` that the database records at its first embed and
compares on every later one, so keys from two models never mix.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ConfigMismatch, RetrodbError

DEFAULT_MAX_LENGTH = 128
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
HASH_PREFIX = "hash:"


def weights_sha256(directory: Path) -> str:
    """sha256 over the weight files of a model directory (safetensors or PyTorch bins), in name order."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise RetrodbError(f"no model weights (*.safetensors or *.bin) in {directory}",
                           hint="pass --model DIR with a local Hugging Face BERT directory")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


class HashEmbedder:
    """Deterministic bag-of-words hashing embedder (no model, no torch)."""

    kind = "hash"
    _word = re.compile(r"\w+")

    def __init__(self, dim: int = 64, max_length: int = DEFAULT_MAX_LENGTH):
        if dim < 2:
            raise RetrodbError("hash embedder dimension must be at least 2 (hash:64)")
        self.dim = dim
        self.max_length = max_length
        self.device = "cpu"
        self.dtype = "fp32"

    def identity(self) -> dict:
        return {"kind": "hash", "path": f"{HASH_PREFIX}{self.dim}", "sha256": hashlib.sha256(
            f"hash-embedder-v1:{self.dim}".encode()).hexdigest(), "pooling": "bag-of-words", "dim": self.dim,
            "max_length": self.max_length}

    @lru_cache(maxsize=1 << 16)
    def _slot(self, word: str) -> tuple[int, float]:
        d = hashlib.blake2b(word.encode(), digest_size=8).digest()
        v = int.from_bytes(d, "little")
        return v % self.dim, 1.0 if (v >> 63) & 1 else -1.0

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for w in self._word.findall(text.lower())[: self.max_length]:
                j, s = self._slot(w)
                out[i, j] += s
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out[:, 0] += (norms[:, 0] == 0)  # a text with no words still gets a unit key
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


class BertEmbedder:
    """A frozen Hugging Face BERT-family encoder with attention-masked mean pooling."""

    kind = "bert"

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto",
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.path = Path(model_dir).resolve()
        if not self.path.is_dir():
            raise RetrodbError(f"model directory {self.path} does not exist",
                               hint="pass --model DIR with a local Hugging Face BERT directory")
        if device not in DEVICES or dtype not in DTYPES:
            raise RetrodbError(f"unknown device/dtype {device}/{dtype}: devices {DEVICES}, dtypes {DTYPES}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), use_fast=True)
            self.model = AutoModel.from_pretrained(str(self.path))
        except (OSError, ValueError) as exc:
            raise RetrodbError(f"cannot load a Hugging Face model from {self.path}: {exc}".splitlines()[0],
                               hint="the directory needs config.json, weights and a tokenizer") from None
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.device = self._pick_device(device)
        self.model.to(self.device)
        self.dtype = self._pick_dtype(dtype)
        self.batch_size = batch_size or (256 if self.device == "cuda" else 64)
        self._sha = None

    def _pick_device(self, device: str) -> str:
        torch = self.torch
        if device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                return "mps"
            return "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RetrodbError("--device cuda, but no CUDA device is visible", hint="use --device auto or cpu")
        return device

    def _pick_dtype(self, dtype: str) -> str:
        if dtype != "auto":
            return dtype
        if self.device == "cuda":
            return "bf16"
        if self.device == "mps":
            return "fp16"
        if not cpu_has_native_bf16():
            return "fp32"
        return self._measure_cpu_dtype()

    def _measure_cpu_dtype(self) -> str:
        """bf16 only if it is faster here: time one 32 x 64-token batch both ways (after a warm-up)."""
        import time

        torch = self.torch
        ids = torch.randint(1000, 2000, (32, 64))
        mask = torch.ones_like(ids)
        timings = {}
        for name in ("fp32", "bf16"):
            self.dtype = name
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                self._forward(ids, mask)
                best = min(best, time.perf_counter() - t)
            timings[name] = best
        return "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"

    def identity(self) -> dict:
        if self._sha is None:
            self._sha = weights_sha256(self.path)
        return {"kind": "bert", "path": str(self.path), "sha256": self._sha, "pooling": "mean",
                "dim": self.dim, "max_length": self.max_length}

    def _forward(self, input_ids, attention_mask):
        torch = self.torch
        input_ids = input_ids.to(self.device, non_blocking=True)
        attention_mask = attention_mask.to(self.device, non_blocking=True)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype)
        with torch.inference_mode():
            if amp is not None:
                with torch.autocast(device_type=self.device if self.device != "mps" else "cpu", dtype=amp):
                    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            else:
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy()

    def _tokenize(self, texts: list[str]):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_token_type_ids=False)
        return enc["input_ids"], enc["attention_mask"]

    def embed(self, texts: list[str], on_batch=None) -> np.ndarray:
        """Keys for `texts`, in order: float32 [len(texts), dim], rows of unit length."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # Tokenise batch i+1 on a thread while batch i runs through the model.
        result: dict[int, object] = {}

        def prepare(i: int) -> None:
            result[i] = self._tokenize([texts[j] for j in batches[i]])

        thread = threading.Thread(target=prepare, args=(0,))
        thread.start()
        for i, idx in enumerate(batches):
            thread.join()
            ids, mask = result.pop(i)
            if i + 1 < len(batches):
                thread = threading.Thread(target=prepare, args=(i + 1,))
                thread.start()
            out[idx] = self._forward(ids, mask)
            if on_batch is not None:
                on_batch(len(idx))
        return out


def load_embedder(model: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                  max_length: int = DEFAULT_MAX_LENGTH, batch_size: int | None = None):
    """An embedder for `model`: a local HF directory, `hash:DIM`, or None for the bundled MiniLM."""
    if model is not None and str(model).startswith(HASH_PREFIX):
        try:
            dim = int(str(model)[len(HASH_PREFIX):])
        except ValueError:
            raise RetrodbError(f"bad hash embedder {model!r}; use hash:DIM, e.g. hash:64") from None
        return HashEmbedder(dim, max_length)
    if model is None:
        from .tokenizer import default_model_dir

        model = default_model_dir()
    return BertEmbedder(model, device=device, dtype=dtype, max_length=max_length, batch_size=batch_size)


def embedder_for(config: dict, device: str = "auto", dtype: str = "auto", batch_size: int | None = None):
    """The embedder a database was built with (its config['embedder']), checked against its identity."""
    ident = config.get("embedder")
    if not ident:
        from .errors import MissingStage

        raise MissingStage("this database has no keys yet", hint="run: retrodb embed DB")
    emb = load_embedder(ident["path"], device=device, dtype=dtype, max_length=ident["max_length"],
                        batch_size=batch_size)
    check_identity(ident, emb.identity())
    return emb


def check_identity(recorded: dict, current: dict) -> None:
    if recorded["sha256"] != current["sha256"] or recorded["dim"] != current["dim"] \
            or recorded["max_length"] != current["max_length"]:
        raise ConfigMismatch(
            f"the database's keys were made by {recorded['path']} (sha256 {recorded['sha256'][:12]}, dim "
            f"{recorded['dim']}, max length {recorded['max_length']}); this embedder is {current['path']} "
            f"(sha256 {current['sha256'][:12]}, dim {current['dim']}, max length {current['max_length']})",
            hint="use the database's own model, or rebuild every key with: retrodb embed DB --model DIR --reembed",
        )
