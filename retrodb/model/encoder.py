"""The retrieval encoder: reads each retrieved neighbour [N, F] (r = 2m tokens), bidirectionally.

As in the paper (Borgeaud et al. 2021, section 2.4 and Algorithm 1), each neighbour of chunk u
is conditioned on the decoder's activations of chunk u, taken after the self-attention of the
first chunked cross-attention layer: the encoder runs *inside* the decoder, not before it on the
token embeddings (a known defect of public implementations; see tests/test_model.py). Chunk u's
activations only depend on tokens up to the end of chunk u, and only tokens after that read the
encoded neighbours, so conditioning keeps the decoder causal.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, FeedForward, RMSNorm, rotary_table
from .config import RetroConfig


class EncoderLayer(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        e = cfg.enc_dim
        self.self_norm = RMSNorm(e, cfg.norm_eps)
        self.self_attn = Attention(e, cfg.enc_heads, cfg.head_dim)
        self.cross_norm = RMSNorm(e, cfg.norm_eps)
        self.context_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross_attn = Attention(e, cfg.enc_heads, cfg.head_dim, context_dim=cfg.dim)
        self.ffn_norm = RMSNorm(e, cfg.norm_eps)
        self.ffn = FeedForward(e, cfg.ffn_mult)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, chunk: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        # x (B, C, k, r, e); key_mask (B, C, k, 1, 1, r); chunk (B, C, 1, m, dim); rot (r, head_dim/2)
        x = x + self.self_attn(self.self_norm(x), mask=key_mask, q_rot=rot, k_rot=rot)
        x = x + self.cross_attn(self.cross_norm(x), self.context_norm(chunk))
        return x + self.ffn(self.ffn_norm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.cfg = cfg
        self.in_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.enc_input_norm else None
        self.inp = nn.Linear(cfg.dim, cfg.enc_dim, bias=False)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.norm = RMSNorm(cfg.enc_dim, cfg.norm_eps)

    def forward(self, neighbours: torch.Tensor, mask: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """neighbours (B, C, k, r, dim) token embeddings; mask (B, C, k, r) True at real tokens;
        chunks (B, C, m, dim) decoder activations of each chunk -> (B, C, k, r, enc_dim)."""
        r = neighbours.shape[-2]
        rot = rotary_table(0, r, self.cfg.head_dim, self.cfg.rope_theta, str(neighbours.device))
        first = torch.arange(r, device=neighbours.device) == 0
        # A neighbour with no real token (fewer than k retrieved) still needs one key to keep the
        # softmax finite; chunked cross-attention masks it out later.
        key_mask = mask | ~mask.any(-1, keepdim=True) & first  # (B, C, k, r)
        key_mask = key_mask[..., None, None, :]  # (B, C, k, heads=1, queries=1, r)
        x = self.inp(neighbours if self.in_norm is None else self.in_norm(neighbours))  # (B, C, k, r, e)
        chunks = chunks.unsqueeze(2)  # (B, C, 1, m, dim): one chunk conditions its k neighbours
        for layer in self.layers:
            x = layer(x, key_mask, chunks, rot)
        return self.norm(x)
