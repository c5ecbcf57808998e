"""`retrodb eval`: bits per byte of texts, with retrieval from a database and without.

The paper's metric: the model's total loss in bits over the UTF-8 bytes it predicts. Every
token but a text's first is predicted (nothing precedes the first, so its bytes are not
counted). A text longer than the model's window is read in overlapping windows that start at
chunk boundaries: each window scores only the tokens that the previous ones did not, with at
least window - stride tokens of context. With retrieval, the neighbours of each of the text's
chunks are retrieved live from the database (one batched query for all chunks of all texts),
exactly as `generate` does; without, the CCA layers are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import RetrodbError
from .retrieval import database_handle, retrieve

LN2 = math.log(2)


@dataclass
class TextBpb:
    bpb: float | None  # with retrieval (None if not computed)
    bpb_no_retrieval: float | None
    bytes: int  # UTF-8 bytes predicted (all but the first token's)
    tokens: int  # tokens predicted
    doc_id: str | None = None
    file: str | None = None


@dataclass
class BpbReport:
    bpb: float | None
    bpb_no_retrieval: float | None
    bytes: int
    tokens: int
    texts: list[TextBpb] = field(default_factory=list)
    seconds_retrieval: float = 0.0  # retrieving, plus the forward passes with retrieval
    seconds_no_retrieval: float = 0.0  # the forward passes without

    def to_dict(self) -> dict:
        """The `retrodb eval --format json` object."""
        return {"bpb": self.bpb, "bpb_no_retrieval": self.bpb_no_retrieval, "bytes": self.bytes,
                "tokens": self.tokens, "files": [{"file": t.file, "doc_id": t.doc_id, "bpb": t.bpb,
                                                  "bpb_no_retrieval": t.bpb_no_retrieval, "bytes": t.bytes,
                                                  "tokens": t.tokens} for t in self.texts]}


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each window over a text of n_tokens (positions 0..n-2 predict)."""
    out, scored = [], 0
    start = 0
    while scored < n_tokens - 1:
        out.append((start, scored))
        scored = min(start + window, n_tokens - 1)
        start += stride
    return out


