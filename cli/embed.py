"""`retrodb embed`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._options import DbArg, Format, FormatOpt, WaitOpt
from ._output import Output


def embed(
    db: DbArg,
    model: Annotated[Optional[str], typer.Option(help="Local Hugging Face BERT directory (default: the database's embedder, else the bundled all-MiniLM-L6-v2), or hash:DIM for the test embedder.")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA; on CPU bf16 only where native and measured faster), fp32, bf16 or fp16.")] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(help="Chunks per forward pass (default: 64 on CPU, 256 on CUDA).", min=1)] = None,
    max_length: Annotated[int, typer.Option(help="Most BERT tokens per chunk (longer chunks are truncated).", min=8)] = 128,
    reembed: Annotated[bool, typer.Option(help="Recompute every key (needed to switch models).")] = False,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Compute frozen-BERT keys for every chunk that has none (mean-pooled, L2-normalised, float16).

    Only segments without keys are embedded; each finished segment is committed, so
    an interrupted run resumes where it stopped.

    [bold]Examples[/]

      retrodb embed my-db
      retrodb embed my-db --model ~/models/bert-base-cased --device cuda --batch-size 512
      retrodb embed my-db --model ~/models/other-bert --reembed
    """
    from retrodb.embed import embed as run_embed

    out = Output(fmt.value)
    with out.progress("embed", unit="chunks") as progress:
        report = run_embed(db, model, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                           reembed=reembed, wait=wait, progress=progress)
    summary = report.to_dict()
    if out.json:
        out.record(summary)
    else:
        out.say(f"committed v{report.version}: embedded {report.chunks:,} chunks in {len(report.segments)} segment(s) "
                f"with {report.model} on {report.device} ({report.dtype}), {report.seconds:.1f}s"
                + (f", {summary['chunks_per_s']:,} chunks/s" if summary["chunks_per_s"] else ""))


def register(app: typer.Typer) -> None:
    app.command()(embed)
