"""The whole GPU job in one script: train a bigger RETRO than a CPU allows, on the recipe's database.

On the device machine (one H100/H200, nothing reachable, at most 8 files of 16 MiB back):

    python bench/gpu_train.py run --pack .gpu/pack --out $OUT --minutes 8

    --pack   the recipe's training database without its keys and indexes (training reads token
             ids and stored neighbours only), made here with `pack` below and carried with the
             call (carry: [".gpu"]); about 20 MB
    --init   start from a model directory (e.g. retrodb/model/bundled: continue the CPU-trained
             model) instead of the bigger GPU_MODEL from scratch
    writes   $OUT/model/ (config.json, tokenizer.json, model-*.safetensors in bf16, at most three
             shards of 16 MiB, model.safetensors.index.json, training.json) and $OUT/metrics.jsonl:
             8 files at most; the summary is printed as the last line

Here, before the call:

    python bench/gpu_train.py pack --db model-work/db --out .gpu/pack    # and: echo /.gpu/ >> .git/info/exclude

Test it on CPU with a tiny model: python bench/gpu_train.py run --pack .gpu/pack --out /tmp/gpu-out --tiny
Then ship the result: python -m retrodb.model.recipe export OUT_DIR/model (see docs/model.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrodb.model.config import RetroConfig  # noqa: E402
from retrodb.model.recipe import BUNDLED_TRAIN  # noqa: E402

# 20.5M parameters, CCA at layers 4 and 7: in bf16 about 41 MB, three shards of at most 16 MiB (what comes back).
# With the encoder's input norm (RetroConfig.enc_input_norm, the default): without it copying stalls.
GPU_MODEL = RetroConfig(vocab_size=8192, chunk_size=64, dim=384, n_layers=8, n_heads=6, head_dim=64, ffn_mult=4,
                        cca_layers=None, enc_dim=256, enc_layers=2, enc_heads=4, enc_input_norm=True)
# Half the chunks get a near-duplicate of their own [N, F] as first neighbour (5% of its tokens at most replaced),
# half of those a made-up span only the neighbour holds: what taught the bundled model to read its neighbours
# and to copy from them (docs/model.md, "Training").
GPU_TRAIN = replace(BUNDLED_TRAIN, batch_size=64, lr=1e-3, warmup_steps=100, steps=2000, eval_every=200,
                    eval_sequences=128, checkpoint_every=200, log_every=20, dtype="auto", device="auto", workers=4,
                    copy_prob=0.5, copy_noise=0.05, copy_span_prob=0.5, copy_span_len=(4, 24), copy_decoy_prob=0.5)
TINY_MODEL = RetroConfig(vocab_size=8192, chunk_size=64, dim=32, n_layers=2, n_heads=2, head_dim=16, ffn_mult=2,
                         enc_dim=16, enc_layers=1, enc_heads=1)
KEYS_AND_INDEXES = (".npy", ".hnsw")


def pack(db: Path, out: Path) -> None:
    """Copy a database without its keys and indexes (what training does not read)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(db, out, ignore=lambda d, names: [n for n in names if n.endswith(KEYS_AND_INDEXES)
                                                      or n in ("_work", "LOCK")])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {db} -> {out}: {size / 2**20:.1f} MiB (keys and indexes left out)")


def run(args) -> None:
    import torch

    from retrodb.model.checkpoint import read_model_dir, resolve_model_dir, write_model_dir
    from retrodb.model.train import train

    started = time.perf_counter()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cfg = replace(GPU_TRAIN, max_minutes=args.minutes)
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    model_cfg = GPU_MODEL
    if args.tiny:  # the CPU test of this script
        model_cfg = TINY_MODEL
        cfg = replace(cfg, batch_size=2, steps=args.steps or 4, eval_every=2, eval_sequences=2, checkpoint_every=2,
                      log_every=1, workers=0, warmup_steps=1, dtype="fp32")
    print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()} "
          f"({torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'})", flush=True)
    report = train(args.pack, work, cfg, model_cfg, init=args.init,
                   on_progress=lambda r: print(json.dumps(r), flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve_model_dir(work)
    model = read_model_dir(src)
    dest = out / "model"
    shutil.rmtree(dest, ignore_errors=True)
    extra = json.loads((src / "training.json").read_text())
    extra["stored_dtype"] = "bfloat16"
    write_model_dir(model, dest, (src / "tokenizer.json").read_text(), dtype=torch.bfloat16, extra=extra)
    shutil.copy2(work / "metrics.jsonl", out / "metrics.jsonl")
    summary = {k: v for k, v in asdict(report).items() if k != "evaluations"}
    summary.update(evaluations=report.evaluations, wall_s=round(time.perf_counter() - started, 1),
                   model=asdict(model.cfg))
    print(json.dumps(summary))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(json.dumps({"files": files, "n": len(files)}))
    assert len(files) <= 8, files
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files), "a file is over 16 MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--db", type=Path, default=REPO / "model-work" / "db")
    p.add_argument("--out", type=Path, default=REPO / ".gpu" / "pack")
    r = sub.add_parser("run")
    r.add_argument("--pack", type=Path, default=REPO / ".gpu" / "pack")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("/tmp/gpu-run"))
    r.add_argument("--minutes", type=float, default=8.0, help="training wall time (a checkpoint is written at the end)")
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--init", type=Path, default=None, help="continue this model instead of training GPU_MODEL")
    r.add_argument("--tiny", action="store_true", help="a tiny model for a CPU test of this script")
    args = ap.parse_args()
    pack(args.db, args.out) if args.cmd == "pack" else run(args)


if __name__ == "__main__":
    main()
