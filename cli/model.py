"""`retrodb train`, `retrodb eval`, `retrodb generate`: the bundled RETRO model and the database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ._options import DbArg, Format, FormatOpt
from ._output import Output

ModelOpt = Annotated[Optional[Path], typer.Option("--model", help="Model directory, or a `retrodb train` output directory (its latest checkpoint); default: the bundled model.")]
KOpt = Annotated[int, typer.Option("--k", "-k", help="Neighbours retrieved per chunk.", min=1)]
ModelDeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")]


def train(
    db: DbArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: step-N/ checkpoints, LATEST, metrics.jsonl.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint (its saved settings, updated by the options given).")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="JSON: {\"model\": {RetroConfig fields}, \"train\": {TrainConfig fields}} (see docs/model.md).")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this model's weights (e.g. the bundled one: retrodb/model/bundled) instead of random ones; --config's \"model\" may then only add modules (enc_input_norm).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (the schedule ends here).", min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per step.", min=1)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence (a multiple of the chunk size).", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Neighbours per chunk.", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the initial weights and the data order.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA if present), cpu or cuda.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto (bf16 on CUDA; on CPU only if measured faster), fp32 or bf16.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between validation evaluations.", min=1)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints.", min=1)] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop with a checkpoint after this many minutes (resume later).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data-loading processes (0: none).", min=0)] = None,
    exclude_doc: Annotated[Optional[List[str]], typer.Option("--exclude-doc", help="Never train on this document (repeatable).")] = None,
    fmt: FormatOpt = Format.human,
) -> None:
    """Train the RETRO model on the database's sequences and their stored neighbours.

    Needs `retrodb neighbours DB` first (neighbours of every chunk, other documents only).
    AdamW (weight decay 0.1), warm-up then cosine decay to 0.1x, gradient clipping, bf16
    autocast on CUDA. Every --checkpoint-every steps a checkpoint is written atomically;
    after a crash or kill, --resume continues exactly where the last one left off. Metrics
    (loss, tokens/s, validation bits per byte with and without retrieval) go to
    OUT/metrics.jsonl; --format json prints them on stdout too.

    [bold]Examples[/]

      retrodb train my-db --out runs/small --steps 2000
      retrodb train my-db --out runs/small --resume                  # after a crash or --max-minutes
      retrodb train my-db --out runs/small --resume --steps 8000     # train longer
      retrodb train my-db --out runs/big --config big.json --device cuda
    """
    from retrodb.errors import RetrodbError
    from retrodb.model.config import RetroConfig
    from retrodb.model.train import TrainConfig, train as run_train

    out_ = Output(fmt.value)
    model_cfg, model_changes, train_cfg = None, None, TrainConfig()
    if config is not None:
        try:
            spec = json.loads(config.read_text())
            model_cfg = RetroConfig.from_dict(spec.get("model", {}))
            model_changes = spec.get("model") if init is not None else None
            train_cfg = TrainConfig(**spec.get("train", {}))
        except (OSError, ValueError, TypeError) as exc:
            raise RetrodbError(f"cannot use --config {config}: {exc}",
                               hint='a JSON object {"model": {...}, "train": {...}} with the fields of docs/model.md') from None
    given = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "k": k, "seed": seed,
             "device": device, "dtype": dtype, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
             "max_minutes": max_minutes, "workers": workers,
             "exclude_docs": tuple(exclude_doc) if exclude_doc else None}
    overrides = {key: v for key, v in given.items() if v is not None}
    if resume and (config is not None or init is not None):
        raise RetrodbError("--resume continues a run with its own settings; leave out --config and --init")
    bar = None if out_.json else TrainBar(out_)
    try:
        report = run_train(db, out, train_cfg, model_cfg, init=init, model_changes=model_changes, resume=resume,
                           overrides=overrides, on_progress=out_.record if out_.json else bar)
    finally:
        if bar is not None:
            bar.stop()
    if out_.json:
        out_.record({"done": True, **report.__dict__, "evaluations": len(report.evaluations)})
        return
    line = (f"step {report.step}/{report.steps} ({report.stopped}): {report.tokens:,} tokens in {report.elapsed_s:.0f}s "
            f"on {report.device} ({report.dtype}), {report.parameters / 1e6:.2f}M parameters")
    if report.val_bpb is not None:
        line += (f"; validation bits per byte {report.val_bpb:.4f} with retrieval, "
                 f"{report.val_bpb_no_retrieval:.4f} without")
    out_.say(line)
    out_.say(f"checkpoint: {report.checkpoint}")


class TrainBar:
    """A progress bar with loss, tokens/s and ETA for `retrodb train`."""

    def __init__(self, out: Output):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.out = out
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=out.err)
        self.task = None

    def __call__(self, record: dict) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=record["steps"], completed=record["step"], detail="")
        if "val_bpb" in record:
            self.out.err.print(f"step {record['step']}: validation bits per byte {record['val_bpb']:.4f} with "
                               f"retrieval, {record['val_bpb_no_retrieval']:.4f} without")
            return
        eta = record["eta_s"]
        detail = (f"loss {record['loss']:.3f} · {record['tokens_per_s']:,.0f} tokens/s · "
                  f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        self.progress.update(self.task, completed=record["step"], detail=detail)

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()


def eval_(
    db: DbArg,
    files: Annotated[List[str], typer.Argument(help="Text files, JSONL or Parquet (read as ingest reads them; one document each).", show_default=False)],
    model: ModelOpt = None,
    k: KOpt = 2,
    exclude_doc: Annotated[Optional[List[str]], typer.Option("--exclude-doc", help="Evaluate against the database without this document (repeatable): the leakage control.")] = None,
    window: Annotated[Optional[int], typer.Option(help="Tokens per window (default: the model's training length).", min=1)] = None,
    stride: Annotated[Optional[int], typer.Option(help="Tokens between window starts (default: half a window).", min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", min=1)] = 8,
    device: ModelDeviceOpt = "auto",
    text_field: Annotated[str, typer.Option(help="JSONL field / Parquet column holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="JSONL field / Parquet column holding the document id.")] = "id",
    fmt: FormatOpt = Format.human,
) -> None:
    """Bits per byte of each document, with retrieval from the database and without, side by side.

    The paper's metric: total loss in bits over the UTF-8 bytes predicted. Long texts are
    read in overlapping windows. --format json prints one object: {"bpb", "bpb_no_retrieval",
    "bytes", "tokens", "files": [{"file", "doc_id", "bpb", "bpb_no_retrieval", "bytes", "tokens"}]}.

    [bold]Examples[/]

      retrodb eval my-db notes.txt more/
      retrodb eval my-db held-out.jsonl --exclude-doc held-out-1 --format json
      retrodb eval my-db paper.md --model runs/small --k 4
    """
    from retrodb.model.evaluate import evaluate

    out = Output(fmt.value)
    with out.progress("eval", unit="tokens") as bar:
        report = evaluate(db, files, model=model, k=k, exclude_doc=exclude_doc, window=window, stride=stride,
                          batch_size=batch_size, device=device, text_field=text_field, id_field=id_field,
                          on_progress=lambda c: bar({"advance": c["advance"], "tokens": c["advance"]}))
    result = report.to_dict()
    if out.json:
        out.record(result)
        return
    rows = [[f["file"], f["doc_id"], f"{f['tokens']:,}", f"{f['bytes']:,}", _num(f["bpb"]), _num(f["bpb_no_retrieval"])]
            for f in result["files"]]
    rows.append(["all", "", f"{result['tokens']:,}", f"{result['bytes']:,}", _num(result["bpb"]),
                 _num(result["bpb_no_retrieval"])])
    out.table(["file", "doc_id", "tokens", "bytes", "bpb (retrieval)", "bpb (no retrieval)"],
              rows, title="bits per byte")  # the consoles print data as it is (no markup)


def generate(
    db: DbArg,
    prompt: Annotated[str, typer.Argument(help="Text to continue (- reads it from stdin).", show_default=False)],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.", min=1)] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).", min=0)] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus: sample from the smallest set of tokens holding this much probability.", min=0.0, max=1.0)] = 0.95,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    no_retrieval: Annotated[bool, typer.Option("--no-retrieval", help="Do not read the database: the plain LM.")] = False,
    show_neighbours: Annotated[bool, typer.Option("--show-neighbours", help="Print, for each chunk, what was retrieved.")] = False,
    model: ModelOpt = None,
    k: KOpt = 2,
    exclude_doc: Annotated[Optional[List[str]], typer.Option("--exclude-doc", help="Never retrieve from this document (repeatable).")] = None,
    device: ModelDeviceOpt = "auto",
    fmt: FormatOpt = Format.human,
) -> None:
    """Continue PROMPT, retrieving from the database for each completed 64-token chunk as the text grows.

    --format json prints {"prompt", "text", "chunks": [{"text", "neighbours": [{"chunk_id",
    "doc_id", "score"}]}]}, where "text" is the generated continuation only.

    [bold]Examples[/]

      retrodb generate my-db "The with statement" --max-new-tokens 100
      retrodb generate my-db "def read_config(path):" --temperature 0 --show-neighbours
      retrodb generate my-db "Questions go to" --no-retrieval
    """
    import sys

    from retrodb.errors import RetrodbError
    from retrodb.model.lm import load

    out = Output(fmt.value)
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise RetrodbError("empty prompt: nothing to continue", hint=f'retrodb generate {db} "some text"')
    lm = load(model, device)
    result = lm.generate(None if no_retrieval else db, prompt, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, retrieval=not no_retrieval, k=k,
                         exclude_doc=exclude_doc)
    if out.json:
        out.record(result.to_dict())
        return
    if show_neighbours:
        for i, chunk in enumerate(result.chunks):
            out.table(["score", "chunk_id", "doc_id", "neighbour"],
                      [[f"{n['score']:.4f}", n["chunk_id"], n["doc_id"], _flat(n["text"])]
                       for n in chunk.neighbours], title=f"chunk {i}: {_flat(chunk.text)}")
    out.out.print(prompt, style="dim", end="", markup=False, highlight=False)
    out.out.print(result.text, markup=False, highlight=False)


def _num(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _flat(s: str) -> str:
    return " ".join(s.split())


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("eval")(eval_)
    app.command()(generate)
