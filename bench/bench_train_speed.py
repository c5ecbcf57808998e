"""Training throughput on CPU: retrodb's RETRO against the public reference, RETRO-pytorch 0.3.9.

The issue's configuration: width 256, 6 decoder layers, CCA at layers 3 and 6, a 2-layer encoder
(width 256), 8 heads of 64, vocabulary 16,384, batch 4 x 512 tokens, k = 2 neighbours of 128
tokens, fp32, AdamW. Both models train on the same random batches in ONE process, their steps
interleaved (A, B, A, B, ...), so machine load hits both alike; tokens/s are medians over the
timed steps, and the ratio is taken per pair of neighbouring steps (median and quartiles).
Also timed: our model with bf16 autocast (what `retrodb train --dtype auto` picks on a CPU with
native bf16 when it is faster), and our bundled configuration in fp32 and bf16.

RETRO-pytorch is a benchmark-only install, never a dependency:
    .venv/bin/python -m pip install --no-deps retro-pytorch==0.3.9 einops
Its package __init__ imports faiss and autofaiss (for building its retrieval index, not used
here); they are replaced by empty modules so that its model code imports unchanged.

    python bench/bench_train_speed.py [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from retrodb.model.config import RetroConfig  # noqa: E402
from retrodb.model.decoder import Retro  # noqa: E402
from retrodb.model.train import autocast  # noqa: E402

B, L, K, M, V = 4, 512, 2, 64, 16384
ISSUE_CONFIG = RetroConfig(vocab_size=V, chunk_size=M, dim=256, n_layers=6, n_heads=8, head_dim=64,
                           cca_layers=(3, 6), enc_dim=256, enc_layers=2, enc_heads=8, tie_embeddings=False)


def reference_model():
    for name in ("faiss", "autofaiss"):  # imported by retro_pytorch/__init__ for index building only
        stub = types.ModuleType(name)
        stub.build_index = None
        sys.modules.setdefault(name, stub)
    try:
        from retro_pytorch import RETRO
    except ImportError as exc:
        return None, f"RETRO-pytorch not importable ({exc}); install: pip install --no-deps retro-pytorch==0.3.9 einops"
    import retro_pytorch

    version = getattr(retro_pytorch, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("retro-pytorch")
    model = RETRO(num_tokens=V, max_seq_len=L, enc_dim=256, enc_depth=2, dec_dim=256, dec_depth=6,
                  dec_cross_attn_layers=(3, 6), heads=8, dim_head=64, chunk_size=M)
    return model, version


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    C = L // M
    seq = torch.randint(1, V, (B, L + 1), generator=g)
    nb = torch.randint(1, V, (B, C, K, 2 * M), generator=g)
    mask = torch.ones_like(nb, dtype=torch.bool)

    ref, ref_version = reference_model()
    runs = {}  # name -> (model, step function)
    if ref is not None:
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)

        def ref_step():
            loss = ref(seq, nb, return_loss=True)  # (B, L+1): it splits inputs and labels itself
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        runs[f"RETRO-pytorch {ref_version} fp32"] = (ref, ref_step)

    def ours(cfg: RetroConfig, dtype: str):
        model = Retro(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = seq[:, :L], seq[:, 1:]
        n = nb.clamp(max=cfg.vocab_size - 1)

        def step():
            with autocast("cpu", dtype):
                logits = model(x % cfg.vocab_size, n, mask)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), (y % cfg.vocab_size).flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, step

    runs["retrodb fp32"] = ours(ISSUE_CONFIG, "fp32")
    runs["retrodb bf16 autocast"] = ours(ISSUE_CONFIG, "bf16")
    from retrodb.model.recipe import BUNDLED_MODEL

    runs["retrodb bundled config fp32"] = ours(BUNDLED_MODEL, "fp32")
    runs["retrodb bundled config bf16"] = ours(BUNDLED_MODEL, "bf16")

    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps + 2):
        for name, (_, step) in runs.items():
            started = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - started)
    tokens = B * L
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {B} x {L} tokens, k = {K}; {args.steps} timed steps each, "
          "interleaved\n")
    print("| model | parameters | tokens/s (median) | quartiles |")
    print("|---|---|---|---|")
    for name, (model, _) in runs.items():
        rates = sorted(tokens / t for t in times[name])
        q = statistics.quantiles(rates, n=4)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {statistics.median(rates):,.0f} | {q[0]:,.0f}-{q[2]:,.0f} |")
    if ref is not None:
        ref_name = next(iter(runs))
        for name in ("retrodb fp32", "retrodb bf16 autocast"):
            ratios = sorted(r / o for r, o in zip(times[ref_name], times[name]))
            q = statistics.quantiles(ratios, n=4)
            print(f"\n{name} / {ref_name}: **{statistics.median(ratios):.2f}x** (quartiles {q[0]:.2f}-{q[2]:.2f}, "
                  "per pair of neighbouring steps)")
    else:
        print(f"\n{ref_version}")


if __name__ == "__main__":
    main()
