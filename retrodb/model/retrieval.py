"""Live retrieval for evaluation and generation: chunk texts -> the [N, F] tokens of their neighbours.

The chunk texts of a batch go to `Database.query` together (one embedding pass, every segment
searched in parallel); the neighbours' stored token ids, chunk followed by continuation, are
what the model reads. An edit of the database (add, delete, redact) shows up at the next call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUERY_BATCH = 256  # chunk texts per Database.query call
_HANDLES: dict = {}  # database root -> the Database handle this process retrieves through


@dataclass
class Retrieved:
    tokens: np.ndarray  # (n, k, 2m) int64: neighbour chunk then its continuation, 0-padded
    mask: np.ndarray  # (n, k, 2m) bool: True at real tokens
    neighbours: list[list]  # per query, best first: (chunk_id, score) pairs, or Neighbour objects (with_text)


def database_handle(db):
    """A Database for `db` (a handle, returned as it is, or a path) at its CURRENT snapshot.

    For a path, one handle per database is kept in this process and moved to the newest
    snapshot at each call, so an edit made meanwhile (by any process) is seen at once, while
    the loaded embedder and the indexes of unchanged segments are reused.
    """
    if db is None or hasattr(db, "query"):
        return db
    from pathlib import Path

    from ..database import open as open_db
    from ..snapshot import read_current

    root = str(Path(db).resolve())
    handle = _HANDLES.get(root)
    if handle is None:
        handle = _HANDLES[root] = open_db(root)
    elif handle.version != handle.current_version():
        handle.snapshot = read_current(handle.root)
    return handle


def neighbour_arrays(results, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, F] token ids and masks of query results (fewer than k neighbours: padding rows)."""
    tokens = np.zeros((len(results), k, 2 * m), dtype=np.int64)
    mask = np.zeros((len(results), k, 2 * m), dtype=bool)
    for i, r in enumerate(results):
        for j, n in enumerate(r.neighbours[:k]):
            ids = (list(n.tokens) + list(n.continuation_tokens))[: 2 * m]
            tokens[i, j, : len(ids)] = ids
            mask[i, j, : len(ids)] = True
    return tokens, mask


def retrieve(db, texts: list[str], k: int, m: int, *, exclude_doc=None, on_batch=None,
             with_text: bool = False) -> Retrieved:
    """The k nearest chunks of each text in `db` (a retrodb.Database), leaving out `exclude_doc`.

    By default only what the model reads is fetched: the neighbours' ids (`Database.nearest`), then
    their stored [N, F] token ids (`retrodb.data.neighbour_tokens`); `neighbours` holds (chunk_id,
    score) pairs. `with_text` goes through `Database.query` instead, and `neighbours` holds its
    `Neighbour` objects (document, text, continuation), for showing what was retrieved.
    """
    if with_text:
        results = []
        for i in range(0, len(texts), QUERY_BATCH):
            part = texts[i: i + QUERY_BATCH]
            results.extend(db.query(part, k, exclude_doc=exclude_doc or None))
            if on_batch is not None:
                on_batch(len(part))
        tokens, mask = neighbour_arrays(results, k, m)
        return Retrieved(tokens, mask, [r.neighbours[:k] for r in results])
    from ..data import neighbour_tokens

    ids = np.full((len(texts), k), -1, dtype=np.int64)
    hits: list[list] = []
    for i in range(0, len(texts), QUERY_BATCH):
        part = texts[i: i + QUERY_BATCH]
        for j, row in enumerate(db.nearest(part, k, exclude_doc=exclude_doc or None)):
            ids[i + j, : len(row)] = [cid for cid, _, _ in row[:k]]
            hits.append([(cid, score) for cid, score, _ in row[:k]])
        if on_batch is not None:
            on_batch(len(part))
    tokens, mask = neighbour_tokens(db, ids, m)
    return Retrieved(tokens, mask, hits)
