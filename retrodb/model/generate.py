"""`retrodb generate`: continue a prompt, retrieving neighbours for each chunk as the text grows.

Whenever a 64-token chunk of the text (prompt or generated) is complete and the next token is
to be predicted, that chunk's text is sent to the database and its k neighbours' [N, F] tokens
become what the CCA layers read for the next m tokens (the m-1 shift: the chunk's last token
and the first m-1 tokens after it). Without retrieval the model is a plain LM. Sampling is
temperature + nucleus (top-p), seeded; temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .retrieval import database_handle, retrieve


@dataclass
class ChunkNeighbours:
    text: str  # the chunk's text (what was sent to the database)
    neighbours: list[dict]  # [{"chunk_id", "doc_id", "score", "text", "continuation"}], best first


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation only
    tokens: list[int]  # its token ids
    chunks: list[ChunkNeighbours] = field(default_factory=list)

    def to_dict(self, with_text: bool = False) -> dict:
        """The `retrodb generate --format json` object."""
        keys = ("chunk_id", "doc_id", "score") + (("text", "continuation") if with_text else ())
        return {"prompt": self.prompt, "text": self.text,
                "chunks": [{"text": c.text, "neighbours": [{k: n[k] for k in keys} for n in c.neighbours]}
                           for c in self.chunks]}


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits (vocab,): greedy at temperature 0, else from the top-p nucleus."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest prefix holding top_p of the mass
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate(lm, db, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
             seed: int = 0, retrieval: bool = True, k: int = 2, exclude_doc=None, on_token=None) -> Generation:
    """Continue `prompt` by up to `max_new_tokens` tokens. `db`: a retrodb.Database or its path."""
    db = database_handle(db) if retrieval else None
    if db is not None:
        lm.check_database(db)
    m, window = lm.chunk_size, lm.seq_len
    ids = list(lm.tokenizer.encode(prompt, add_special_tokens=False).ids)
    n_prompt = len(ids)
    generator = torch.Generator().manual_seed(seed)
    nb_tokens: list[np.ndarray] = []  # per completed chunk: (k, 2m)
    nb_masks: list[np.ndarray] = []
    chunks: list[ChunkNeighbours] = []
    for _ in range(max_new_tokens):
        if not ids:
            break
        C = len(ids) // m
        while db is not None and len(nb_tokens) < C:  # retrieve for the chunk that just completed
            u = len(nb_tokens)
            text = lm.tokenizer.decode(ids[u * m: (u + 1) * m])
            got = retrieve(db, [text], k, m, exclude_doc=exclude_doc, with_text=True)
            nb_tokens.append(got.tokens[0])
            nb_masks.append(got.mask[0])
            chunks.append(ChunkNeighbours(text, [{"chunk_id": n.chunk_id, "doc_id": n.doc_id, "score": n.score,
                                                  "text": n.text, "continuation": n.continuation}
                                                 for n in got.neighbours[0]]))
        start = max(0, (len(ids) - window + m - 1) // m * m)  # the last window, starting on a chunk boundary
        x = torch.tensor([ids[start:]], device=lm.device)
        nb = mask = None
        if db is not None and len(ids) - start >= m:
            first, last = start // m, C
            nb = torch.from_numpy(np.stack(nb_tokens[first:last]))[None].to(lm.device)  # (1, C', k, 2m)
            mask = torch.from_numpy(np.stack(nb_masks[first:last]))[None].to(lm.device)
        logits = lm.model(x, nb, mask)[0, -1]
        token = sample(logits, temperature, top_p, generator)
        ids.append(token)
        if on_token is not None:
            on_token(token)
    new = ids[n_prompt:]
    return Generation(prompt=prompt, text=lm.tokenizer.decode(new), tokens=new, chunks=chunks)
