"""The single-writer lock.

`DB/LOCK` is held with flock(2), which the kernel releases when the holder
dies, so a lock left by a killed process is never mistaken for a live one.
The file also records who holds it (pid, host, command, time) so a second
writer can say who is in the way.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from .errors import DatabaseBusy

LOCK_NAME = "LOCK"


def read_holder(root: Path) -> dict | None:
    try:
        return json.loads((root / LOCK_NAME).read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class WriterLock:
    """Exclusive writer lock on a database directory; `wait` seconds to retry (0: fail at once)."""

    def __init__(self, root: Path, command: str, wait: float = 0.0):
        self.root = Path(root)
        self.command = command
        self.wait = wait
        self._fd: int | None = None
        self.stale_holder: dict | None = None

    def acquire(self) -> "WriterLock":
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = read_holder(self.root) or {}
                    raise DatabaseBusy(
                        f"database busy: {self.root} is being written by pid {holder.get('pid', '?')} "
                        f"on {holder.get('host', '?')} ('{holder.get('command', '?')}', since {holder.get('since', '?')})",
                        hint="wait for it to finish, or pass --wait SECONDS to queue behind it",
                    ) from None
                time.sleep(0.1)
        # We hold the lock. Whatever the file still names is a holder that died.
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            try:
                self.stale_holder = json.loads(previous)
            except json.JSONDecodeError:
                self.stale_holder = {"raw": previous.decode("utf-8", "replace")}
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
