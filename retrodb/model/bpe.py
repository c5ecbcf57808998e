"""The model's LM tokenizer: a byte-level BPE trained with Hugging Face `tokenizers`.

Byte-level, so every UTF-8 text has a tokenization and every token is a fixed byte string
(`token_bytes` gives their lengths, which bits-per-byte needs). No special tokens: the
database stores tokens without them, and a document that happens to contain "<|endoftext|>"
must tokenise as text. Padding is id 0 with a mask beside it, never inferred from the id.
The vocabulary stays under 65,536 so stored ids fit uint16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

DEFAULT_VOCAB_SIZE = 8192


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 < vocab_size <= 65535:
        raise ValueError(f"vocab_size must be in 257..65535, not {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, directory: str | Path) -> Path:
    """Write `tokenizer.json` into `directory` (a loadable tokenizer directory for retrodb)."""
    from ..atomic import atomic_write_bytes

    path = Path(directory) / "tokenizer.json"
    atomic_write_bytes(path, tok.to_str(pretty=True).encode())
    return path


def token_bytes(tok) -> np.ndarray:
    """UTF-8 byte length of every token id (byte-level BPE: one vocabulary character is one byte)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for piece, i in vocab.items():
        lengths[i] = len(piece)
    return lengths
