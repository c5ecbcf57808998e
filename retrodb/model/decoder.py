"""The RETRO decoder: a pre-norm causal transformer whose CCA layers read the encoded neighbours.

    logits = Retro(cfg)(input_ids, neighbours, neighbour_mask)

Layer l does self-attention, then (if l is a CCA layer and neighbours are given) chunked
cross-attention, then its feed-forward block, each as x + f(norm(x)). The first CCA layer also
runs the encoder, on its post-self-attention activations (Algorithm 1 of the paper). Without
neighbours the CCA layers are skipped and the model is a plain causal LM: exactly the same
function as the decoder with the CCA layers removed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, FeedForward, RMSNorm, rotary_table
from .cca import ChunkedCrossAttention
from .config import RetroConfig
from .encoder import Encoder


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RetroConfig, cca: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.head_dim)
        self.cca_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cca else None
        self.cca = ChunkedCrossAttention(cfg) if cca else None
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_mult)


class Retro(nn.Module):
    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.cfg = cfg
        cca = set(cfg.cca_layer_set)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i + 1 in cca) for i in range(cfg.n_layers))
        self.encoder = Encoder(cfg) if cca else None
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("out.weight") or name.endswith("down.weight"):  # residual branches, GPT-2 style
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
            if ".cca.attn.out." in name:  # CCA starts as a no-op: training begins from a plain LM's function
                nn.init.zeros_(p)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, neighbours: torch.Tensor | None = None,
                neighbour_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, vocab); with `targets` (B, L, -100 = no target), the mean loss.

        neighbours (B, C', k, r) token ids and neighbour_mask (B, C', k, r) (True at real tokens) for
        chunks u = 0 .. C'-1; only the L // m complete chunks are read. `start` offsets the rotary
        positions (only differences of positions reach the attention scores, so it changes nothing).
        """
        B, L = input_ids.shape
        m = self.cfg.chunk_size
        C = L // m  # complete chunks: only their neighbours can be read (see cca.py)
        rot = rotary_table(start, L, self.cfg.head_dim, self.cfg.rope_theta, str(input_ids.device))  # (L, hd/2)
        retrieval = neighbours is not None and C > 0 and self.encoder is not None
        if retrieval:
            neighbours, neighbour_mask = neighbours[:, :C], neighbour_mask[:, :C]  # (B, C, k, r)
        x = self.embed(input_ids)  # (B, L, dim)
        encoded = None
        for layer in self.layers:
            x = x + layer.attn(layer.attn_norm(x), causal=True, q_rot=rot, k_rot=rot)
            if layer.cca is not None and retrieval:
                if encoded is None:  # the first CCA layer hosts the encoder
                    chunks = x[:, : C * m].view(B, C, m, -1)  # (B, C, m, dim) after self-attention
                    encoded = self.encoder(self.embed(neighbours), neighbour_mask, chunks)  # (B, C, k, r, e)
                x = x + layer.cca(layer.cca_norm(x), encoded, neighbour_mask)
            x = x + layer.ffn(layer.ffn_norm(x))
        logits = self.head(self.norm(x))  # (B, L, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
