"""The stage contract shared by ingest, embed, index, compact and redact.

A stage is a picklable object whose `run(unit)` does the work for one unit
(a segment), is idempotent (a finished unit is recognised and skipped) and
returns a JSON-able dict of results. Executors run stages; they know nothing
about text. A stage reports progress through `self.report(**counts)`, which
the executor routes to the caller's progress callback.
"""

from __future__ import annotations

from typing import Any, Callable


class Stage:
    name = "stage"
    _reporter: Callable[[dict], None] | None = None

    def run(self, unit: Any) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def report(self, **counts: int) -> None:
        if self._reporter is not None:
            self._reporter(counts)

    def set_reporter(self, reporter: Callable[[dict], None] | None) -> None:
        self._reporter = reporter

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_reporter", None)
        return state
