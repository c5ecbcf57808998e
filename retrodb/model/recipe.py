"""The recipe of the bundled model: `make model` (python -m retrodb.model.recipe) reproduces it.

Steps, each resumable (a rerun skips what is done):
  1. corpus     write the corpus (corpus.py: stdlib, pydoc topics, dependencies' sources) and
                its manifest; the held-out documents are written apart and never trained on
  2. tokenizer  train the byte-level BPE on the training documents; it must equal the bundled
                tokenizer.json (new databases use that one), or `--write-tokenizer` replaces it
  3. database   ingest, embed (frozen MiniLM keys), index, neighbours (k=2, other documents only)
  4. train      `retrodb train` with BUNDLED_MODEL, stage by stage (BUNDLED_STAGES: the paper's data,
                then near-duplicate neighbours); a rerun skips finished stages and resumes the last
  5. export     copy the last checkpoint into retrodb/model/bundled (weights, config, tokenizer,
                training.json)

    python -m retrodb.model.recipe [--work DIR] [--steps N] [--max-minutes M] [--skip-train]
    python -m retrodb.model.recipe export RUN_DIR        # ship a run's latest checkpoint
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .config import RetroConfig
from .train import TrainConfig

# 7.8M parameters (31 MB in fp32): what a few hours of a shared 2-core CPU can train. Built without the
# encoder's input norm; stage copy-6 adds it (RetroConfig.enc_input_norm: without it the model never learned
# to copy a neighbour verbatim).
BUNDLED_MODEL = RetroConfig(vocab_size=8192, chunk_size=64, dim=256, n_layers=6, n_heads=4, head_dim=64, ffn_mult=4,
                            cca_layers=None, enc_dim=128, enc_layers=2, enc_heads=2, enc_input_norm=False)
# Stage 1, what one session of a shared 2-core CPU could train (about an hour, niced): 700 steps of 8 x 512 tokens,
# the paper's data (neighbours from other documents only). It learned language, not to read its neighbours.
BUNDLED_TRAIN = TrainConfig(seq_len=512, k=2, batch_size=8, steps=700, lr=2e-3, min_lr_ratio=0.1,
                            warmup_steps=30, weight_decay=0.1, grad_clip=1.0, eval_every=120, eval_sequences=32,
                            checkpoint_every=20, log_every=5, seed=0, val_fraction=0.02)


@dataclass(frozen=True)
class Stage:
    """One training stage of the bundled model: run `name` in the work directory, started from the last
    checkpoint of run `init` (new optimizer state; `model_changes` add modules: train.grown), or continued
    (`resume`) with `overrides`."""

    name: str
    cfg: TrainConfig | None = None
    init: str | None = None
    resume: bool = False
    overrides: tuple = ()
    model_changes: tuple = ()

    def target(self) -> int:
        o = dict(self.overrides)
        return o.get("stop_at") or o.get("steps") or self.cfg.stop_at or self.cfg.steps


def _copy_stage(steps: int, lr: float, warmup: int, seed: int, prob: float, noise: float, evals: int,
                **kw) -> TrainConfig:
    return replace(BUNDLED_TRAIN, steps=steps, lr=lr, warmup_steps=warmup, seed=seed, copy_prob=prob,
                   copy_noise=noise, eval_every=evals, checkpoint_every=25, **kw)


# Stages 2-6 teach it to read its neighbours: near-duplicates of a chunk's own [N, F] planted as first
# neighbour (TrainConfig.copy_prob / copy_noise, `plant_copies`). As run (2026-11-27/28, shared 2-core CPU):
# stage 2 began with a 2,400-step schedule and, at step 325, was resumed with a 1,000-step one and stopped
# at step 825; stage 4 (80% copies) taught copying but made unrelated neighbours cost 9% on validation,
# so stages 5 and 6 plant fewer, closer copies. Copy-5 read its neighbours (21% lower bpb on a document once
# it was added) but never copied one verbatim: a random-token copy task stayed at log V. Copy-6 adds the
# encoder's input norm (RetroConfig.enc_input_norm, the cause) and made-up spans only the neighbour holds
# (copy_span_prob); it was stopped at step 175 to plant more (copy-7: 80%, every copy with a span, stopped
# at step 625), then copy-8 adds the document's own earlier chunk as a decoy second neighbour
# (copy_decoy_prob), as retrieval returns it once the document is in the database; copy-9 plants shorter
# spans; copy-10 exact copies (noise 0: a noisy copy teaches the model to prefer its own guess to a
# surprising neighbour token, e.g. "@functools" for "@example" in a planted address).
BUNDLED_STAGES = (
    Stage("run", BUNDLED_TRAIN),
    Stage("copy-1", _copy_stage(2400, 1e-3, 50, 1, 0.25, 0.25, 200, stop_at=325), init="run"),
    Stage("copy-1", resume=True, overrides=(("steps", 1000), ("stop_at", 825))),
    Stage("copy-2", _copy_stage(500, 6e-4, 20, 2, 0.6, 0.2, 250), init="copy-1"),
    Stage("copy-3", _copy_stage(700, 5e-4, 20, 3, 0.8, 0.1, 350), init="copy-2"),
    Stage("copy-4", _copy_stage(200, 3e-4, 10, 4, 0.4, 0.15, 100), init="copy-3"),
    Stage("copy-5", _copy_stage(900, 4e-4, 20, 5, 0.5, 0.05, 300), init="copy-4"),
    Stage("copy-6", _copy_stage(1500, 8e-4, 30, 6, 0.5, 0.05, 500, stop_at=175, copy_span_prob=0.5,
                                copy_span_len=(4, 24)), init="copy-5", model_changes=(("enc_input_norm", True),)),
    Stage("copy-7", _copy_stage(1500, 1e-3, 10, 7, 0.8, 0.02, 500, stop_at=625, copy_span_prob=1.0,
                                copy_span_len=(8, 48)), init="copy-6"),
    Stage("copy-8", _copy_stage(900, 8e-4, 10, 8, 0.7, 0.02, 300, copy_span_prob=0.7, copy_span_len=(8, 48),
                                copy_decoy_prob=0.5), init="copy-7"),
    Stage("copy-9", _copy_stage(700, 6e-4, 10, 9, 0.6, 0.02, 350, copy_span_prob=0.8, copy_span_len=(4, 32),
                                copy_decoy_prob=0.5), init="copy-8"),
    Stage("copy-10", _copy_stage(500, 4e-4, 10, 10, 0.6, 0.0, 250, copy_span_prob=0.8, copy_span_len=(4, 32),
                                 copy_decoy_prob=0.5), init="copy-9"),
)

VOCAB_SIZE = 8192


def step_corpus(work: Path) -> dict:
    """The tokenizer's corpus (every source) in work/corpus, the model database's (MODEL_SOURCES) in work/model-corpus."""
    from .corpus import MODEL_SOURCES, write_corpus, write_manifest

    write_corpus(work / "corpus")
    summary = write_corpus(work / "model-corpus", MODEL_SOURCES)
    summary["manifest_sha256"] = write_manifest(work / "corpus-manifest.tsv")  # compare with docs/model-corpus.tsv
    print(f"corpus: {summary['documents']} documents, {summary['bytes']:,} bytes; {summary['held_out']} held out; "
          f"file list sha256 {summary['manifest_sha256'][:12]} (Python {summary['python']}; "
          "docs/model-corpus.tsv is the recipe's)", flush=True)
    return summary


def step_tokenizer(work: Path, write: bool) -> None:
    from ..tokenizer import tokenizer_info
    from . import BUNDLED
    from .bpe import save_tokenizer, train_tokenizer

    texts = (json.loads(line)["text"] for line in open(work / "corpus" / "train.jsonl", encoding="utf-8"))
    tok = train_tokenizer(texts, VOCAB_SIZE)
    save_tokenizer(tok, work / "tokenizer")
    made, bundled = tokenizer_info(work / "tokenizer").sha256, tokenizer_info(BUNDLED).sha256
    if made == bundled:
        print(f"tokenizer: the same as the bundled one (sha256 {made[:12]})", flush=True)
    elif write:
        save_tokenizer(tok, BUNDLED)
        print(f"tokenizer: replaced the bundled one ({bundled[:12]} -> {made[:12]})", flush=True)
    else:
        raise SystemExit(f"the tokenizer trained here (sha256 {made[:12]}) differs from the bundled one ({bundled[:12]}): "
                         "this install's corpus differs from the recipe's (see docs/model.md). Rerun with "
                         "--write-tokenizer to replace it (databases built with the old one will be refused).")


def step_database(work: Path) -> Path:
    from ..embed import embed
    from ..index import index
    from ..ingest import IngestOptions, ingest
    from ..neighbours import compute_neighbours

    db = work / "db"
    ingest(db, [str(work / "model-corpus" / "train.jsonl")], IngestOptions())
    embed(db)
    index(db)
    compute_neighbours(db, k=BUNDLED_TRAIN.k)
    print(f"database: {db}", flush=True)
    return db


def _step_of(run: Path) -> int:
    latest = run / "LATEST"
    return int(latest.read_text().strip().rsplit("-", 1)[-1]) if latest.exists() else 0


def step_train(work: Path, db: Path, overrides: dict) -> Path:
    """Every stage of BUNDLED_STAGES in turn; a stage whose run has reached its step is skipped, an interrupted
    one resumed. `overrides` (device, max_minutes) apply to each."""
    from .train import latest_checkpoint, train

    run = work / BUNDLED_STAGES[0].name
    for stage in BUNDLED_STAGES:
        run = work / stage.name
        if _step_of(run) >= stage.target():
            continue
        started = (run / "LATEST").exists()
        extra = {**dict(stage.overrides), **overrides}
        if started:  # this stage interrupted, or a continued stage
            report = train(db, run, resume=True, overrides=extra if stage.resume else overrides,
                           on_progress=lambda r: print(json.dumps(r), flush=True))
        else:
            init = latest_checkpoint(work / stage.init) if stage.init else None
            report = train(db, run, stage.cfg, BUNDLED_MODEL, init=init, model_changes=dict(stage.model_changes),
                           overrides=overrides, on_progress=lambda r: print(json.dumps(r), flush=True))
        print(f"train {stage.name}: step {report.step}/{report.steps} ({report.stopped}), {report.tokens:,} tokens, "
              f"val bpb {report.val_bpb} / {report.val_bpb_no_retrieval} without retrieval", flush=True)
        if report.stopped == "time limit":
            break
    return run


def export(run: Path, dest: Path | None = None) -> Path:
    """Copy the latest checkpoint of `run` (weights, config, tokenizer, training.json) to `dest` (the bundled dir)."""
    from ..atomic import TMP_PREFIX
    from . import BUNDLED
    from .checkpoint import resolve_model_dir

    dest = dest or BUNDLED
    src = resolve_model_dir(run)
    tmp = dest.parent / f"{TMP_PREFIX}bundled"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        if f.name != "train_state.pt":
            shutil.copy2(f, tmp / f.name)
    old = dest.parent / f"{TMP_PREFIX}bundled-old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f"export: {src} -> {dest}", flush=True)
    return dest


def main(argv: list[str]) -> None:
    if argv[:1] == ["export"]:
        export(Path(argv[1]))
        return
    ap = argparse.ArgumentParser(prog="python -m retrodb.model.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("model-work"), help="working directory (corpus, database, run)")
    ap.add_argument("--steps", type=int, help="train this many steps instead of the recipe's")
    ap.add_argument("--max-minutes", type=float, help="stop training after this many minutes (rerun to resume)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-train", action="store_true", help="build the corpus, tokenizer and database only")
    ap.add_argument("--write-tokenizer", action="store_true", help="replace the bundled tokenizer if it differs")
    ap.add_argument("--no-export", action="store_true", help="leave the bundled model as it is")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    step_corpus(args.work)
    step_tokenizer(args.work, args.write_tokenizer)
    db = step_database(args.work)
    if args.skip_train:
        return
    overrides = {k: v for k, v in {"steps": args.steps, "max_minutes": args.max_minutes,
                                   "device": args.device}.items() if v is not None}
    run = step_train(args.work, db, overrides)
    if not args.no_export:
        export(run)


if __name__ == "__main__":
    main(sys.argv[1:])
