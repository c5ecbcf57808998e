"""Fault injection for crash-safety tests.

`point(name)` is called at the moments a crash could hurt (after a segment
file, between manifest and CURRENT, ...). With RETRODB_KILL_AT="name" (or
"name#N" for its Nth hit in this process) the process SIGKILLs itself there,
exactly as a kill -9 would. With RETRODB_FAIL_AT="name=ENOSPC" (any errno
name, optionally "name#N=..."), it raises that OSError there instead, as a
full disk or a denied permission would. Unset, it costs one dict lookup.

With RETRODB_KILL_ONCE=PATH as well, only the first process that reaches the
kill point dies: it claims PATH (created exclusively, so on a shared filesystem
one process of a whole cluster claims it) and every later hit passes. The Ray
tests use it to kill exactly one worker mid-stage and watch the retry finish.
"""

from __future__ import annotations

import errno
import os
import signal

_hits: dict[str, int] = {}


def _due(target: str, name: str) -> bool:
    want, _, nth = target.partition("#")
    if want != name:
        return False
    key = f"{name}#{target}"
    _hits[key] = _hits.get(key, 0) + 1
    return _hits[key] >= int(nth or 1)


def point(name: str) -> None:
    kill = os.environ.get("RETRODB_KILL_AT")
    fail = os.environ.get("RETRODB_FAIL_AT")
    if kill and _due(kill, name) and _claim(os.environ.get("RETRODB_KILL_ONCE")):
        os.kill(os.getpid(), signal.SIGKILL)
    if fail:
        target, _, code = fail.partition("=")
        if _due(target, name):
            number = getattr(errno, code or "EIO")
            raise OSError(number, os.strerror(number), f"<{name}>")


def _claim(path: str | None) -> bool:
    """True if this process may die now: no RETRODB_KILL_ONCE, or this process created its file first."""
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False
