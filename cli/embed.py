"""`retrodb embed`."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated, Optional

import typer

from ._options import BatchSizeOpt, DbArg, DeviceOpt, ExecutorOpt, Format, FormatOpt, GpusOpt, RayAddressOpt, WaitOpt
from ._output import Output


def embed(
    db: DbArg,
    model: Annotated[Optional[str], typer.Option(help="Local Hugging Face BERT directory (default: the database's embedder, else the bundled all-MiniLM-L6-v2), or hash:DIM for the test embedder.")] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA; on CPU bf16 only where native and measured faster), fp32, bf16 or fp16.")] = "auto",
    batch_size: BatchSizeOpt = None,
    max_length: Annotated[Optional[int], typer.Option(help="Most BERT tokens per chunk; longer chunks are truncated (default: the database's, else 128).", min=3)] = None,
    reembed: Annotated[bool, typer.Option(help="Switch to another model: drop every key and index and rebuild them all.")] = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    gpus: GpusOpt = None,
    wait: WaitOpt = 0,
    fmt: FormatOpt = Format.human,
) -> None:
    """Compute frozen-BERT keys for every chunk that has none (mean-pooled, L2-normalised, float16).

    Only segments without keys are embedded; with nothing to do, no model is loaded.
    Finished segments are committed every minute and at the end, and an
    interrupted run resumes from its last finished pass of 8192 chunks.
    With --executor ray, one model per GPU of the cluster (--gpus N) embeds the
    segments as they stream in; this process commits. In fp32 the keys are
    byte-identical to a local run's.

    [bold]Examples[/]

      retrodb embed my-db
      retrodb embed my-db --model ~/models/bert-base-cased --device cuda --batch-size 1024
      retrodb embed my-db --model ~/models/other-bert --reembed
      retrodb embed my-db --format json
      retrodb embed my-db --executor ray --ray-address 10.0.0.1:6379 --gpus 8
    """
    from retrodb.embed import embed as run_embed

    out = Output(fmt.value)
    with ExitStack() as stack:
        bar = None

        def progress(counts: dict) -> None:  # the bar appears only once there is work
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(out.progress("embed", unit="chunks"))
            bar(counts)

        report = run_embed(db, model, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                           reembed=reembed, wait=wait, progress=progress, executor=executor,
                           ray_address=ray_address, gpus=gpus)
    summary = report.to_dict()
    if out.json:
        out.record(summary)
        return
    if not report.segments and not report.commits:
        out.say(f"nothing to embed: all {report.skipped_segments} segment(s) have keys of {report.model} (v{report.version})")
        return
    done = f"committed v{report.version}: keys for {len(report.segments)} segment(s), {report.chunks:,} chunks embedded"
    if report.resumed_chunks:
        done += f" ({report.resumed_chunks:,} more finished by an interrupted run or a lost worker)"
    if report.model_loaded:
        where = f"{len(report.nodes['embed'])} Ray node(s), " if report.nodes.get("embed") else ""
        done += (f" with {report.model} on {where}{report.device} ({report.dtype}, batch {report.batch_size}), "
                 f"{report.seconds:.1f}s ({report.load_seconds:.1f}s loading)")
        if summary["chunks_per_s"]:
            done += f", {summary['chunks_per_s']:,} chunks/s"
    out.say(done)


def register(app: typer.Typer) -> None:
    app.command()(embed)
