"""Options shared by several commands, defined once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

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
