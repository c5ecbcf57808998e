"""Options shared by several commands, defined once."""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer


class Format(str, Enum):
    human = "human"
    json = "json"


DbArg = Annotated[Path, typer.Argument(help="Database directory.", show_default=False)]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="human: tables and progress bars; json: one JSON object per line on stdout.")]
WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to wait for another writer to finish (0: fail at once with 'database busy').", min=0)]
AtOpt = Annotated[Optional[int], typer.Option("--at", help="Read this retained snapshot version instead of the current one (see `retrodb log`).")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking (required when not on a terminal).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan and stop; change nothing.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-w", help="Worker processes (default: all cores).", min=1)]

# Input options shared by `ingest` and `add`.
FormatsOpt = Annotated[List[str], typer.Option("--format", "-f", help="Input format auto (by extension), text, jsonl or parquet; and/or output format human or json. Repeatable: --format jsonl --format json.")]
TextFieldOpt = Annotated[str, typer.Option(help="JSONL field / Parquet column holding the text.")]
IdFieldOpt = Annotated[str, typer.Option(help="JSONL field / Parquet column holding the document id (missing: content hash).")]
OnErrorOpt = Annotated[str, typer.Option(help="skip: skip bad records and report counts; fail: stop at the first, commit nothing, exit 1.")]
SourcesArg = Annotated[List[str], typer.Argument(help="Files or folders (recursive) of .txt/.md, .jsonl[.gz|.zst], .parquet; - reads JSONL from stdin.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option(help="Embedding device: auto (CUDA if present), cpu, cuda or mps.")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="Chunks per embedding forward pass (default: 32 on CPU, 512 on CUDA/MPS).", min=1)]
SegmentMbOpt = Annotated[float, typer.Option(help="Input megabytes per segment (the unit of parallelism and retry).", min=0.001)]

# Running on a cluster (every command that runs a stage over segments).
ExecutorOpt = Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster: every node must see the database directory at the same path, a shared filesystem).")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (host:port of the head node) for --executor ray; default $RAY_ADDRESS, else a new local cluster.")]
GpusOpt = Annotated[Optional[int], typer.Option("--gpus", help="With --executor ray: model actors, one per GPU (default: every GPU of the cluster; 0, or none in the cluster: one CPU actor per node).", min=0)]


@contextmanager
def usage_errors():
    """Report a library `BadOption` (a value that cannot work) as a usage error: exit 2, naming the option."""
    from retrodb.errors import BadOption

    try:
        yield
    except BadOption as exc:
        raise typer.BadParameter(exc.reason + (f"; {exc.hint}" if exc.hint else ""), param_hint=exc.option) from None