@torch.no_grad()
def bits_per_byte(lm, db, texts: list[str], *, k: int = 2, exclude_doc=None, retrieval: bool | None = None,
                  window: int | None = None, stride: int | None = None, batch_size: int = 8, doc_ids=None,
                  files=None, on_progress=None) -> BpbReport:
    """Bits per byte of each of `texts` and overall. `retrieval`: None both, True/False only one.

    `db` is a retrodb.Database or its path (None: no retrieval). `exclude_doc` (ids) are left out of
    retrieval. `window` defaults to the model's training length, `stride` to half of it.
    `on_progress({"advance": n})` counts tokens as they are scored.
    """
    from ..tokenizer import chunk_batch

    db = database_handle(db)
    modes = {"with": retrieval in (None, True) and db is not None, "without": retrieval in (None, False)}
    if modes["with"]:
        lm.check_database(db)
    m = lm.chunk_size
    window = window or lm.seq_len
    stride = stride or max(m, window // 2 // m * m)
    if window % m or stride % m or not 0 < stride <= window:
        raise RetrodbError(f"window {window} and stride {stride} must be multiples of the chunk size {m}, "
                           "with 0 < stride <= window")
    device = lm.device
    model = lm.model
    chunked = chunk_batch(lm.tokenizer, texts, m)
    doc_starts = np.concatenate([[0], np.cumsum(chunked.doc_token_counts)])
    tokens_of = [chunked.tokens[doc_starts[i]: doc_starts[i + 1]].astype(np.int64) for i in range(len(texts))]

    # Retrieval: every chunk of every text in one batched query (a text's last partial chunk is never read).
    seconds = {"with": 0.0, "without": 0.0}
    chunk_rows: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(texts)
    retrieved = None
    if modes["with"]:
        started = _now(device)
        full = np.flatnonzero(chunked.chunk_token_counts == m)
        queries = [texts[chunked.chunk_doc[c]][chunked.chunk_char_start[c]: chunked.chunk_char_end[c]] for c in full]
        retrieved = retrieve(db, queries, k, m, exclude_doc=exclude_doc)
        row_of = {int(c): i for i, c in enumerate(full)}
        chunk_rows = [np.asarray([row_of.get(int(c), -1) for c in np.flatnonzero(chunked.chunk_doc == d)],
                                 dtype=np.int64) for d in range(len(texts))]
        seconds["with"] += _now(device) - started

    jobs = [(d, start, scored) for d, toks in enumerate(tokens_of) for start, scored in windows(len(toks), window, stride)]
    bits = {"with": np.zeros(len(texts)), "without": np.zeros(len(texts))}
    for i in range(0, len(jobs), batch_size):
        part = jobs[i: i + batch_size]
        ids = torch.zeros((len(part), window), dtype=torch.long)
        targets = torch.full((len(part), window), -100, dtype=torch.long)
        C = window // m
        nb = torch.zeros((len(part), C, k, 2 * m), dtype=torch.long)
        nb_mask = torch.zeros((len(part), C, k, 2 * m), dtype=torch.bool)
        for row, (d, start, scored) in enumerate(part):
            toks = tokens_of[d]
            stop = min(start + window, len(toks) - 1)  # last input position + 1
            ids[row, : stop - start] = torch.from_numpy(toks[start:stop])
            first = scored - start  # positions before it were scored by an earlier window
            targets[row, first: stop - start] = torch.from_numpy(toks[scored + 1: stop + 1])
            if retrieved is not None:
                rows = chunk_rows[d][start // m: start // m + C]
                have = rows >= 0
                nb[row, : len(rows)][torch.from_numpy(have)] = torch.from_numpy(retrieved.tokens[rows[have]])
                nb_mask[row, : len(rows)][torch.from_numpy(have)] = torch.from_numpy(retrieved.mask[rows[have]])
        ids, targets = ids.to(device), targets.to(device)
        for mode in ("with", "without"):
            if not modes[mode]:
                continue
            started = _now(device)
            args = (nb.to(device), nb_mask.to(device)) if mode == "with" else (None, None)
            with torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else _null():
                logits = model(ids, *args)
            loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100,
                                                     reduction="none").sum(1)  # (rows,) nats
            for row, (d, _, _) in enumerate(part):
                bits[mode][d] += loss[row].item() / LN2
            seconds[mode] += _now(device) - started
        if on_progress is not None:
            on_progress({"advance": int((targets != -100).sum())})

    per_text = []
    for d, toks in enumerate(tokens_of):
        n_bytes = int(lm.token_bytes[toks[1:]].sum()) if len(toks) > 1 else 0
        per_text.append(TextBpb(
            bpb=bits["with"][d] / n_bytes if modes["with"] and n_bytes else None,
            bpb_no_retrieval=bits["without"][d] / n_bytes if modes["without"] and n_bytes else None,
            bytes=n_bytes, tokens=max(len(toks) - 1, 0),
            doc_id=doc_ids[d] if doc_ids else None, file=files[d] if files else None))
    total_bytes = sum(t.bytes for t in per_text)
    return BpbReport(
        bpb=float(bits["with"].sum() / total_bytes) if modes["with"] and total_bytes else None,
        bpb_no_retrieval=float(bits["without"].sum() / total_bytes) if modes["without"] and total_bytes else None,
        bytes=total_bytes, tokens=sum(t.tokens for t in per_text), texts=per_text,
        seconds_retrieval=seconds["with"], seconds_no_retrieval=seconds["without"])


def _now(device: str) -> float:
    import time

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _null():
    from contextlib import nullcontext

    return nullcontext()


def read_documents(sources: list[str], text_field: str = "text", id_field: str = "id"):
    """The documents of `sources`, read as `retrodb ingest` reads them; bad input is an error naming it."""
    from ..errors import BadInput
    from ..readers import Issue, ReadOptions, plan_pieces, read_unit, unit

    opts = ReadOptions(text_field=text_field, id_field=id_field)
    pieces, issues = plan_pieces(sources, "auto", 1 << 62, opts)
    if issues:
        raise BadInput(str(issues[0]), hint="eval reads .txt/.md files, JSONL and Parquet, as ingest does")
    docs = []
    for item in read_unit(unit(0, pieces), opts):
        if isinstance(item, Issue):
            raise BadInput(str(item), hint="fix or leave out that input")
        docs.append(item)
    if not docs:
        raise BadInput(f"no documents in {', '.join(sources)}")
    return docs


def evaluate(db_path: str | Path, sources: list[str], *, model: str | Path | None = None, k: int = 2,
             exclude_doc=None, window: int | None = None, stride: int | None = None, batch_size: int = 8,
             device: str = "auto", text_field: str = "text", id_field: str = "id", on_progress=None) -> BpbReport:
    """`retrodb eval`: bits per byte of every document in `sources`, with retrieval from the database and without."""
    from ..database import open as open_db
    from .lm import load

    db = open_db(db_path)
    docs = read_documents(sources, text_field, id_field)
    lm = load(model, device)
    lm.check_database(db)
    return bits_per_byte(lm, db, [d.text for d in docs], k=k, exclude_doc=exclude_doc, window=window, stride=stride,
                         batch_size=batch_size, doc_ids=[d.doc_id for d in docs], files=[d.source for d in docs],
                         on_progress=on_progress)

