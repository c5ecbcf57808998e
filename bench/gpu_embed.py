"""Embed throughput on a GPU: retrodb's embed stage against the bare forward, MiniLM and a bert-base-sized model.

The device machine has no package registry and no copy of the bundled model, so the
work is split in two:

  prepare DIR   (here, with the project's venv) writes DIR/minilm (the bundled
                all-MiniLM-L6-v2 with its weights stored as float16, to fit the
                64 MiB a device call carries; loaded back as float32) and DIR/db
                (the pydoc topics corpus, `--copies` times, in `--segments` segments).
  run DIR       (on the device, with its own python3: torch, transformers, tokenizers,
                numpy, pyarrow are in its image; retrodb from PYTHONPATH=.) measures,
                in bf16 on CUDA, for (a) DIR/minilm and (b) a BertModel built from
                BertConfig() (bert-base: 12 layers, 768 dims, random weights) saved to a
                temporary directory with MiniLM's tokenizer files:
                  - the stage (read, tokenise, forward, pool, write float16 keys) against
                    model(...) alone on pre-tokenised, length-sorted batches already on
                    the GPU at its best batch size, alternating segment by segment;
                  - a batch-size sweep of both;
                  - bf16 against fp32: bare speed and the cosine of the keys;
                  - one end-to-end embed() (model load and commit included).
                Prints Markdown tables; with --out DIR also writes gpu_embed.json there.

Test it on CPU first:  python bench/gpu_embed.py prepare /tmp/g --copies 1 --segments 2
                       python bench/gpu_embed.py run /tmp/g --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_embed as bench  # noqa: E402
import retrodb  # noqa: E402

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def prepare(directory: Path, copies: int, segments: int) -> None:
    import torch
    from transformers import AutoModel

    from retrodb.tokenizer import default_model_dir

    directory.mkdir(parents=True, exist_ok=True)
    source = default_model_dir()
    minilm = directory / "minilm"
    shutil.rmtree(minilm, ignore_errors=True)
    AutoModel.from_pretrained(str(source), dtype=torch.float32).half().save_pretrained(minilm)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, minilm / name)
    shutil.rmtree(directory / "db", ignore_errors=True)
    shutil.rmtree(directory / "corpus", ignore_errors=True)
    bench.build_db(directory, copies, segments)
    shutil.rmtree(directory / "corpus")
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    print(f"wrote {directory}: {size / 2**20:.1f} MiB ({retrodb.open(directory / 'db').snapshot.totals()['chunks']:,} "
          f"chunks); carry it to the device")


def bert_base(directory: Path, tokenizer_from: Path, tiny: bool) -> Path:
    """A BertModel from BertConfig() (bert-base sizes; `tiny`: 2 layers of 128), random weights, saved like any."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512) \
        if tiny else BertConfig()
    BertModel(config).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, directory / name)
    return directory


def run(directory: Path, device: str, rounds: int, sweep: list[int], dtype_texts: int, tiny: bool,
        out: Path | None) -> None:
    from retrodb.embedder import BertEmbedder

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    scratch = Path(tempfile.mkdtemp(prefix="gpu-embed-"))
    db = scratch / "db"
    shutil.copytree(directory / "db", db)
    models = {"all-MiniLM-L6-v2 (real weights, stored fp16)": directory / "minilm",
              ("tiny BERT (random)" if tiny else "bert-base-sized BertModel (random weights)"):
                  bert_base(scratch / "bert-base", directory / "minilm", tiny)}
    results = {"machine": bench.machine(), "device": device, "models": {}}
    print(f"Machine: {results['machine']}\n")
    for title, model_dir in models.items():
        log(f"== {title}")
        emb = BertEmbedder(model_dir, device=device, dtype="bf16").load()
        log(f"loaded in {emb.load_seconds:.1f}s: {emb.device}, {emb.dtype}, batch {emb.batch_size}")
        m = bench.measure(emb, db, scratch / "work", rounds, sweep, log)
        texts = bench.all_texts(db)[:dtype_texts]
        del emb
        dt = bench.compare_dtypes(model_dir, device, texts, None, rounds, log) if dtype_texts else None
        e2e = bench.end_to_end(db, scratch, model_dir, device)
        results["models"][title] = {"measure": m, "dtypes": dt, "end_to_end": e2e}
        print(bench.report_tables(title, m, dt, e2e), flush=True)
        if out is not None:  # after each model, so a later failure keeps this one
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_embed.json").write_text(json.dumps(results, indent=1, default=str))
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
    shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the model and database to carry to the device")
    p.add_argument("directory", type=Path)
    p.add_argument("--copies", type=int, default=30, help="pydoc corpus copies (2,041 chunks each)")
    p.add_argument("--segments", type=int, default=3)
    r = sub.add_parser("run", help="measure (on the device)")
    r.add_argument("directory", type=Path)
    r.add_argument("--device", default="cuda")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--sweep", default="256,512,1024,2048")
    r.add_argument("--dtype-texts", type=int, default=4096)
    r.add_argument("--tiny", action="store_true", help="a tiny stand-in for bert-base and small sizes (CPU test)")
    r.add_argument("--out", type=Path, default=None, help="also write gpu_embed.json here (e.g. $OUT)")
    args = ap.parse_args(argv)
    if args.command == "prepare":
        prepare(args.directory, args.copies, args.segments)
        return 0
    sweep = [int(x) for x in args.sweep.split(",")]
    if args.tiny:
        sweep, args.rounds, args.dtype_texts = [16, 32], 1, 64
    run(args.directory, args.device, args.rounds, sweep, args.dtype_texts, args.tiny, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
