"""The bundled RETRO model (Borgeaud et al. 2021, small scale) that reads a retrodb database.

    from retrodb.model import load
    lm = load()                                  # the bundled checkpoint (package data, no network)
    lm.bpb("my-db", ["some text ..."])           # bits per byte, with and without retrieval
    lm.generate("my-db", "def parse(", max_new_tokens=64)

Modules, top to bottom: config (the one dataclass), attention (RMSNorm, rotary, attention,
feed-forward), encoder, cca (chunked cross-attention), decoder (the model), bpe (its LM
tokenizer), checkpoint (safetensors shards), train, evaluate, generate, corpus (the recipe's
training corpus). torch is imported only when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "bundled"  # config.json, tokenizer.json, model-*.safetensors


def load(path: str | Path | None = None, device: str = "auto"):
    """The model in `path` (a model directory, or a `retrodb train` output: its latest checkpoint), or the
    bundled one; a `retrodb.model.lm.RetroLM` with `.bpb(db, texts)` and `.generate(db, prompt)`. Offline."""
    from .lm import load as load_model

    return load_model(path, device)
