"""Building blocks shared by the decoder, the encoder and chunked cross-attention.

RMSNorm, rotary position embeddings (relative positions: the only positional signal in the
model; no absolute position table is added anywhere), multi-head attention over
`torch.nn.functional.scaled_dot_product_attention`, and the feed-forward block.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # one dtype: the fused kernel


@lru_cache(maxsize=64)
def rotary_table(start: int, n: int, head_dim: int, theta: float, device: str = "cpu") -> torch.Tensor:
    """Rotations for positions start .. start+n-1: complex (n, head_dim / 2), e^(i * position * theta^(-2j/head_dim)).

    The frequencies span the whole head: head_dim / 2 of them, one per pair of features.
    """
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim / 2,)
    angles = torch.arange(start, start + n, dtype=torch.float64)[:, None] * freqs[None, :]  # (n, head_dim / 2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of features (x[2j], x[2j+1]) of x (..., n, head_dim) by table (n, head_dim / 2).

    After rotation, the dot product of a query at position p and a key at position q depends on
    p - q only: positions are relative.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., n, head_dim / 2)
    return torch.view_as_real(pairs * table).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention: self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.kv = nn.Linear(context_dim or dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, causal: bool = False,
                mask: torch.Tensor | None = None, q_rot: torch.Tensor | None = None,
                k_rot: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., n, dim), context (..., s, context_dim) -> (..., n, dim).

        `mask` (bool, broadcast to (..., heads, n, s)) is True where a query may attend a key.
        `q_rot` (n, hd/2) and `k_rot` (s, hd/2) are rotary tables of the query and key positions
        (`rotary_table`); without them, attention ignores positions.
        """
        context = x if context is None else context
        q = self.q(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(-2, -3)  # (..., h, n, hd)
        k, v = self.kv(context).unflatten(-1, (2, self.n_heads, self.head_dim)).unbind(-3)  # (..., s, h, hd) x2
        k, v = k.transpose(-2, -3), v.transpose(-2, -3)  # (..., h, s, hd)
        if q_rot is not None:
            q, k = rotate(q, q_rot), rotate(k, k_rot)
        batch = q.shape[:-3]  # SDPA's fused CPU kernels want one batch dimension: (N, h, n, hd)
        k, v = k.expand(*batch, *k.shape[-3:]), v.expand(*batch, *v.shape[-3:])  # a context shared by k neighbours
        if mask is not None:
            mask = mask.expand(*batch, *mask.shape[-3:]).flatten(0, -4)  # (N, 1|h, 1|n, s)
        out = F.scaled_dot_product_attention(q.flatten(0, -4), k.flatten(0, -4), v.flatten(0, -4), attn_mask=mask,
                                             is_causal=causal)  # (N, h, n, hd)
        return self.out(out.unflatten(0, batch).transpose(-2, -3).flatten(-2))  # (..., n, dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.up = nn.Linear(dim, mult * dim, bias=False)
        self.down = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))
