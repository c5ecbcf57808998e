"""A stand-in for `retrodb.data.RetroDataset` (CONTRACT-data.md) and a tiny training run on it.

Items have exactly the contract's keys, shapes and dtypes. Neighbour 0 of chunk u is [chunk u,
chunk u+1] of the item's own sequence (so retrieval helps and the loss can fall); the others
are random. The last item is shorter than seq_len (right-padded, targets -100).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TINY_MODEL = dict(dim=32, n_layers=2, n_heads=2, head_dim=16, enc_dim=16, enc_heads=1, ffn_mult=2)


class FakeRetroDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, k: int, m: int, vocab: int, seed: int = 0):
        self.n, self.seq_len, self.k, self.m, self.vocab, self.seed = n, seq_len, k, m, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        L, m, k = self.seq_len, self.m, self.k
        C = L // m
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        n_real = L if i < self.n - 1 else L - m - 1  # the last item is padded
        seq = torch.randint(0, min(self.vocab, 50), (L + m + 1,), generator=g)
        ids = seq[:L].clone()
        targets = seq[1: L + 1].clone()
        ids[n_real:] = 0
        targets[n_real - 1:] = -100
        neighbours = torch.randint(0, self.vocab, (C, k, 2 * m), generator=g)
        chunks = seq[: (C + 1) * m].view(C + 1, m)
        neighbours[:, 0] = torch.cat([chunks[:-1], chunks[1:]], dim=-1)
        mask = torch.ones(C, k, 2 * m, dtype=torch.bool)
        mask[:, -1, m:] = False  # the last neighbour has no continuation
        neighbours[~mask] = 0
        return {"input_ids": ids, "targets": targets, "neighbours": neighbours, "neighbour_mask": mask,
                "chunk_ids": torch.arange(C, dtype=torch.int64) + 1000 * i,
                "neighbour_ids": torch.arange(C * k, dtype=torch.int64).view(C, k), "doc_id": f"doc{i}"}


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread is faster than two and does not fight the other tests for the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_datasets(seq_len: int = 32, k: int = 2, m: int = 8, vocab: int = 8192):
    return FakeRetroDataset(24, seq_len, k, m, vocab, seed=1), FakeRetroDataset(4, seq_len, k, m, vocab, seed=2)


def tiny_run(db: str, out: str, resume: bool = False, **overrides):
    """Train a tiny model on the fake data, one thread (bitwise reproducible across processes)."""
    from retrodb.model.config import RetroConfig
    from retrodb.model.train import TrainConfig, train

    torch.set_num_threads(1)
    cfg = TrainConfig(seq_len=32, k=2, batch_size=4, steps=6, lr=3e-3, warmup_steps=2, eval_every=3,
                      eval_sequences=4, checkpoint_every=2, log_every=1, dtype="fp32", keep_checkpoints=2)
    return train(db, out, cfg, RetroConfig(**TINY_MODEL), resume=resume, overrides=overrides,
                 datasets=fake_datasets())


if __name__ == "__main__":  # python tests/model_fakes.py DB OUT [--resume]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    tiny_run(sys.argv[1], sys.argv[2], resume="--resume" in sys.argv)
