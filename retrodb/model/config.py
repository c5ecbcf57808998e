"""The one configuration of the RETRO model (saved as config.json beside the weights)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass
class RetroConfig:
    vocab_size: int = 8192  # LM tokenizer vocabulary (byte-level BPE, at most 65,535 so ids fit uint16)
    chunk_size: int = 64  # m: tokens per chunk; a neighbour is [N, F], r = 2m tokens
    dim: int = 384  # decoder width
    n_layers: int = 6  # decoder layers
    n_heads: int = 6  # decoder attention heads (self and chunked cross-attention)
    head_dim: int = 64  # width of one head
    ffn_mult: int = 4  # feed-forward hidden width = ffn_mult * width
    cca_layers: tuple[int, ...] | None = None  # 1-based decoder layers with chunked cross-attention;
    # None: every third layer from the middle of the stack (12 layers: 6, 9, 12; 6 layers: 3, 6).
    # The first of them hosts the encoder.
    enc_dim: int = 256  # encoder width
    enc_layers: int = 2  # encoder layers (bidirectional)
    enc_heads: int = 4  # encoder attention heads (head width head_dim)
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output layer reuses the token embedding matrix
    # RMSNorm on the neighbours' token embeddings before the encoder's input projection. Without it a
    # neighbour token's identity enters the encoder at the scale of (embedding x projection), about a
    # tenth of what attention adds, and is drowned: copying from a neighbour then stalls at log V
    # (measured, tests/test_model.py). A config.json written before this field reads as False.
    enc_input_norm: bool = True

    def __post_init__(self):
        if self.cca_layers is not None:
            self.cca_layers = tuple(int(i) for i in self.cca_layers)
            bad = [i for i in self.cca_layers if not 1 <= i <= self.n_layers]
            if bad:
                raise ValueError(f"cca_layers {bad} outside 1..{self.n_layers}")
        if not 0 < self.vocab_size <= 65535:
            raise ValueError(f"vocab_size must be 1..65535, not {self.vocab_size}")

    @property
    def cca_layer_set(self) -> tuple[int, ...]:
        """Decoder layers (1-based, sorted) that cross-attend to the neighbours."""
        if self.cca_layers is not None:
            return tuple(sorted(set(self.cca_layers)))
        return tuple(range(max(1, self.n_layers // 2), self.n_layers + 1, 3))

    @property
    def neighbour_len(self) -> int:
        return 2 * self.chunk_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RetroConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict) -> "RetroConfig":
        """A model directory's config.json: a field added after it was written takes the value that keeps
        the model it describes (enc_input_norm: False)."""
        return cls.from_dict({"enc_input_norm": False, **d})
