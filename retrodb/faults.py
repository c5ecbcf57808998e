"""Fault injection for crash-safety tests.

`point(name)` is called at the moments a crash could hurt (after a segment
file, between manifest and CURRENT, ...). With RETRODB_KILL_AT="name" (or
"name#N" for its Nth hit in this process) the process SIGKILLs itself there,
exactly as a kill -9 would. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    target = os.environ.get("RETRODB_KILL_AT")
    if not target:
        return
    want, _, nth = target.partition("#")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
