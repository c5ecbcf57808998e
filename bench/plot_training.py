"""Plot a training run's curve (docs/model-training.png) from its metrics.jsonl.

Needs matplotlib, which retrodb does not depend on: .venv/bin/python -m pip install matplotlib

    python bench/plot_training.py model-work/run/metrics.jsonl docs/model-training.png
    python bench/plot_training.py model-work/run/metrics.jsonl,model-work/copy-1/metrics.jsonl,... docs/model-training.png

Several runs (comma-separated, in order: the recipe's stages) are drawn one after another, each
stage's tokens counted on from the previous stage's last, with a dotted line where a stage begins.
"""

from __future__ import annotations

import json
import sys


def main(metrics: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, starts = [], []
    for path in metrics.split(","):
        stage = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        stage = [r for r in stage if "tokens" in r]
        if not stage:
            continue
        offset = rows[-1]["tokens"] if rows else 0  # each stage is a run of its own, counting from 0
        starts.append(stage[0]["tokens"] + offset)
        rows += [{**r, "tokens": r["tokens"] + offset} for r in stage]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_bpb" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax in (a, b):
        for x in starts[1:]:
            ax.axvline(x / 1e6, color="grey", lw=0.8, ls=":")
    a.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], lw=1)
    a.set(xlabel="tokens trained on (millions)", ylabel="training loss (nats per token)", title="training loss")
    a.grid(alpha=0.3)
    if evals:
        x = [r["tokens"] / 1e6 for r in evals]
        b.plot(x, [r["val_bpb"] for r in evals], "o-", label="with retrieval")
        b.plot(x, [r["val_bpb_no_retrieval"] for r in evals], "s--", label="without retrieval")
        b.legend()
    b.set(xlabel="tokens trained on (millions)", ylabel="bits per byte", title="validation (held-out split)")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}: {len(train)} training points, {len(evals)} evaluations")


if __name__ == "__main__":
    main(*sys.argv[1:3])
