"""Chunked cross-attention (CCA), with the paper's causality.

The sequence of L tokens is split into chunks of m; chunk u has k encoded neighbours E_u (k x r
tokens). Token t attends to the neighbours of chunk u = (t + 1) // m - 1: the last token of
chunk u and the first m - 1 tokens of chunk u + 1 read E_u (the "m - 1 shift"), and the first
m - 1 tokens of the sequence read nothing. E_u was retrieved with chunk u's text, which every
token from the end of chunk u on has already seen, so no token reads a neighbour chosen using
tokens after it.

Positions are relative: the attending token at offset i of its window (i = 0 for the last token
of chunk u) sits at position m - 1 + i, and neighbour token j at position j, so the neighbour's
chunk N lines up with chunk u and its continuation F with chunk u + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, rotary_table
from .config import RetroConfig


class ChunkedCrossAttention(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.head_dim, context_dim=cfg.enc_dim)

    def forward(self, h: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, L, dim); encoded (B, C, k, r, enc_dim) with C = L // m; mask (B, C, k, r) -> (B, L, dim)."""
        B, L, dim = h.shape
        m, C, k, r = self.cfg.chunk_size, *encoded.shape[1:4]
        if C == 0:
            return torch.zeros_like(h)
        # Windows of m queries: window u = positions u*m + m-1 .. u*m + 2m-2 (the last one cut at L).
        q = h[:, m - 1:]  # (B, L - m + 1, dim)
        q = F.pad(q, (0, 0, 0, C * m - q.shape[1]))  # (B, C*m, dim); L - m + 1 <= C*m always
        q = q.view(B, C, m, dim)
        context = encoded.flatten(2, 3)  # (B, C, k*r, enc_dim): all k neighbours of chunk u at once
        keys = mask.flatten(2, 3)  # (B, C, k*r)
        has_any = keys.any(-1)  # (B, C): chunks with at least one retrieved token
        keys = keys | ~has_any[..., None] & (torch.arange(k * r, device=h.device) == 0)  # finite softmax
        hd, theta, dev = self.cfg.head_dim, self.cfg.rope_theta, str(h.device)
        q_rot = rotary_table(m - 1, m, hd, theta, dev)  # queries at positions m-1 .. 2m-2
        k_rot = rotary_table(0, r, hd, theta, dev).repeat(k, 1)  # each neighbour's tokens at 0 .. r-1
        out = self.attn(q, context, mask=keys[:, :, None, None, :], q_rot=q_rot, k_rot=k_rot)  # (B, C, m, dim)
        out = out * has_any[..., None, None].to(out.dtype)  # a chunk without neighbours adds nothing
        out = out.reshape(B, C * m, dim)[:, : L - m + 1]  # (B, L - m + 1, dim)
        return F.pad(out, (0, 0, m - 1, 0))  # (B, L, dim): the first m - 1 positions read nothing
