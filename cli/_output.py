"""One output object: rich tables and progress bars for people, JSON lines for scripts.

Data goes to stdout, warnings and errors to stderr; JSON mode prints no bars.
Data is shown as it is: neither console interprets markup or emoji codes in
what it prints (a document holding `[/bold]` or `:x:` prints as that), our own
styling is applied through `Text` objects, and lines are never hard-wrapped
(soft wrap), so a warning stays one line for grep. A table that does not fit
the terminal is printed one record per block, `column = value` lines (as
DuckDB's CLI does in line mode), instead of squeezing its cells.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterable

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text


def _console(**kw) -> Console:
    return Console(soft_wrap=True, markup=False, emoji=False, highlight=False, **kw)


class Output:
    def __init__(self, fmt: str = "human"):
        self.json = fmt == "json"
        self.out = _console()
        self.err = _console(stderr=True)
        self._blocks = 0  # tables and record blocks printed so far (a blank line separates them)

    def record(self, obj: Any) -> None:
        """One JSON object on its own line (JSON mode only)."""
        sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=_jsonable) + "\n")
        sys.stdout.flush()

    def table(self, columns: list[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> None:
        """A table, or one block of `column = value` lines per row where the table would not fit."""
        rows = [["" if v is None else str(v) for v in r] for r in rows]
        widths = [max([cell_len(c)] + [cell_len(line) for r in rows for line in r[i].splitlines() or [""]])
                  for i, c in enumerate(columns)]
        if sum(widths) + 3 * len(columns) + 1 > self.out.width:
            self.records(columns, rows, title)
            return
        self._blocks += 1
        t = Table(title=Text(title) if title else None, title_justify="left")
        for c in columns:
            t.add_column(Text(c), overflow="fold")
        for r in rows:
            t.add_row(*[Text(v) for v in r])
        self.out.print(t)

    def records(self, columns: list[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> None:
        """One block per row: `column = value` lines, column names right-aligned, a blank line between rows."""
        if self._blocks:
            self.out.print()
        self._blocks += 1
        if title:
            self.out.print(Text(title, style="bold"))
        width = max((cell_len(c) for c in columns), default=0)
        for i, r in enumerate(rows):
            if i:
                self.out.print()
            for c, v in zip(columns, r):
                self.out.print(Text(" " * (width - cell_len(c)) + c, style="bold") + Text(" = " + ("" if v is None else str(v))))

    def kv(self, pairs: Iterable[tuple[str, Any]], title: str | None = None) -> None:
        """Named values, one `name = value` line each (never wrapped)."""
        pairs = list(pairs)
        self.records([k for k, _ in pairs], [[v for _, v in pairs]], title)

    def say(self, message: str) -> None:
        if not self.json:
            self.out.print(message)

    def warn(self, message: str) -> None:
        self.err.print(Text("warning:", style="yellow") + Text(" " + message))

    def error(self, message: str) -> None:
        self.err.print(Text("error", style="red") + Text(" " + message))

    def progress(self, description: str, unit: str = "documents"):
        """A progress callback for library stages (a no-op in JSON mode)."""
        return _NullProgress() if self.json else RichProgress(self.err, description, unit)


def confirm(yes: bool, question: str) -> None:
    """Destructive commands: go on with --yes, ask on a terminal, refuse elsewhere."""
    import typer

    from retrodb.errors import RetrodbError

    if yes:
        return
    if not sys.stdin.isatty():
        raise RetrodbError("refusing to change the database without confirmation: not on a terminal",
                           hint="pass --yes to confirm, or --dry-run to only see the plan")
    if not typer.confirm(question, default=False, err=True):
        raise typer.Abort()


def _jsonable(v):
    from decimal import Decimal

    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return v.tolist()
    return str(v)


class _NullProgress:
    def __call__(self, counts: dict) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class RichProgress:
    """Receives stage reports ({"total_bytes"|"total", "bytes", "documents", "tokens", "chunks"}, and from the
    executor {"units_total"}, {"units": 1}) and draws one bar: share done, count, rate, segments done, ETA.
    Counts may be negative: a cluster executor takes back what a lost worker had reported."""

    def __init__(self, console: Console, description: str, unit: str):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.unit = unit
        self.units_total: int | None = None
        self.counts: dict[str, int] = {}
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = self.progress.add_task(description, total=None, detail="")

    def __call__(self, counts: dict) -> None:
        if "total_bytes" in counts:
            self.progress.update(self.task, total=counts["total_bytes"])
            return
        if "total" in counts:
            self.progress.update(self.task, total=counts["total"])
            return
        if "units_total" in counts:
            self.units_total = counts["units_total"]
            return
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        advance = counts.get("bytes", 0) + counts.get("advance", 0)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        parts = [f"{self.counts.get(self.unit, 0):,} {self.unit}"]
        if "tokens" in self.counts:
            parts.append(f"{self.counts['tokens'] / elapsed:,.0f} tokens/s")
        elif self.unit in self.counts:
            parts.append(f"{self.counts[self.unit] / elapsed:,.0f} {self.unit}/s")
        if self.units_total:
            parts.append(f"{self.counts.get('units', 0)}/{self.units_total} segments")
        self.progress.update(self.task, advance=advance, detail=" · ".join(parts))

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
