"""A loaded model with its tokenizer: what `retrodb eval`, `generate` and the Python API use.

    lm = load()                   # the bundled checkpoint; load(DIR) for another (or a training run)
    lm.bpb(db, texts)             # bits per byte with and without retrieval (evaluate.py)
    lm.generate(db, prompt)       # text, retrieving for each completed chunk (generate.py)

The model reads a database only if the database's LM tokenizer is the model's (compared by hash):
stored token ids are fed to the model as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigMismatch, RetrodbError
from . import BUNDLED
from .checkpoint import read_model_dir, resolve_model_dir, weights_sha256
from .config import RetroConfig
from .decoder import Retro


@dataclass
class RetroLM:
    model: Retro
    directory: Path
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_sha256: str
    token_bytes: np.ndarray  # UTF-8 bytes of each token id
    device: str
    seq_len: int  # the window it was trained on (eval and generation use it)

    @property
    def config(self) -> RetroConfig:
        return self.model.cfg

    @property
    def chunk_size(self) -> int:
        return self.model.cfg.chunk_size

    def weights_sha256(self) -> str:
        return weights_sha256(self.directory)

    def describe(self) -> str:
        return "the bundled RETRO model" if self.directory == BUNDLED else f"the model in {self.directory}"

    def check_database(self, db) -> None:
        """Refuse a database whose LM tokenizer is not this model's (its token ids would mean other text)."""
        have = db.config["tokenizer"]
        if have["sha256"] != self.tokenizer_sha256:
            raise ConfigMismatch(
                f"{db.root} was built with the LM tokenizer at {have['path']} (sha256 {have['sha256'][:12]}), but "
                f"{self.describe()} reads its own tokenizer {self.directory / 'tokenizer.json'} "
                f"(sha256 {self.tokenizer_sha256[:12]})",
                hint=f"build a database with the model's tokenizer (new databases use the bundled model's by default: "
                     f"retrodb ingest NEW-DB SOURCES, or --tokenizer {self.directory}), or train a model on this "
                     f"database: retrodb train {db.root} --out DIR")
        if db.config["chunk_size"] != self.chunk_size:
            raise ConfigMismatch(f"{db.root} has chunks of {db.config['chunk_size']} tokens; {self.describe()} reads "
                                 f"chunks of {self.chunk_size}",
                                 hint=f"build a database with --chunk-size {self.chunk_size}")

    def bpb(self, db, texts: list[str], **kw):
        """Bits per byte of `texts`, with retrieval from `db` and without (see evaluate.bits_per_byte)."""
        from .evaluate import bits_per_byte

        return bits_per_byte(self, db, texts, **kw)

    def generate(self, db, prompt: str, **kw):
        """Continue `prompt`, retrieving from `db` for each completed chunk (see generate.generate)."""
        from .generate import generate

        return generate(self, db, prompt, **kw)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RetrodbError("--device cuda, but no CUDA device is visible to torch", hint="use --device auto or cpu")
    if device not in ("cpu", "cuda"):
        raise RetrodbError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def load(path: str | Path | None = None, device: str = "auto") -> RetroLM:
    """The model in `path` (a model directory or a training run's output), or the bundled one; offline."""
    import json

    from ..tokenizer import load_tokenizer, tokenizer_info
    from .bpe import token_bytes

    directory = BUNDLED if path is None else resolve_model_dir(path)
    if path is None and not (directory / "config.json").exists():
        raise RetrodbError(f"the bundled model is missing from {directory}",
                           hint="reinstall retrodb, or pass --model DIR (see docs/model.md: make model)")
    device = pick_device(device)
    model = read_model_dir(directory, device)
    tok = load_tokenizer(str(directory))
    training = directory / "training.json"
    seq_len = json.loads(training.read_text()).get("seq_len", 512) if training.exists() else 512
    return RetroLM(model=model, directory=directory, tokenizer=tok, tokenizer_sha256=tokenizer_info(directory).sha256,
                   token_bytes=token_bytes(tok), device=device, seq_len=int(seq_len))
