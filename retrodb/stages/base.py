"""The stage contract shared by ingest, embed, index, compact and redact.

A stage is a picklable object whose `run(unit)` does the work for one unit
(a segment), is idempotent (a finished unit is recognised and skipped) and
returns a JSON-able dict of results. Executors run stages; they know nothing
about text. A stage reports progress through `self.report(**counts)`, which
the executor routes to the caller's progress callback. `root` is the database
directory (a cluster executor checks that every node sees it); `prepare()`
loads what every unit needs (a model) where the stage will run, once per
process, and says what it loaded. `run` may be called from several threads at
once (embed runs two units at a time on one model).

Units and results have one shape for every stage, and a segment is named by
its number (an int) in both; `segment_name(n)` gives its directory and
manifest key:

    unit    {"segment": int, ...inputs}
            ingest: "pieces" (readers.Piece); embed, index: "entry" (the
            segment's manifest entry); compact: "sources" ([[name, entry], ...])
    result  {"segment": int, "entry": {...}, "resumed": bool, ...extras}
            "entry" is what the stage adds to the segment's manifest entry:
            ingest and compact a whole entry (counts and files), embed
            {"files": {"keys": record}}, index {"files": {"index": record}};
            `merge_result` applies it. Extras: ingest "issues" and
            "issue_counts"; embed "chunks" (keys computed now) and
            "resumed_chunks"; index "chunks"; compact "dropped_chunks".

Units and results are JSON (so a marker file can hold a result, and Ray or a process pool
can carry them); the library turns a result into the typed manifest with
`ManifestEdit.apply(result)` (retrodb/manifest.py) and a `Segment` into a unit with
`segment_unit(seg)`.
"""

from __future__ import annotations

from typing import Any, Callable


class Stage:
    name = "stage"
    root = None  # the database directory (a Path), set by each stage
    _reporter: Callable[[dict], None] | None = None

    def run(self, unit: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self) -> dict:
        return {}

    def report(self, **counts: int) -> None:
        if self._reporter is not None:
            self._reporter(counts)

    def set_reporter(self, reporter: Callable[[dict], None] | None) -> None:
        self._reporter = reporter

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_reporter", None)
        return state


def segment_unit(seg) -> dict:
    """The unit of a stage that works on an existing segment (embed, index): its number and JSON entry."""
    return {"segment": seg.number, "entry": seg.to_json()}


def result(segment: int, entry: dict, resumed: bool = False, **extras: Any) -> dict:
    return {"segment": segment, "entry": entry, "resumed": resumed, **extras}
