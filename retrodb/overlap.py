"""Token overlap between a chunk and what was retrieved for it: RETRO's leakage measure (paper, section 2.6).

r(C) = (length of the longest contiguous token run that C shares with any retrieved [N, F])
       / (tokens in C)

r(C) = 1 means the whole chunk is in the database; r(C) near 0, only common words are. The
run is computed on LM token ids (the database's tokenizer), with a dynamic program over two
token arrays, vectorised along the longer one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Run:
    """The longest common contiguous run of two token sequences a and b."""

    length: int
    a_start: int  # where it starts in a (0 when length is 0)
    b_start: int  # where it starts in b

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def longest_common_run(a, b) -> Run:
    """The longest contiguous token run that `a` and `b` share (earliest in a, then in b, on ties)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if not len(a) or not len(b):
        return Run(0, 0, 0)
    prev = np.zeros(len(b) + 1, dtype=np.int32)
    best, best_i, best_j = 0, 0, 0
    for i in range(len(a)):
        cur = np.zeros(len(b) + 1, dtype=np.int32)
        eq = b == a[i]
        cur[1:][eq] = prev[:-1][eq] + 1  # run ending at a[i], b[j]
        j = int(cur.argmax())
        if cur[j] > best:
            best, best_i, best_j = int(cur[j]), i, j
        prev = cur
    return Run(best, best_i - best + 1, best_j - best) if best else Run(0, 0, 0)


def ratio(chunk_tokens, retrieved) -> tuple[float, int, Run]:
    """r(C) of a chunk against retrieved [N, F] token sequences: (r, index of the sequence with the longest
    run (-1 if none), that run)."""
    n = len(chunk_tokens)
    best_i, best = -1, Run(0, 0, 0)
    for i, seq in enumerate(retrieved):
        run = longest_common_run(chunk_tokens, seq)
        if run.length > best.length:
            best_i, best = i, run
    return (best.length / n if n else 0.0), best_i, best


BUCKETS = [(0.0, "0"), (0.125, "<=12.5%"), (0.25, "<=25%"), (0.5, "<=50%"), (0.75, "<=75%"), (1.0, "<=100%")]


def bucket(r: float) -> str:
    """The paper's buckets: r = 0, then (0, 12.5%], (12.5, 25%], (25, 50%], (50, 75%], (75, 100%]."""
    for upper, label in BUCKETS:
        if r <= upper:
            return label
    return BUCKETS[-1][1]
